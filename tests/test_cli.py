"""End-to-end CLI tests on the packaged sample with the tiny model (and the real model, marked slow)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, random_init, save_adapter, shapes_for_model
from prisp.cli import app
from prisp.data.locations import SAMPLE_DIR
from prisp.errors import PrispError
from prisp.models import load_model

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("prisp: error: ")]
    # Status lines ("loading model ...") may precede it; the error itself is exactly one line, and last.
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0]


@pytest.mark.parametrize("method", ["np", "rag"])
def test_predict_then_eval_on_the_sample(tiny_model_dir, tmp_path, method):
    out = tmp_path / "preds.json"
    result = invoke("predict", "--task", "LaMP-4", "--split", "dev", "--method", method, "--model", tiny_model_dir,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert f"LaMP-4 dev {method}: 6 queries" in result.stdout
    preds = json.loads(out.read_text())
    golds = json.loads((SAMPLE_DIR / "LaMP-4" / "dev_outputs.json").read_text())
    assert preds["task"] == "LaMP-4"
    assert [p["id"] for p in preds["golds"]] == [g["id"] for g in golds["golds"]]
    scored = invoke("eval", "--task", "LaMP_4", "--golds", SAMPLE_DIR / "LaMP-4" / "dev_outputs.json", "--preds", out,
                    "--json")
    assert scored.exit_code == 0, scored.output
    metrics = json.loads(scored.stdout)  # --json: one JSON object, nothing else on stdout
    assert set(metrics) == {"rouge-1", "rouge-L"} and all(0.0 <= v <= 1.0 for v in metrics.values())


def test_eval_human_output_and_partial(tmp_path):
    golds = SAMPLE_DIR / "LaMP-2N" / "dev_outputs.json"
    data = json.loads(golds.read_text())
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"task": "LaMP_2N", "golds": data["golds"][:2]}))
    _one_line_error(invoke("eval", "--task", "LaMP-2N", "--golds", golds, "--preds", preds), "no prediction for id")
    result = invoke("eval", "--task", "LaMP-2N", "--golds", golds, "--preds", preds, "--partial",
                    "--questions", SAMPLE_DIR / "LaMP-2N" / "dev_questions.json")
    # Perfect on the subset, but macro-F1 counts all 15 categories: each predicted class has F1 1, the rest 0.
    f1 = len({g["output"] for g in data["golds"][:2]}) / 15
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["accuracy: 1.0000", f"f1: {f1:.4f}", f"score: {(1 + f1) / 2:.4f}"]


def test_malformed_questions_file_fails_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "LaMP-4"
    data.mkdir()
    questions = json.loads((SAMPLE_DIR / "LaMP-4" / "dev_questions.json").read_text())
    del questions[2]["profile"][3]["title"]
    (data / "dev_questions.json").write_text(json.dumps(questions))
    (data / "dev_outputs.json").write_text((SAMPLE_DIR / "LaMP-4" / "dev_outputs.json").read_text())
    out = tmp_path / "preds.json"
    result = invoke("predict", "--task", "LaMP-4", "--data", tmp_path, "--model", tiny_model_dir, "--out", out)
    _one_line_error(result, "dev_questions.json", questions[2]["id"], "'title'")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--task", "LaMP-9"], ["unknown task 'LaMP-9'"]),
        (["--task", "LaMP-4", "--method", "magic"], ["unknown method 'magic'"]),
        (["--task", "LaMP-4", "--split", "nosuch"], ["no nosuch_questions.json"]),
        (["--task", "LaMP-4", "--model", "/no/such/model/dir"], ["does not exist"]),
        (["--task", "LaMP-4", "--k", "0"], ["--k must be at least 1"]),
    ],
)
def test_predict_refuses_bad_options_with_one_line(tmp_path, args, needles):
    out = tmp_path / "p.json"
    _one_line_error(invoke("predict", *args, "--out", out), *needles)
    assert not out.exists()


def test_predict_with_an_adapter_and_a_mismatched_adapter(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir)).model
    adapter = save_adapter(random_init(model, LoraSpec(), seed=1), tmp_path / "lora", str(tiny_model_dir))
    ok = invoke("predict", "--task", "LaMP-5", "--model", tiny_model_dir, "--adapter", adapter, "--limit", "1",
                "--out", tmp_path / "a.json")
    assert ok.exit_code == 0, ok.output
    shapes = {key: (inp * 2, out) for key, (inp, out) in shapes_for_model(model, LoraSpec().target_modules).items()}
    wrong = save_adapter(random_init(shapes, LoraSpec(), seed=1), tmp_path / "wrong", "other")
    _one_line_error(invoke("predict", "--task", "LaMP-5", "--model", tiny_model_dir, "--adapter", wrong,
                           "--out", tmp_path / "b.json"), "does not fit the base model")
    assert not (tmp_path / "b.json").exists()


@pytest.fixture
def lamp_server(tmp_path):
    root = tmp_path / "www"
    for split in ("train", "dev"):
        folder = root / "LaMP_4" / split
        folder.mkdir(parents=True)
        for kind in ("questions", "outputs"):
            (folder / f"{split}_{kind}.json").write_text((SAMPLE_DIR / "LaMP-4" / f"dev_{kind}.json").read_text())
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_download_lamp_then_predict_reads_it(lamp_server, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    dest = tmp_path / "lamp"
    result = invoke("data", "download", "lamp", "--task", "LaMP-4", "--dest", dest, "--base-url", lamp_server)
    assert result.exit_code == 0, result.output
    assert (dest / "LaMP-4" / "train_questions.json").is_file() and (dest / "LaMP-4" / "SHA256SUMS").is_file()
    assert result.stdout.count("downloaded") == 4
    predicted = invoke("predict", "--task", "LaMP-4", "--data", dest, "--split", "train", "--model", tiny_model_dir,
                       "--limit", "1", "--out", tmp_path / "p.json")
    assert predicted.exit_code == 0, predicted.output


def test_data_download_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    result = invoke("data", "download", "lamp", "--task", "LaMP-4", "--dest", tmp_path,
                    "--base-url", "http://127.0.0.1:9/LaMP")
    _one_line_error(result, "cannot reach")
    assert not (tmp_path / "LaMP-4" / "dev_questions.json").exists()


def test_module_entry_point_and_models_listing():
    proc = subprocess.run([sys.executable, "-m", "prisp", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "smollm2-135m" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "prisp", "eval", "--task", "LaMP-4", "--golds", "/nope.json",
                          "--preds", "/nope.json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("prisp: error: file not found")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("method", ["pag", "rag+pag"])
def test_predict_with_pag_profiles(tiny_model_dir, tmp_path, method):
    out = tmp_path / "p.json"
    result = invoke("predict", "--task", "LaMP-5", "--method", method, "--model", tiny_model_dir, "--limit", "2",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["golds"]) == 2


@pytest.mark.slow
@pytest.mark.encoder
def test_demo_on_the_real_default_model():
    result = invoke("demo", "--tasks", "LaMP-2N", "--personalize", "LaMP-5")
    assert result.exit_code == 0, result.output
    for needle in ("LaMP-2N np: accuracy", "LaMP-2N rag: accuracy", "NP vs RAG", "LaMP-5 prisp: rouge-1",
                   "anchor generated from its description"):
        assert needle in result.stdout


@pytest.mark.slow
def test_predict_cli_with_the_real_default_model(tmp_path):
    out = tmp_path / "p.json"
    result = invoke("predict", "--task", "LaMP-1", "--method", "rag", "--limit", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["golds"]) == 2


def test_threads_option_resolves_auto_numbers_and_the_environment(monkeypatch):
    from prisp.console import available_cores, resolve_threads, set_threads

    monkeypatch.delenv("PRISP_THREADS", raising=False)
    assert resolve_threads(None) == resolve_threads("auto") == resolve_threads("AUTO") == available_cores()
    assert resolve_threads("3") == resolve_threads(3) == 3
    monkeypatch.setenv("PRISP_THREADS", "1")
    assert resolve_threads(None) == 1 and resolve_threads("auto") == available_cores()
    for bad in ("0", "-2", "two", "1.5", ""):
        with pytest.raises(PrispError, match="--threads must be a positive integer or 'auto'"):
            resolve_threads(bad)
    before = torch.get_num_threads()
    try:
        assert set_threads("1") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
