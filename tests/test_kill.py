"""Crash safety shown, not argued: the real server as a subprocess, SIGKILLed at chosen points (an adapter
write, a user deletion, a running job, a key rotation), restarted, and checked: every acknowledged adapter
version is readable and intact, nothing half-written is visible, a deleted user stays deleted, an interrupted
job reads ``failed`` with a reason. ``bench/reliability.py`` runs a seeded random version at scale."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from prisp.adapters import LoraSpec, random_init, save_adapter
from prisp.models import load_model
from prisp.serve.auth import issue_token
from prisp.serve.embedded import wait_for_job
from prisp.serve.keys import generate_key
from prisp.serve.process import ServerProcess
from prisp.serve.service import INTERRUPTED
from prisp.serve.store import AdapterStore

pytestmark = pytest.mark.kill  # each test starts several server processes

ITEMS = [{"id": str(i), "text": f"The council met on day {i} and approved the budget.",
          "title": f"Council approves budget, day {i}"} for i in range(3)]


@pytest.fixture(scope="module")
def anchor(tiny_model_dir, tmp_path_factory) -> Path:
    weights = random_init(load_model(str(tiny_model_dir)).model, LoraSpec(), seed=1)
    generator = torch.Generator().manual_seed(1)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 0.05, generator=generator)
    return save_adapter(weights, tmp_path_factory.mktemp("anchor") / "LaMP-4", "tiny")


@pytest.fixture
def server(tmp_path, tiny_model_dir, anchor):
    process = ServerProcess(tmp_path / "store", str(tiny_model_dir), {"LaMP-4": anchor}, generate_key(),
                            issue_token().token, tmp_path / "server.log")
    yield process
    process.kill()


def user_with_adapter(server: ServerProcess) -> tuple[str, dict, int]:
    """A user whose personalization finished (acknowledged: the job reported its version)."""
    with server.client() as client:
        body = client.post("/v1/users", headers=server.admin).json()
        headers = {"Authorization": f"Bearer {body['token']}"}
        job = client.post(f"/v1/users/{body['user_id']}/personalize", headers=headers,
                          json={"task": "LaMP-4", "items": ITEMS}).json()
        state = wait_for_job(client, job["job_id"], headers)
    assert state["status"] == "succeeded", state
    return body["user_id"], headers, state["adapter_version"]


def fire_and_die(server: ServerProcess, method: str, path: str, headers: dict, body: dict | None = None) -> None:
    """Send a request the armed server dies in the middle of (its answer never comes)."""
    with server.client(timeout=60) as client:
        try:
            client.request(method, path, headers=headers, json=body)
        except httpx.TransportError:
            pass
    assert server.wait_dead(), "the server should have died at its crash point"


def store_is_clean(server: ServerProcess) -> None:
    """Every row points at a file that opens; no file lies outside the rows (after the restart's recovery)."""
    with AdapterStore(server.store, server.key, writer=False) as store:
        referenced = set()
        for user_id, _ in store.users():
            for record in store.adapters(user_id):
                store.load(record)  # intact: decrypts and parses, or this raises
                referenced.add(server.store / record.file)
    on_disk = {p for p in (server.store / "users").rglob("*") if p.is_file()}
    assert on_disk == referenced, on_disk ^ referenced


@pytest.mark.parametrize("point", ["save:file-written", "save:row-committed"])
def test_killed_during_an_adapter_write(server, point):
    assert server.start()
    user, headers, acked = user_with_adapter(server)
    server.stop()
    assert server.start(fault=point)
    with server.client() as client:
        job = client.post(f"/v1/users/{user}/update", headers=headers, json={"task": "LaMP-4", "items": ITEMS})
    assert server.wait_dead()
    assert server.start()
    with server.client() as client:
        state = client.get(f"/v1/jobs/{job.json()['job_id']}", headers=headers).json()
        assert state["status"] == "failed" and state["error"] == INTERRUPTED
        answer = client.post(f"/v1/users/{user}/generate", headers=headers, json={"task": "LaMP-4",
                                                                                "input": "Budget news"})
        version = answer.json()["adapter_version"]
    # Before the commit the acknowledged version stays current; after it, the new one is whole and current.
    assert version == (acked if point == "save:file-written" else acked + 1)
    server.stop()
    store_is_clean(server)


def test_killed_during_a_user_deletion(server):
    assert server.start()
    user, headers, _ = user_with_adapter(server)
    kept, kept_headers, kept_version = user_with_adapter(server)
    server.stop()
    assert server.start(fault="delete:rows-deleted")
    fire_and_die(server, "DELETE", f"/v1/users/{user}", server.admin)
    assert server.start()
    with server.client() as client:
        assert client.delete(f"/v1/users/{user}", headers=server.admin).status_code == 404  # stays deleted
        assert client.post(f"/v1/users/{user}/generate", headers=headers,
                           json={"task": "LaMP-4", "input": "x"}).status_code == 401
        assert user not in client.get("/v1/users", headers=server.admin).text
        answer = client.post(f"/v1/users/{kept}/generate", headers=kept_headers,
                             json={"task": "LaMP-4", "input": "Budget news"}).json()
        assert answer["adapter_version"] == kept_version
    server.stop()
    assert not (server.store / "users" / user).exists()
    store_is_clean(server)


def test_killed_while_a_job_runs(server):
    assert server.start(fault="job:running")
    with server.client() as client:
        body = client.post("/v1/users", headers=server.admin).json()
        headers = {"Authorization": f"Bearer {body['token']}"}
        try:
            job_id = client.post(f"/v1/users/{body['user_id']}/personalize", headers=headers,
                                 json={"task": "LaMP-4", "items": ITEMS}).json()["job_id"]
        except httpx.TransportError:  # the worker started (and died) before the answer went out
            job_id = None
    assert server.wait_dead()
    if job_id is None:  # the accepted job is journalled before it can run: its id is in the store
        with AdapterStore(server.store, server.key, writer=False) as store:
            [job_id] = [r["job_id"] for r in store.job_records() if r["user_id"] == body["user_id"]]
    assert server.start()
    with server.client() as client:
        state = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert state["status"] == "failed" and "interrupted" in state["error"]  # never stuck in running
        retry = client.post(f"/v1/users/{body['user_id']}/personalize", headers=headers,
                            json={"task": "LaMP-4", "items": ITEMS}).json()
        assert wait_for_job(client, retry["job_id"], headers)["status"] == "succeeded"
    server.stop()
    store_is_clean(server)


def test_killed_during_a_key_rotation(server, tmp_path):
    assert server.start()
    users = [user_with_adapter(server) for _ in range(3)]
    server.stop()
    new_key = generate_key()
    killed = server.rotate(new_key, tmp_path / "keys", fault="rotate:one-rewrapped")
    assert killed.returncode != 0
    assert not server.start()  # a half-rotated store: the server refuses to run on one key
    assert "interrupted key rotation" in server.log.read_text()
    server.key = new_key  # given both keys, the server finishes the rotation at start and serves
    assert server.start(previous_key_file=tmp_path / "keys" / "old.key")
    assert "finished the interrupted key rotation: re-wrapped 2 data keys" in server.log.read_text()
    server.stop()
    assert server.start()  # and from now on the new key alone opens it
    with server.client() as client:
        for user, headers, version in users:
            answer = client.post(f"/v1/users/{user}/generate", headers=headers,
                                 json={"task": "LaMP-4", "input": "Budget news"}).json()
            assert answer["adapter_version"] == version
    server.stop()
    store_is_clean(server)
