"""User-defined tasks: spec files validated with one-line errors, and the shipped example
(examples/support_reply) run end to end through the CLI: anchor from its description -> personalize ->
generate -> predict -> eval, plus a batch run whose worker processes get the spec as data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import prisp
from prisp.adapters import load_adapter
from prisp.cli import app
from prisp.data.prompts import query_prompt, render_item, retrieval_query
from prisp.data.tasks import get_task, label_set, load_task_file
from prisp.errors import DataError, PrispError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "support_reply"
SPEC = EXAMPLE / "task.toml"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def error_line(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("prisp: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def hypernet_dir(tiny_hypernet_dir):
    return tiny_hypernet_dir


def write_spec(tmp_path, text: str, name: str = "task.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
name = "note-tags"
kind = "classification"
description = "Tag a note with one of the user's tags."
labels = ["work", "home", "health"]
prompt = "Which tag fits this note? tags: [{labels}] Note: {note} Tag:"
[history]
fields = ["note", "tag"]
answer = "tag"
"""


def test_the_example_spec_and_the_builtin_specs_load():
    spec = get_task(str(SPEC))
    assert (spec.name, spec.kind, spec.answer, spec.input_fields) == ("support-reply", "generation", "reply",
                                                                       ("ticket",))
    assert get_task("support-reply") is spec and not spec.builtin and dict(spec.schedule)["lr"] == 0.003
    assert get_task("LaMP-4").builtin and get_task("LaMP-4").source.endswith("LaMP-4.toml")
    prompt = query_prompt(spec, '{"ticket": "My card was declined."}')
    assert prompt == ("User Instruction: Reply to the following customer support ticket. Ticket: My card was "
                      "declined. Reply:")
    assert query_prompt(spec, "My card was declined.") == prompt  # one input field: plain text is fine
    assert retrieval_query(spec, '{"ticket": "card declined"}') == "card declined"


def test_a_classification_spec_fills_labels_and_defaults_the_rest(tmp_path):
    spec = load_task_file(write_spec(tmp_path, GOOD))
    assert spec.labels == ("work", "home", "health") and spec.query_fields == ("note",)
    assert label_set(spec) == spec.labels and spec.metric == "accuracy-f1"
    assert query_prompt(spec, "Buy milk", spec.labels) == "Which tag fits this note? tags: [work, home, health] " \
                                                          "Note: Buy milk Tag:"
    from prisp.data.lamp import ProfileItem

    assert render_item(spec, ProfileItem("1", {"note": "gym", "tag": "health"})) == "Note: gym Tag: health"
    json_spec = write_spec(tmp_path, json.dumps({"name": "rate-it", "kind": "rating", "rating": [1, 3],
                                                 "description": "Rate it.", "prompt": "Rate: {text} Score:",
                                                 "history": {"fields": ["text", "score"], "answer": "score"}}),
                           "rate.json")
    rated = load_task_file(json_spec)
    assert rated.kind == "regression" and rated.labels == ("1", "2", "3")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('name = "note-tags"', 'name = "LaMP-4"'), "built-in LaMP task"),
    (lambda t: t.replace('kind = "classification"', 'kind = "poetry"'), "kind must be one of"),
    (lambda t: t.replace('answer = "tag"', 'answer = "mood"'), "answer 'mood' is not one of fields"),
    (lambda t: t.replace("Note: {note}", "Note: {body}"), "not history fields"),
    (lambda t: t.replace('labels = ["work", "home", "health"]', 'labels = ["work"]'), "at least two"),
    (lambda t: t + 'colour = "blue"\n', "unknown key(s) 'colour'"),
    (lambda t: t.replace('description = "Tag a note with one of the user\'s tags."\n', ""), "missing 'description'"),
    (lambda t: t.replace("Note: {note}", "Note: {note!r}"), "placeholders are plain field names"),
    (lambda t: t.replace("[history]", 'input_format = "lamp"\n[history]'), "built-in LaMP tasks"),
    (lambda t: t.replace("[history]", 'metric = "rouge"\n[history]'), "scored with metric 'accuracy-f1'"),
    (lambda t: t + '[schedule]\nlr = -1\n', "lr a positive number"),
    (lambda t: t.replace("[history]", "[history\n"), "not valid TOML"),
])
def test_malformed_specs_get_one_line_errors(tmp_path, change, message):
    path = write_spec(tmp_path, change(GOOD))
    with pytest.raises(DataError) as caught:
        load_task_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_task_names_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="or a task spec file"):
        get_task("my-task")
    with pytest.raises(DataError, match="does not exist"):
        get_task(str(tmp_path / "missing.toml"))
    spec = get_task(str(SPEC))
    with pytest.raises(DataError, match="lacks field"):
        query_prompt(spec, '{"subject": "hi"}')
    with pytest.raises(PrispError, match="no tuned Stage-2 schedule for .*Table 7 has no row"):
        prisp.personalize_user(None, None, spec, [{"id": "1", "ticket": "a", "reply": "b"}], schedule="tuned")


def test_the_example_end_to_end_through_the_cli(tiny_model_dir, hypernet_dir, tmp_path):
    anchor, user = tmp_path / "anchor", tmp_path / "maya"
    ok(invoke("anchor", "--task", SPEC, "--hypernet", hypernet_dir, "--model", tiny_model_dir, "--out", anchor))
    load_adapter(anchor)
    result = ok(invoke("personalize", "--task", SPEC, "--anchor", anchor, "--history", EXAMPLE / "history.jsonl",
                       "--model", tiny_model_dir, "--out", user))
    assert "10 items" in result.stdout
    report = json.loads((user / "personalization.json").read_text())
    assert report["task"] == "support-reply" and report["hyperparameters"]["lr"] == 0.003
    ok(invoke("generate", "--task", SPEC, "--adapter", user, "--model", tiny_model_dir,
              "--input", '{"ticket": "Can I pay by bank transfer?"}', "--max-new-tokens", "4"))
    preds = tmp_path / "preds.json"
    ok(invoke("predict", "--task", SPEC, "--data", EXAMPLE / "data", "--split", "dev", "--method", "prisp",
              "--anchor", anchor, "--model", tiny_model_dir, "--cache", tmp_path / "cache", "--out", preds))
    written = json.loads(preds.read_text())
    assert written["task"] == "support-reply" and [g["id"] for g in written["golds"]] == ["q1", "q2"]
    scored = ok(invoke("eval", "--task", SPEC, "--golds", EXAMPLE / "data" / "support-reply" / "dev_outputs.json",
                       "--preds", preds))
    assert "rouge-1" in scored.stdout
    pag = invoke("predict", "--task", SPEC, "--data", EXAMPLE / "data", "--method", "pag", "--model",
                 tiny_model_dir, "--out", tmp_path / "pag.json")
    assert "LaMP tasks only" in error_line(pag)
    bad_history = tmp_path / "bad.jsonl"
    bad_history.write_text('{"id": "1", "ticket": "no reply field"}\n')
    line = error_line(invoke("personalize", "--task", SPEC, "--anchor", anchor, "--history", bad_history,
                             "--model", tiny_model_dir, "--out", tmp_path / "x"))
    assert "missing field 'reply'" in line and not (tmp_path / "x").exists()


def test_a_batch_run_registers_the_spec_in_its_worker_processes(tiny_model_dir, hypernet_dir, tmp_path):
    """Workers are new processes that are only told the task's name ("support-reply"): they can resolve it
    because the spec travels to them as data (WorkerSpec.custom_task)."""
    spec_copy = tmp_path / "spec" / "task.toml"
    spec_copy.parent.mkdir()
    shutil.copy(SPEC, spec_copy)
    anchor = tmp_path / "anchor"
    ok(invoke("anchor", "--task", spec_copy, "--hypernet", hypernet_dir, "--model", tiny_model_dir, "--out", anchor))
    items = [json.loads(line) for line in (EXAMPLE / "history.jsonl").read_text().splitlines()]
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps({"user_id": u, "items": items[i:i + 6]}) + "\n"
                             for i, u in enumerate(["maya", "leo"])))
    result = invoke("personalize-batch", "--task", spec_copy, "--anchor", anchor, "--users", users, "--out",
                    tmp_path / "store", "--model", tiny_model_dir, "--workers", "1", "--threads", "1",
                    "--no-progress")
    ok(result)
    for user in ("maya", "leo"):
        report = json.loads((tmp_path / "store" / user / "adapter" / "personalization.json").read_text())
        assert report["task"] == "support-reply"


@pytest.mark.slow
@pytest.mark.encoder
def test_the_example_on_the_default_model(tmp_path):
    """The example README's commands on the real model with the shipped hypernetwork."""
    anchor, user = tmp_path / "anchor", tmp_path / "maya"
    ok(invoke("anchor", "--task", SPEC, "--out", anchor))
    ok(invoke("personalize", "--task", SPEC, "--anchor", anchor, "--history", EXAMPLE / "history.jsonl",
              "--out", user))
    answer = ok(invoke("generate", "--task", SPEC, "--adapter", user, "--input",
                       '{"ticket": "Can I pay by bank transfer?"}'))
    assert len(answer.stdout.strip()) > 0
    print(answer.stdout, file=sys.stderr)


def test_the_server_serves_a_custom_task_file(tiny_model_dir, hypernet_dir, tmp_path):
    import time

    from prisp.personalize import PersonalizeConfig
    from prisp.serve.config import ServeConfig
    from prisp.serve.embedded import serve_in_thread
    from prisp.serve.keys import generate_key

    anchor = tmp_path / "anchor"
    ok(invoke("anchor", "--task", SPEC, "--hypernet", hypernet_dir, "--model", tiny_model_dir, "--out", anchor))
    config = ServeConfig(store=tmp_path / "store", model=str(tiny_model_dir), task_files=(SPEC,), open_registration=True,
                         anchors={"support-reply": anchor}, personalize=PersonalizeConfig(progress=False))
    items = [json.loads(line) for line in (EXAMPLE / "history.jsonl").read_text().splitlines()]
    with serve_in_thread(config, generate_key(), start_timeout=30) as live, live.client() as client:
        user = client.post("/v1/users").json()
        headers = {"Authorization": f"Bearer {user['token']}"}
        started = client.post(f"/v1/users/{user['user_id']}/personalize", headers=headers,
                              json={"task": "support-reply", "items": items})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 60
        while (state := client.get(f"/v1/jobs/{started.json()['job_id']}", headers=headers).json())["status"] \
                not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state["status"] == "succeeded", state
        answer = client.post(f"/v1/users/{user['user_id']}/generate", headers=headers,
                             json={"task": "support-reply", "input": '{"ticket": "Do you ship to Canada?"}'})
        assert answer.status_code == 200, answer.text
        bad = client.post(f"/v1/users/{user['user_id']}/personalize", headers=headers,
                          json={"task": "support-reply", "items": [{"id": "1", "ticket": "no reply"}]})
        assert bad.status_code == 422 and "reply" in bad.text
