"""``prisp serve``: keygen, refusing to start without a key, rotate-key, export, and the server itself."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, load_adapter, random_init, save_adapter
from prisp.models import load_model
from prisp.serve.auth import ADMIN_ENV, issue_token

ADMIN = issue_token().token
from prisp.serve.cli import serve_app
from prisp.serve.keys import KEY_ENV, decode_key, generate_key
from prisp.serve.store import AdapterStore, SaveRequest

runner = CliRunner()


def invoke(args: list[str], env: dict | None = None):
    return runner.invoke(serve_app, args, env={KEY_ENV: "", **(env or {})})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture
def filled_store(tmp_path, tiny, tiny_model_dir):
    """A store with one user's LaMP-4 adapter; returns (root, key, user, weights)."""
    key = generate_key()
    weights = random_init(tiny.model, LoraSpec(), seed=3)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    with AdapterStore(tmp_path / "store", key) as store:
        issued = issue_token()
        store.create_user(issued.user_id, issued.token_hash)
        store.save(SaveRequest(issued.user_id, "LaMP-4", str(tiny_model_dir), "prisp", 2), weights)
    return tmp_path / "store", key, issued.user_id, weights


def test_keygen_prints_or_writes_a_fresh_key(tmp_path):
    first, second = invoke(["keygen"]), invoke(["keygen"])
    assert first.exit_code == 0 and decode_key(first.stdout.strip(), "stdout").secret
    assert first.stdout != second.stdout
    out = tmp_path / "store.key"
    assert invoke(["keygen", "--out", str(out)]).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and decode_key(out.read_text(), "file")
    again = invoke(["keygen", "--out", str(out)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.stderr


def test_serve_refuses_to_start_without_a_key_or_store(tmp_path, tiny_model_dir):
    result = invoke(["--store", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--random-anchors"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no store key" in result.stderr
    assert not (tmp_path / "s").exists(), "nothing may be created before the key is checked"
    bad = invoke(["--store", str(tmp_path / "s"), "--random-anchors"], env={KEY_ENV: "short"})
    assert bad.exit_code == 2 and KEY_ENV in bad.stderr
    no_store = invoke([], env={KEY_ENV: generate_key().encode()})
    assert no_store.exit_code == 2 and "--store" in no_store.stderr
    no_anchor = invoke(["--store", str(tmp_path / "s"), "--model", str(tiny_model_dir)],
                       env={KEY_ENV: generate_key().encode()})
    assert no_anchor.exit_code == 2 and "no hypernetwork is shipped" in no_anchor.stderr
    assert not (tmp_path / "s").exists()
    both = invoke(["--store", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--random-anchors",
                   "--hypernet", str(tmp_path)], env={KEY_ENV: generate_key().encode()})
    assert both.exit_code == 2 and "applies only without --anchor" in both.stderr


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "0"], "--max-batch must be in 1..256"),
    (["--batch-window-ms", "-5"], "--batch-window-ms must be in 0..1000"),
    (["--max-batch", "16", "--adapter-slots", "8"], "--adapter-slots must be at least --max-batch (16)"),
])
def test_serve_refuses_bad_batching_options(tmp_path, tiny_model_dir, args, message):
    options = ["--store", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--random-anchors", *args]
    result = invoke(options, env={KEY_ENV: generate_key().encode()})
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert message in result.stderr
    assert not (tmp_path / "s").exists(), "nothing may be created for a refused configuration"


def test_serve_command_runs_the_api(tmp_path, tiny_model_dir, tiny, monkeypatch):
    """The bare ``prisp serve`` builds the app from its options and hands it to uvicorn."""
    import uvicorn

    anchor_dir = save_adapter(random_init(tiny.model, LoraSpec(), seed=1), tmp_path / "anchor", "tiny")
    seen = {}

    def fake_run(app, host, port, **kwargs):  # serve on a free port instead, and exercise the app once
        engine = app.state.service.engine
        seen.update(host=host, port=port,
                    batching=(engine.batch_window_ms, engine.max_batch, engine.slots.capacity))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        seen["health"] = httpx.get(f"{url}/healthz").json()
        server.should_exit = True
        thread.join(timeout=30)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    key = generate_key().encode()
    result = invoke(["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "--port", "8123",
                     "--anchor", f"lamp_4={anchor_dir}", "--batch-window-ms", "2.5", "--max-batch", "4",
                     "--adapter-slots", "6", "--open-registration"], env={KEY_ENV: key})
    assert result.exit_code == 0, result.stderr
    assert "--open-registration: anyone who reaches the port can create users" in result.stderr
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["batching"] == (2.5, 4, 6)
    assert seen["health"]["tasks"] == ["LaMP-4"]
    assert (tmp_path / "store" / "store.sqlite3").is_file()


def test_rotate_key_command(tmp_path, filled_store):
    root, key, user, _ = filled_store
    new_file = tmp_path / "new.key"
    assert invoke(["keygen", "--out", str(new_file)]).exit_code == 0
    old_file = tmp_path / "old.key"
    old_file.write_text(key.encode())
    result = invoke(["rotate-key", "--store", str(root), "--old-key-file", str(old_file), "--new-key-file",
                     str(new_file)])
    assert result.exit_code == 0, result.stderr
    assert "re-wrapped 1 data keys" in result.stdout
    refused = invoke(["export", "--store", str(root), "--user", user, "--task", "LaMP-4", "--out",
                      str(tmp_path / "x"), "--key-file", str(old_file)])
    assert refused.exit_code == 2 and "does not open store" in refused.stderr
    same = invoke(["rotate-key", "--store", str(root), "--key-file", str(new_file), "--new-key-file",
                   str(new_file)])
    assert same.exit_code == 2 and "new key is the current key" in same.stderr


def test_export_writes_a_plain_peft_adapter(tmp_path, filled_store):
    root, key, user, weights = filled_store
    out = tmp_path / "exported"
    result = invoke(["export", "--store", str(root), "--user", user, "--task", "lamp-4", "--out", str(out)],
                    env={KEY_ENV: key.encode()})
    assert result.exit_code == 0, result.stderr
    exported = load_adapter(out)
    assert exported.spec == weights.spec
    for k, pair in weights.pairs.items():
        assert torch.equal(exported.pairs[k].A, pair.A) and torch.equal(exported.pairs[k].B, pair.B)
    assert (out / "prisp_export.json").is_file()
    missing = invoke(["export", "--store", str(root), "--user", user, "--task", "LaMP-7", "--out",
                      str(tmp_path / "y")], env={KEY_ENV: key.encode()})
    assert missing.exit_code == 2 and "has no adapter for LaMP-7" in missing.stderr
    not_store = invoke(["export", "--store", str(tmp_path), "--user", user, "--task", "LaMP-4", "--out",
                        str(tmp_path / "z")], env={KEY_ENV: key.encode()})
    assert not_store.exit_code == 2 and "not a prisp store" in not_store.stderr


@pytest.mark.slow
def test_real_server_process_with_the_default_model(tmp_path):
    """A real ``prisp serve`` process on the default model: personalize, update, generate, delete."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, KEY_ENV: generate_key().encode(), "PRISP_THREADS": "1", ADMIN_ENV: ADMIN}
    entry = "from prisp.serve.cli import serve_app; serve_app(prog_name='prisp serve')"
    command = [sys.executable, "-c", entry, "--store", str(tmp_path / "store"), "--random-anchors",
               "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        with httpx.Client(base_url=url, timeout=600) as client:
            _exercise(client)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-2000:]


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


def _exercise(client: httpx.Client) -> None:
    assert client.post("/v1/users").status_code == 401  # creating users takes the admin token
    user = client.post("/v1/users", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    headers = {"Authorization": f"Bearer {user['token']}"}
    base = f"/v1/users/{user['user_id']}"
    items = [{"id": str(i), "text": f"The council met on day {i} and approved the budget.",
              "title": f"Council approves budget, day {i}"} for i in range(2)]
    for kind, expected in (("personalize", 1), ("update", 2)):
        job = client.post(f"{base}/{kind}", json={"task": "LaMP-4", "items": items}, headers=headers).json()
        state = _wait_job(client, job["job_id"], headers)
        assert state["status"] == "succeeded" and state["adapter_version"] == expected, state
    answer = client.post(f"{base}/generate", json={"task": "LaMP-4", "input": "The mayor opened a new park."},
                         headers=headers).json()
    assert answer["adapter_version"] == 2 and isinstance(answer["output"], str)
    assert client.delete(base, headers=headers).json()["adapters_removed"] == 1


def _wait_job(client: httpx.Client, job_id: str, headers: dict) -> dict:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if state["status"] in ("succeeded", "failed"):
            return state
        time.sleep(1)
    raise AssertionError("job did not finish")


def test_help_lists_the_commands():
    result = invoke(["--help"])
    assert result.exit_code == 0
    for word in ("keygen", "rotate-key", "export", "--store", "--anchor"):
        assert word in result.stdout


def test_without_anchor_options_every_task_gets_its_anchor_from_text_once(tmp_path, tiny_model_dir,
                                                                           tiny_hypernet_dir):
    """The README's bare `prisp serve --store DIR` path: anchors from each task's description, cached."""
    from prisp.data.tasks import TASKS
    from prisp.hypernet.anchor import Anchorer
    from prisp.serve.config import ServeConfig
    from prisp.serve.embedded import serve_in_thread

    config = ServeConfig(store=tmp_path / "store", model=str(tiny_model_dir), hypernet=tiny_hypernet_dir,
                         open_registration=True)
    assert config.text_anchors
    key = generate_key()
    with serve_in_thread(config, key, start_timeout=60) as live:
        first = dict(live.service.anchors)
    assert set(first) == set(TASKS)
    cache = [p for p in (Path(os.environ["PRISP_HOME"]) / "anchors").iterdir()
             if (p / "adapter_config.json").is_file()]
    assert len(cache) >= len(TASKS)
    expected = Anchorer.load(tiny_hypernet_dir, str(tiny_model_dir)).generate(TASKS["LaMP-4"].description).weights
    assert all(torch.equal(t, first["LaMP-4"].to_peft_state_dict()[k])
               for k, t in expected.to_peft_state_dict().items())
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    with serve_in_thread(config, key, start_timeout=60) as live:  # a restart reads them back, generates nothing
        second = live.service.anchors
        assert all(torch.equal(first[t].to_peft_state_dict()[k], v)
                   for t in first for k, v in second[t].to_peft_state_dict().items())
    assert stamps == {p: p.stat().st_mtime_ns for p in cache}


def test_admin_token_command_writes_only_the_hash(tmp_path):
    from prisp.errors import PrispError
    from prisp.serve.auth import hash_token, load_admin_hash

    out = tmp_path / "admin.hash"
    result = invoke(["admin-token", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("prisp_") and token not in out.read_text()
    assert out.read_text() == f"sha256:{hash_token(token)}\n" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert load_admin_hash(out) == hash_token(token)
    assert load_admin_hash(None, {ADMIN_ENV: token}) == hash_token(token)
    assert load_admin_hash(None, {}) is None
    assert invoke(["admin-token", "--out", str(out)]).exit_code == 2  # never overwritten
    with pytest.raises(PrispError, match="at least 32"):
        load_admin_hash(None, {ADMIN_ENV: "short"})
    bad = tmp_path / "bad.hash"
    bad.write_text(token)  # the token itself instead of its hash
    with pytest.raises(PrispError, match="sha256:<64 hex digits>"):
        load_admin_hash(bad)
