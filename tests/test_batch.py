"""Batch personalization: users files, job keys and seeds, retries, and the local and Ray backends.

The two backend runs (a 2-worker process pool and a 2-actor local Ray cluster) are module fixtures
shared by the tests that inspect them, because starting workers costs far more than the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from dataclasses import replace

import pytest
import torch
import typer
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, load_adapter, random_init, save_adapter
from prisp.batch import (
    BatchConfig,
    DirectoryStore,
    UserOutcome,
    WorkerContext,
    WorkerPlan,
    WorkerSpec,
    load_users,
    run_batch,
    user_seed,
)
from prisp.batch.cli import export_app, personalize_batch_command
from prisp.data.locations import SAMPLE_DIR
from prisp.errors import DataError, PrispError
from prisp.models import load_model
from prisp.personalize import PersonalizeConfig, personalize

GOOD = ["LaMP-4-dev-0", "LaMP-4-dev-1", "LaMP-4-dev-2"]
TRAINING = ("--max-length", "128", "--threads", "1", "--seed", "7", "--no-progress")

app = typer.Typer()
app.command("personalize-batch")(personalize_batch_command)
app.add_typer(export_app, name="export")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def anchor_dir(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir))
    return save_adapter(random_init(loaded.model, LoraSpec(), seed=0), tmp_path_factory.mktemp("anchor"),
                        str(tiny_model_dir))


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    """Three good users (4 items each, to keep training short), one malformed history, one empty."""
    questions = json.loads((SAMPLE_DIR / "LaMP-4" / "dev_questions.json").read_text())
    path = tmp_path_factory.mktemp("users") / "users.jsonl"
    lines = [{"user_id": q["id"], "items": q["profile"][:4]} for q in questions[:3]]
    lines += [{"user_id": "bad", "items": [{"id": "x", "text": "an item without its title"}]},
              {"user_id": "empty", "items": []}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _batch(tiny_model_dir, anchor_dir, users_file, out, *extra):
    return invoke("personalize-batch", "--task", "LaMP-4", "--anchor", anchor_dir, "--users", users_file,
                  "--out", out, "--model", tiny_model_dir, "--workers", "2", *TRAINING, *extra)


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, anchor_dir, users_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    return out, _batch(tiny_model_dir, anchor_dir, users_file, out)


@pytest.fixture(scope="module")
def ray_run(tiny_model_dir, anchor_dir, users_file, tmp_path_factory):
    import ray  # noqa: F401  (a dependency: the Ray backend must be tested, never skipped)
    out = tmp_path_factory.mktemp("ray") / "store"
    return out, _batch(tiny_model_dir, anchor_dir, users_file, out, "--backend", "ray")


def _records(store, status=None):
    records = [r for r in DirectoryStore(store).read_log() if r["type"] == "user"]
    return [r for r in records if status is None or r["status"] == status]


def _tensors(store, user):
    return DirectoryStore(store).get(user).weights.to_peft_state_dict()


def test_local_pool_trains_good_users_and_a_bad_history_fails_alone(local_run):
    store, result = local_run
    assert result.exit_code == 1, result.output  # partial failure is visible to scripts
    assert "5 users: 3 done, 0 skipped, 2 failed" in result.stdout
    assert "peak memory per worker (MB)" in result.stdout
    assert DirectoryStore(store).user_ids() == GOOD
    failed = {r["user_id"]: r["error"] for r in _records(store, "failed")}
    assert "missing field 'title'" in failed["bad"] and "history is empty" in failed["empty"]
    done = _records(store, "done")
    assert sorted(r["user_id"] for r in done) == GOOD and all(r["attempts"] == 1 for r in done)
    report = DirectoryStore(store).get(GOOD[0]).report
    assert report["seed"] == user_seed(7, GOOD[0]) and report["threads"] == 1 and report["job_key"]


@pytest.mark.ray  # starts a local Ray cluster
def test_ray_backend_gives_the_same_adapters_bit_for_bit(local_run, ray_run):
    (local_store, _), (ray_store, result) = local_run, ray_run
    assert result.exit_code == 1, result.output
    assert "5 users: 3 done, 0 skipped, 2 failed" in result.stdout
    for user in GOOD:
        local, ray = _tensors(local_store, user), _tensors(ray_store, user)
        assert local.keys() == ray.keys()
        assert all(torch.equal(local[k], ray[k]) for k in local), user


def test_a_worker_matches_personalizing_in_process(local_run, tiny_model_dir, anchor_dir, users_file):
    store, _ = local_run
    users = load_users(users_file, "LaMP-4")
    loaded = load_model(str(tiny_model_dir))
    job = users.jobs[1]
    config = PersonalizeConfig(max_length=128, seed=user_seed(7, job.user_id), progress=False)
    result = personalize(loaded.model, loaded.tokenizer, load_adapter(anchor_dir), "LaMP-4", job.items, config,
                         users.labels)
    stored = _tensors(store, job.user_id)
    assert all(torch.equal(t, stored[k]) for k, t in result.weights.to_peft_state_dict().items())


def test_rerun_skips_finished_users_without_starting_workers(local_run, tiny_model_dir, anchor_dir, users_file,
                                                             tmp_path):
    store = tmp_path / "store"
    shutil.copytree(local_run[0], store)
    before = {u: (store / u / "adapter" / "adapter_model.safetensors").read_bytes() for u in GOOD}
    result = _batch(tiny_model_dir, anchor_dir, users_file, store)
    assert "5 users: 0 done, 3 skipped, 2 failed" in result.stdout, result.output
    assert {u: (store / u / "adapter" / "adapter_model.safetensors").read_bytes() for u in GOOD} == before
    run_ids = {r["run_id"] for r in _records(store)}
    assert len(run_ids) == 2 and len(_records(store, "skipped")) == 3


class InlineBackend:
    """Runs jobs in this process, optionally failing some attempts, to test the runner's policy."""

    capacity = 2

    def __init__(self, spec, failures=None):
        self.context = WorkerContext(spec)
        self.failures = failures or {}  # user_id -> list of outcomes to return before running for real
        self.queue = deque()
        self.attempts = {}

    def submit(self, job):
        self.queue.append(job)

    def next_outcome(self):
        job = self.queue.popleft()
        self.attempts[job.user_id] = self.attempts.get(job.user_id, 0) + 1
        scripted = self.failures.get(job.user_id)
        if scripted:
            return job, scripted.pop(0)
        return job, self.context.run(job)

    def close(self):
        pass


def _config(tiny_model_dir, **changes):
    training = PersonalizeConfig(max_length=128, seed=7, progress=False)
    return replace(BatchConfig(task="LaMP-4", model=str(tiny_model_dir), threads=1, personalize=training),
                   **changes)


def test_transient_failures_are_retried_a_bounded_number_of_times(tiny_model_dir, anchor_dir, users_file,
                                                                  tmp_path):
    users = load_users(users_file, "LaMP-4")
    flaky, doomed, broken = GOOD
    failures = {flaky: [UserOutcome(flaky, error="worker died")],
                doomed: [UserOutcome(doomed, error="worker died") for _ in range(3)],
                broken: [UserOutcome(broken, error="bad data", permanent=True)]}
    made = {}

    def factory(spec, plan):
        made["backend"] = InlineBackend(spec, failures)
        return made["backend"]

    store = DirectoryStore(tmp_path / "store")
    summary = run_batch(_config(tiny_model_dir, retries=2), users, store, load_adapter(anchor_dir),
                        progress=False, backend_factory=factory)
    assert (summary.done, summary.failed) == (1, 4)
    assert made["backend"].attempts == {flaky: 2, doomed: 3, broken: 1}
    assert summary.failures[doomed] == "worker died" and summary.failures[broken] == "bad data"
    assert [r["attempts"] for r in _records(store.root, "retry") if r["user_id"] == doomed] == [1, 2]


def test_changed_inputs_are_redone_and_a_fatal_start_stops_the_run(tiny_model_dir, anchor_dir, users_file,
                                                                   tmp_path):
    users = load_users(users_file, "LaMP-4")
    anchor = load_adapter(anchor_dir)
    store = DirectoryStore(tmp_path / "store")
    run = _inline_runner(users, store, anchor)
    assert run(_config(tiny_model_dir)).done == 3
    assert run(_config(tiny_model_dir)).skipped == 3
    new_seed = _config(tiny_model_dir, personalize=PersonalizeConfig(max_length=128, seed=8, progress=False))
    assert run(new_seed).done == 3  # another run seed: stale adapters are replaced, not kept

    def fatal(spec, plan):
        backend = InlineBackend(spec)
        backend.context.run = lambda job: UserOutcome(job.user_id, error="worker could not start: boom",
                                                       fatal=True)
        return backend

    with pytest.raises(PrispError, match="worker could not start: boom"):
        run_batch(_config(tiny_model_dir, retries=0), users, DirectoryStore(tmp_path / "other"), anchor,
                  progress=False, backend_factory=fatal)


def _inline_runner(users, store, anchor):
    def run(config, sink=None):
        return run_batch(config, users, sink or store, anchor, progress=False,
                         backend_factory=lambda spec, plan: InlineBackend(spec))

    return run


def test_batch_writes_into_the_encrypted_serving_store(tiny_model_dir, anchor_dir, tmp_path, monkeypatch):
    import prisp.serve.store as serve_store
    from prisp.batch import SealedStoreSink, export_vllm, open_store
    from prisp.serve.auth import issue_token
    from prisp.serve.keys import generate_key

    key, root = generate_key(), tmp_path / "sealed"
    issued = [issue_token(), issue_token()]
    with serve_store.AdapterStore(root, key) as store:  # users exist because the server issued them
        for user in issued:
            store.create_user(user.user_id, user.token_hash)
    items = json.loads((SAMPLE_DIR / "LaMP-4" / "dev_questions.json").read_text())[0]["profile"][:3]
    stranger = "u_" + "0" * 32
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps({"user_id": u, "items": items}) + "\n"
                            for u in [issued[0].user_id, issued[1].user_id, stranger]))
    users, anchor = load_users(path, "LaMP-4"), load_adapter(anchor_dir)
    run = _inline_runner(users, None, anchor)
    with SealedStoreSink(root, key, "LaMP-4") as sink:
        first = run(_config(tiny_model_dir), sink)
    assert (first.done, first.failed) == (2, 1) and "does not exist" in first.failures[stranger]
    with SealedStoreSink(root, key, "LaMP-4") as sink:
        assert run(_config(tiny_model_dir), sink).skipped == 2  # the ledger beside the store remembers
    ids = sorted(u.user_id for u in issued)
    monkeypatch.setenv("PRISP_STORE_KEY", key.encode())
    with open_store(root, "LaMP-4", writer=False) as source:  # detected as encrypted; key from the environment
        assert isinstance(source, SealedStoreSink)
        assert source.user_ids() == ids
        result = export_vllm(source, tmp_path / "vllm")
        stored = source.get(ids[0]).weights.to_peft_state_dict()
    assert result.names == ids
    exported = load_adapter(tmp_path / "vllm" / ids[0]).to_peft_state_dict()
    assert all(torch.equal(exported[k], stored[k]) for k in stored)
    # Deleting a user from the store also drops their lines from the batch ledger beside it.
    from prisp.files import JsonlLog
    from prisp.serve.store import AdapterStore, batch_ledger_path

    ledger = JsonlLog(batch_ledger_path(root))
    assert any(r.get("user_id") == ids[0] for r in ledger)
    with AdapterStore(root, key) as store:
        assert store.delete_user(ids[0])
    assert not any(r.get("user_id") == ids[0] for r in ledger) and any(r.get("user_id") == ids[1] for r in ledger)


def test_worker_reports_errors_instead_of_raising(tiny_model_dir, anchor_dir, users_file):
    from prisp.batch import Assignment

    users = load_users(users_file, "LaMP-4")
    spec = WorkerSpec(str(tiny_model_dir), str(tiny_model_dir), load_adapter(anchor_dir), "LaMP-4", users.labels, 1)
    context = WorkerContext(spec)
    outcome = context.run(Assignment("u", (), PersonalizeConfig(progress=False)))
    assert not outcome.ok and outcome.permanent and "history is empty" in outcome.error
    good = context.run(Assignment("u", users.jobs[0].items[:2], PersonalizeConfig(max_length=64, progress=False)))
    assert good.ok and good.weights is not None and good.report["examples"] >= 2


def test_lamp_questions_file_groups_users_and_isolates_a_bad_record(tmp_path):
    from prisp.data.lamp import load_split

    source = SAMPLE_DIR / "LaMP-2N" / "dev_questions.json"
    users = load_users(source, "LaMP-2N")
    grouped = load_split(source, None, "LaMP-2N").users
    assert [j.user_id for j in users.jobs] == list(grouped) and not any(j.error for j in users.jobs)
    assert len(users.labels) > 1  # LaMP-2N reads its categories from the questions
    questions = json.loads(source.read_text())
    questions[0]["profile"][0].pop("category")
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    users = load_users(path, "LaMP-2N")
    bad = [j for j in users.jobs if j.error]
    assert len(bad) == 1 and bad[0].user_id == questions[0]["id"] and "category" in bad[0].error
    (path.parent / "rest.json").write_text(json.dumps(questions[1:]))
    rest = load_split(path.parent / "rest.json", None, "LaMP-2N").users  # every other record still forms users
    assert [j.user_id for j in users.jobs if not j.error] == list(rest)


@pytest.mark.parametrize("text, message", [
    ('{"user_id": "a", "items": []}\nnot json\n', "users.jsonl:2: not valid JSON"),
    ('{"user_id": "a", "items": []}\n{"user_id": "a", "items": []}\n', "duplicate user_id 'a'"),
    ('{"items": []}\n', "expected an object with 'user_id'"),
    ("\n", "holds no users"),
])
def test_broken_users_files_stop_with_one_line(tmp_path, text, message):
    path = tmp_path / "users.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_users(path, "LaMP-4")


def test_unsafe_user_ids_fail_alone(tmp_path):
    path = tmp_path / "users.jsonl"
    item = {"id": "i", "text": "t", "title": "h"}
    path.write_text("".join(json.dumps({"user_id": u, "items": [item]}) + "\n" for u in ["ok-1", "../x", ".hidden", "results.jsonl"]))
    jobs = {j.user_id: j for j in load_users(path, "LaMP-4").jobs}
    assert jobs["ok-1"].error is None
    assert all("cannot name a directory" in jobs[u].error for u in ["../x", ".hidden", "results.jsonl"])


def test_user_seeds_and_worker_plans():
    assert user_seed(0, "u1") == user_seed(0, "u1")
    assert len({user_seed(0, "u1"), user_seed(0, "u2"), user_seed(1, "u1")}) == 3
    assert BatchConfig(task="LaMP-4").plan(cores=8) == WorkerPlan(8, 1)
    assert BatchConfig(task="LaMP-4", workers=2).plan(cores=8) == WorkerPlan(2, 4)
    assert BatchConfig(task="LaMP-4", workers=4).plan(cores=2) == WorkerPlan(4, 1)
    assert BatchConfig(task="LaMP-4", threads=2).plan(cores=8) == WorkerPlan(4, 2)
    for bad, option in [({"workers": 0}, "--workers"), ({"backend": "slurm"}, "--backend"),
                        ({"retries": -1}, "--retries"), ({"ray_address": "auto"}, "--ray-address")]:
        with pytest.raises(PrispError, match=option):
            BatchConfig(task="LaMP-4", **bad)


def test_cli_refuses_bad_input_with_one_line(tiny_model_dir, anchor_dir, tmp_path):
    result = invoke("personalize-batch", "--task", "LaMP-4", "--anchor", anchor_dir, "--users", tmp_path / "nope",
                    "--out", tmp_path / "s", "--model", tiny_model_dir)
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("prisp: error: users file")
    result = invoke("personalize-batch", "--task", "LaMP-4", "--anchor", tmp_path, "--users", tmp_path / "nope",
                    "--out", tmp_path / "s", "--backend", "slurm")
    assert result.exit_code == 2 and "--backend must be one of local, ray" in result.stderr


class _EnvProbe:
    """A job that reports whether the worker process can see the store key."""

    user_id = "probe"

    def execute(self, context, outcome) -> None:
        outcome.report = {"key_visible": bool(os.environ.get("PRISP_STORE_KEY"))}


def test_workers_never_see_the_store_key(tiny_model_dir, anchor_dir, monkeypatch):
    from prisp.batch.backends import LocalBackend
    from prisp.batch.worker import WorkerSpec
    from prisp.serve.keys import drop_key_from_environment

    monkeypatch.setenv("PRISP_STORE_KEY", "a-key-the-workers-must-not-see")
    backend = LocalBackend(WorkerSpec(str(tiny_model_dir), None, load_adapter(anchor_dir), "LaMP-4", (), 1), 1)
    try:  # the pool starts while the driver still has the key: the worker initializer drops it
        backend.submit(_EnvProbe())
        _, outcome = backend.next_outcome()
    finally:
        backend.close()
    assert outcome.error is None and outcome.report == {"key_visible": False}
    assert drop_key_from_environment() and "PRISP_STORE_KEY" not in os.environ
    assert not drop_key_from_environment()


class _AnchorProbe:
    """A job that reports the anchors its worker received."""

    user_id = "probe"

    def execute(self, context, outcome) -> None:
        spec = context.spec
        outcome.report = {name: float(sum(p.A.sum() for p in spec.anchor_named(name).pairs.values()))
                          for name in sorted(spec.anchors)}


def test_workers_receive_more_anchor_tensors_than_a_fork_server_can_pass_as_fds(tiny_model_dir, anchor_dir):
    """A fork server passes at most 256 file descriptors per new process, and torch shares each tensor of a
    pickled spec as one; the bench's Figure 8 pool (three wordings' anchors plus the task anchor, 120 tensors
    each on the default model) failed with "too many fds". The spec travels as one blob instead."""
    from prisp.adapters import LoraSpec, random_init
    from prisp.batch.backends import LocalBackend
    from prisp.batch.worker import WorkerSpec
    from prisp.models import load_model

    model = load_model(str(tiny_model_dir)).model
    anchors = {f"a{i}": random_init(model, LoraSpec(), seed=i) for i in range(80)}
    assert sum(2 * len(w.pairs) for w in anchors.values()) > 256
    backend = LocalBackend(WorkerSpec(str(tiny_model_dir), None, load_adapter(anchor_dir), "LaMP-4", (), 1,
                                      anchors=anchors), 1)
    try:
        backend.submit(_AnchorProbe())
        _, outcome = backend.next_outcome()
    finally:
        backend.close()
    assert outcome.error is None
    assert outcome.report == pytest.approx({name: float(sum(p.A.sum() for p in w.pairs.values()))
                                            for name, w in sorted(anchors.items())})
