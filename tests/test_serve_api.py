"""The HTTP API against a real uvicorn server on 127.0.0.1: isolation, fail-closed, deletion, limits, fuzz."""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prisp.adapters import LoraSpec, LoraWeights, attach_lora, random_init, save_adapter
from prisp.data.prompts import query_prompt
from prisp.data.tasks import get_task, label_set
from prisp.errors import PrispError
from prisp.generation import GenerationConfig, generate
from prisp.models import load_model
from prisp.personalize import PersonalizeConfig
from prisp.scoring import score_labels
from prisp.serve.auth import hash_token, issue_token
from prisp.serve.config import ServeConfig, ServeLimits
from prisp.serve.embedded import EmbeddedServer, serve_in_thread, wait_for_job
from prisp.serve.keys import generate_key
from prisp.serve.service import PrispService
from prisp.serve.store import DB_NAME, SaveRequest

LIMITS = ServeLimits(max_body_bytes=64_000, max_items=20, max_text_chars=2_000, max_input_chars=2_000,
                     max_new_tokens=12)
TEXT = "The city council approved the new budget after a long debate."

ADMIN = issue_token().token  # the servers of this module run with an admin token; users are created with it
ADMIN_HASH = hash_token(ADMIN)
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def lamp4_items(n: int, tag: str = "") -> list[dict]:
    return [{"id": f"{tag}{i}", "text": f"Article {i} {tag}: {TEXT}", "title": f"Budget news {i} {tag}",
             "date": f"2020-01-{i + 1:02d}"} for i in range(n)]


def noisy_anchor(model, seed: int) -> LoraWeights:
    """A random anchor with non-zero B, so it visibly changes what the tiny model generates."""
    weights = random_init(model, LoraSpec(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 0.5, generator=generator)
    return weights


def start_server(config: ServeConfig, key) -> EmbeddedServer:  # the tiny model loads fast
    return serve_in_thread(config, key, start_timeout=30)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def anchors(tmp_path_factory, tiny, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anchors")
    out = {}
    for seed, task in enumerate(("LaMP-4", "LaMP-7", "LaMP-1"), start=1):
        out[task] = save_adapter(noisy_anchor(tiny.model, seed), root / task, str(tiny_model_dir))
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir, anchors):
    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path_factory.mktemp("serve") / "store",
                         model=str(tiny_model_dir),
                         anchors=anchors, limits=LIMITS,
                         personalize=PersonalizeConfig(lr=1e-2, progress=False))
    server = start_server(config, generate_key())
    yield server
    server.stop()


@pytest.fixture
def client(live):
    with live.client() as c:
        yield c


def new_user(client) -> tuple[str, dict]:
    response = client.post("/v1/users", headers=ADMIN_HEADERS)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["user_id"], {"Authorization": f"Bearer {body['token']}"}


def run_job(client, user: str, headers: dict, items: list[dict], kind: str = "personalize",
            task: str = "LaMP-4") -> dict:
    response = client.post(f"/v1/users/{user}/{kind}", json={"task": task, "items": items}, headers=headers)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], headers, timeout=60)


def ask(client, user, headers, text=TEXT, task="LaMP-4") -> dict:
    response = client.post(f"/v1/users/{user}/generate", json={"task": task, "input": text}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def reference(tiny, weights: LoraWeights, text: str = TEXT, task: str = "LaMP-4") -> str:
    """What a plain peft model with ``weights`` answers, computed outside the server."""
    model = attach_lora(copy.deepcopy(tiny.model), weights).eval()
    budget = min(get_task(task).max_new_tokens, LIMITS.max_new_tokens)
    prompt = query_prompt(task, text, label_set(task, [text]))
    config = GenerationConfig(max_new_tokens=budget, batch_size=1)
    return generate(model, tiny.tokenizer, [prompt], config).texts[0]


CITATION = ('For an author who has written the paper with the title "Budget rules for city councils", which '
            'reference is related? Just answer with [1] or [2] without explanation. [1]: "Municipal finance '
            'and debate" [2]: "Deep learning for protein folding"')


def test_decode_labels_answers_with_the_most_likely_label(live, client, tiny):
    """``decode`` in the request: labels by default on a label task, free on request, refused where it cannot be."""
    user, headers = new_user(client)
    anchor = live.service.anchors["LaMP-1"]
    model = attach_lora(copy.deepcopy(tiny.model), anchor).eval()
    prompt = query_prompt("LaMP-1", CITATION, label_set("LaMP-1", [CITATION]))
    expected = score_labels(model, tiny.tokenizer, [prompt], label_set("LaMP-1")).choices[0]
    url = f"/v1/users/{user}/generate"
    for decode in ("labels", None):  # None: the task's default, labels on LaMP-1
        body = {"task": "LaMP-1", "input": CITATION} | ({"decode": decode} if decode else {})
        response = client.post(url, json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"output": expected, "adapter_version": None}
    free = client.post(url, json={"task": "LaMP-1", "input": CITATION, "decode": "free"}, headers=headers)
    assert free.status_code == 200 and free.json()["output"] == reference(tiny, anchor, CITATION, "LaMP-1")
    refused = client.post(url, json={"task": "LaMP-4", "input": TEXT, "decode": "labels"}, headers=headers)
    assert refused.status_code == 422 and "generation task" in refused.json()["detail"]
    bogus = client.post(url, json={"task": "LaMP-1", "input": CITATION, "decode": "beam"}, headers=headers)
    assert bogus.status_code == 422 and "decode" in bogus.json()["detail"]


def stored(live, user: str, task: str = "LaMP-4") -> LoraWeights:
    return live.service.store.load(live.service.store.current(user, task))


def same_weights(a: LoraWeights, b: LoraWeights) -> bool:
    return a.pairs.keys() == b.pairs.keys() and all(
        torch.equal(a.pairs[k].A, b.pairs[k].A) and torch.equal(a.pairs[k].B, b.pairs[k].B) for k in a.pairs)


# ---- the happy path ----------------------------------------------------------------------------


def test_health_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["tasks"] == ["LaMP-1", "LaMP-4", "LaMP-7"]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/users", "/v1/users/{user_id}/personalize", "/v1/jobs/{job_id}",
                 "/v1/users/{user_id}/update", "/v1/users/{user_id}/generate", "/v1/users/{user_id}",
                 "/v1/users/{user_id}/adapters", "/healthz"):
        assert path in paths


def test_personalize_then_generate_uses_the_users_adapter(live, client, tiny, anchors):
    user, headers = new_user(client)
    before = ask(client, user, headers)
    assert before["adapter_version"] is None
    assert before["output"] == reference(tiny, live.service.anchors["LaMP-4"])
    state = run_job(client, user, headers, lamp4_items(4))
    assert state["status"] == "succeeded", state
    assert state["adapter_version"] == 1 and state["kind"] == "personalize"
    after = ask(client, user, headers)
    assert after["adapter_version"] == 1
    weights = stored(live, user)
    assert not same_weights(weights, live.service.anchors["LaMP-4"])
    assert after["output"] == reference(tiny, weights)
    record = live.service.store.current(user, "LaMP-4")
    assert (record.items, record.total_items, record.updates, record.strategy) == (4, 4, 0, "prisp")


def test_update_refines_the_current_adapter(live, client, monkeypatch):
    import prisp.serve.service as service_module

    user, headers = new_user(client)
    assert client.post(f"/v1/users/{user}/update", json={"task": "LaMP-4", "items": lamp4_items(1)},
                       headers=headers).status_code == 409  # nothing to update yet
    assert run_job(client, user, headers, lamp4_items(3))["adapter_version"] == 1
    v1, v1_file = stored(live, user), live.service.store.current(user, "LaMP-4").file
    starts = []
    real = service_module.personalize

    def spy(base, tokenizer, anchor, *args, **kwargs):
        starts.append(anchor)
        return real(base, tokenizer, anchor, *args, **kwargs)

    monkeypatch.setattr(service_module, "personalize", spy)
    state = run_job(client, user, headers, lamp4_items(2, tag="new"), kind="update")
    assert state["status"] == "succeeded" and state["adapter_version"] == 2 and state["kind"] == "update"
    assert same_weights(starts[0], v1), "an update must start from the user's current adapter, not the anchor"
    v2 = stored(live, user)
    assert not same_weights(v2, v1)
    for key in v1.pairs:  # prisp keeps A frozen: the update refined B (and C, folded into B) only
        assert torch.equal(v2.pairs[key].A, v1.pairs[key].A)
    assert not (live.service.store.root / v1_file).exists(), "the old version must be gone"
    assert all(k[2] == 2 for k in live.service.cache.keys() if k[0] == user)
    record = live.service.store.current(user, "LaMP-4")
    assert (record.version, record.items, record.total_items, record.updates) == (2, 2, 5, 1)
    assert ask(client, user, headers)["adapter_version"] == 2


def test_concurrent_users_get_their_own_adapters(live, client, tiny):
    users = [new_user(client) for _ in range(3)]
    expected = {}
    for seed, (user, _) in enumerate(users, start=10):
        weights = noisy_anchor(tiny.model, seed)  # distinct, strongly different adapters
        live.service.store.save(SaveRequest(user, "LaMP-4", live.service.model_name, "prisp", 1), weights)
        expected[user] = reference(tiny, weights)
    assert len(set(expected.values())) == 3, "the test needs distinguishable outputs"

    def call(index: int) -> tuple[str, str]:
        user, headers = users[index % 3]
        with live.client() as own:
            return user, ask(own, user, headers)["output"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, range(12)))
    assert all(output == expected[user] for user, output in results)


def test_batched_http_requests_of_interleaved_users_get_their_own_answers(tmp_path, tiny_model_dir, anchors,
                                                                           tiny):
    """48 requests of 4 users (3 adapters, 1 on the anchor) from 8 client threads share batched forwards."""
    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path / "store", model=str(tiny_model_dir),
                         anchors=anchors, limits=LIMITS,
                         batch_window_ms=100, max_batch=8, adapter_slots=8)
    server = start_server(config, generate_key())
    texts = ["Short news.", TEXT, TEXT + " The mayor said the vote was close; the debate went on all night."]
    try:
        with server.client() as c:
            users = [new_user(c) for _ in range(4)]
        served = {users[3][0]: server.service.anchors["LaMP-4"]}
        for seed, (user, _) in zip((47, 49, 52), users[:3]):  # seeds whose answers differ on every text
            served[user] = noisy_anchor(tiny.model, seed)
            server.service.store.save(SaveRequest(user, "LaMP-4", server.service.model_name, "prisp", 1),
                                      served[user])
        expected = {(user, text): reference(tiny, served[user], text) for user, _ in users for text in texts}
        for text in texts:
            assert len({expected[(user, text)] for user, _ in users}) == 4, "the test needs distinct answers"
        plan = [(users[i % 4], texts[(i * 7) % 3]) for i in range(48)]
        waves = threading.Barrier(8)  # release requests 8 at a time, so they have to share batches

        def call(entry) -> str:
            (user, headers), text = entry
            with server.client() as own:
                waves.wait(timeout=60)
                return ask(own, user, headers, text)["output"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(call, plan))
        stats = server.service.engine.stats()
    finally:
        server.stop()
    assert answers == [expected[(user, text)] for (user, _), text in plan]
    assert stats.requests == 48 and stats.largest > 1, stats


def test_serving_model_swaps_specs_and_never_touches_the_base(tiny):
    from prisp.serve.engine import ServingModel

    probe = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = tiny.model(probe).logits.clone()
    engine = ServingModel(tiny.model, tiny.tokenizer)
    r8 = noisy_anchor(tiny.model, 21)
    r4 = random_init(tiny.model, LoraSpec(r=4, alpha=8), seed=22)
    for pair in r4.pairs.values():
        pair.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(23))
    prompt = query_prompt("LaMP-4", TEXT)
    expected = {id(w): reference(tiny, w) for w in (r8, r4)}
    for weights in (r8, r4, r8, r4):  # two peft slots, swapped back and forth
        assert engine.generate(weights, prompt, min(32, LIMITS.max_new_tokens)) == expected[id(weights)]
    with torch.no_grad():
        assert torch.equal(tiny.model(probe).logits, base_logits)
    assert not any("lora" in name for name, _ in tiny.model.named_modules())


# ---- isolation ---------------------------------------------------------------------------------


def test_every_endpoint_refuses_another_users_token(live, client):
    alice, alice_headers = new_user(client)
    _, bob_headers = new_user(client)
    job = run_job(client, alice, alice_headers, lamp4_items(2))
    record = live.service.store.current(alice, "LaMP-4")
    items = {"task": "LaMP-4", "items": lamp4_items(1)}
    calls = [("POST", f"/v1/users/{alice}/personalize", items), ("POST", f"/v1/users/{alice}/update", items),
             ("POST", f"/v1/users/{alice}/generate", {"task": "LaMP-4", "input": TEXT}),
             ("DELETE", f"/v1/users/{alice}/adapters", None), ("DELETE", f"/v1/users/{alice}", None)]
    credentials = {403: bob_headers, 401: {}}
    # Another user's job reads exactly as a job that does not exist.
    other = client.get(f"/v1/jobs/{job['job_id']}", headers=bob_headers)
    assert other.status_code == 404 and other.json()["detail"] == f"unknown job {job['job_id']!r}"
    basic = alice_headers["Authorization"].replace("Bearer", "Basic")
    credentials_401 = [{"Authorization": "Bearer prisp_forged"}, {"Authorization": basic}]
    for method, path, body in calls:
        for status, headers in credentials.items():
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert response.json()["detail"]
        for headers in credentials_401:
            assert client.request(method, path, json=body, headers=headers).status_code == 401
    assert live.service.store.current(alice, "LaMP-4") == record  # nothing changed
    assert ask(client, alice, alice_headers)["adapter_version"] == record.version


def test_tampered_or_swapped_adapter_fails_closed(live, client):
    alice, alice_headers = new_user(client)
    bob, bob_headers = new_user(client)
    run_job(client, alice, alice_headers, lamp4_items(2, "a"))
    run_job(client, bob, bob_headers, lamp4_items(2, "b"))
    root = live.service.store.root
    alice_file = root / live.service.store.current(alice, "LaMP-4").file
    bob_file = root / live.service.store.current(bob, "LaMP-4").file
    original = bob_file.read_bytes()
    bob_file.write_bytes(alice_file.read_bytes())  # alice's sealed adapter copied into bob's slot
    live.service.cache.drop_user(bob)  # as after a restart: the next request must read the disk
    response = client.post(f"/v1/users/{bob}/generate", json={"task": "LaMP-4", "input": TEXT},
                           headers=bob_headers)
    assert response.status_code == 500 and "failed authentication" in response.json()["detail"]
    assert "\n" not in response.json()["detail"]
    bob_file.write_bytes(original)
    assert ask(client, bob, bob_headers)["adapter_version"] is not None
    data = bytearray(alice_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    alice_file.write_bytes(bytes(data))
    live.service.cache.drop_user(alice)
    response = client.post(f"/v1/users/{alice}/generate", json={"task": "LaMP-4", "input": TEXT},
                           headers=alice_headers)
    assert response.status_code == 500 and "refusing" in response.json()["detail"]


# ---- deletion ----------------------------------------------------------------------------------


def test_delete_user_leaves_no_trace(live, client, tiny):
    user, headers = new_user(client)
    canary = "canary-7f3a9c-never-stored"
    items = lamp4_items(3)
    items[0]["text"] += " " + canary
    job = run_job(client, user, headers, items)
    ask(client, user, headers)
    assert any(k[0] == user for k in live.service.cache.keys())
    assert (user, "LaMP-4") in live.service.engine.slots.owners()
    root = live.service.store.root
    for path in root.rglob("*"):  # the user's raw text is never written anywhere, encrypted or not
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    response = client.delete(f"/v1/users/{user}", headers=headers)
    assert response.status_code == 200 and response.json()["adapters_removed"] == 1
    assert not (root / "users" / user).exists()
    with sqlite3.connect(root / DB_NAME) as db:
        for table in ("users", "adapters"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", (user,)).fetchone() == (0,)
    assert not any(k[0] == user for k in live.service.cache.keys())
    assert all(owner[0] != user for owner in live.service.engine.slots.owners()), "unloaded from the model"
    assert live.service.jobs.get(job["job_id"]) is None
    for path in root.rglob("*"):
        if path.is_file() and path.name != "LOCK":
            assert user.encode() not in path.read_bytes(), path
    assert client.post(f"/v1/users/{user}/generate", json={"task": "LaMP-4", "input": TEXT},
                       headers=headers).status_code == 401  # the token died with the account
    fresh, fresh_headers = new_user(client)
    assert ask(client, fresh, fresh_headers)["output"] == reference(tiny, live.service.anchors["LaMP-4"])


def test_delete_adapters_falls_back_to_the_anchor(live, client, tiny):
    user, headers = new_user(client)
    anchor_output = ask(client, user, headers)["output"]
    run_job(client, user, headers, lamp4_items(3))
    assert ask(client, user, headers)["adapter_version"] == 1
    response = client.delete(f"/v1/users/{user}/adapters", headers=headers)
    assert response.status_code == 200 and response.json()["adapters_removed"] == 1
    assert not (live.service.store.root / "users" / user).exists()
    assert not any(k[0] == user for k in live.service.cache.keys())
    after = ask(client, user, headers)
    assert after == {"output": anchor_output, "adapter_version": None}
    assert anchor_output == reference(tiny, live.service.anchors["LaMP-4"])


# ---- bad input ---------------------------------------------------------------------------------

_JSON = {"content-type": "application/json"}
BAD_INPUT = [
    ("malformed json", "generate", b'{"task": "LaMP-4", "input": ', _JSON, 422, "not valid JSON"),
    ("empty body", "generate", b"", _JSON, 422, ""),
    ("not an object", "generate", b"[1, 2]", _JSON, 422, ""),
    ("not json at all", "generate", b"task=LaMP-4", {"content-type": "text/plain"}, 422, ""),
    ("task is a number", "generate", {"task": 5, "input": "x"}, None, 422, "task"),
    ("input is a list", "generate", {"task": "LaMP-4", "input": ["x"]}, None, 422, "input"),
    ("missing input", "generate", {"task": "LaMP-4"}, None, 422, "input"),
    ("unknown field", "generate", {"task": "LaMP-4", "input": "x", "inptu": "y"}, None, 422, "inptu"),
    ("unknown task", "generate", {"task": "LaMP-9", "input": "x"}, None, 422, "unknown task"),
    ("task without anchor", "generate", {"task": "LaMP-3", "input": "x"}, None, 422, "no anchor"),
    ("blank input", "generate", {"task": "LaMP-4", "input": "   "}, None, 422, "empty"),
    ("input too long", "generate", {"task": "LaMP-4", "input": "x" * 2_001}, None, 422, "limit 2000"),
    ("empty history", "personalize", {"task": "LaMP-4", "items": []}, None, 422, "items"),
    ("items not a list", "personalize", {"task": "LaMP-4", "items": "abc"}, None, 422, "items"),
    ("item misses a field", "personalize", {"task": "LaMP-4", "items": [{"id": "1", "text": "t"}]}, None, 422,
     "missing field 'title'"),
    ("nested item value", "personalize", {"task": "LaMP-4", "items": [{"id": "1", "text": {"a": 1}}]},
     None, 422, "items"),
    ("boolean item value", "personalize", {"task": "LaMP-4", "items": [{"id": "1", "text": True}]},
     None, 422, "items"),
    ("item text too long", "personalize", {"task": "LaMP-4", "items": [{"id": "1", "text": "x" * 2_001}]},
     None, 422, "limit 2000"),
    ("too many items", "update", {"task": "LaMP-4", "items": lamp4_items(21)}, None, 413, "limit 20"),
    ("body too large", "personalize", {"task": "LaMP-4", "items": [{"id": "1", "text": "x" * 70_000}]},
     None, 413, "larger than the limit"),
]


@pytest.fixture(scope="module")
def someone(live):
    with live.client() as c:
        return new_user(c)


@pytest.mark.parametrize(("name", "endpoint", "body", "headers", "status", "message"), BAD_INPUT,
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_a_4xx_with_a_message(client, someone, name, endpoint, body, headers, status, message):
    user, auth = someone
    kwargs = {"content": body, "headers": {**auth, **headers}} if isinstance(body, bytes) else \
        {"json": body, "headers": auth}
    response = client.post(f"/v1/users/{user}/{endpoint}", **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and message in detail


def test_unknown_user_job_and_chunked_oversize(client, someone):
    _, auth = someone
    assert client.post("/v1/users/u_" + "0" * 32 + "/generate", json={"task": "LaMP-4", "input": "x"},
                       headers=auth).status_code == 403
    assert client.post("/v1/users/nobody/generate", json={"task": "LaMP-4", "input": "x"}).status_code == 401
    response = client.get("/v1/jobs/j_missing", headers=auth)
    assert response.status_code == 404 and "unknown job" in response.json()["detail"]
    assert client.get("/v1/nothing-here").status_code == 404

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(40):
            yield b"x" * 4_000

    response = client.post(f"/v1/users/{someone[0]}/generate", content=chunks(), headers={**auth, **_JSON})
    assert response.status_code == 413


# ---- property-based fuzz ------------------------------------------------------------------------


def test_fuzzed_requests_never_get_a_5xx(live):
    """Bounded schemathesis run over every operation, valid and invalid data, with and without a real user."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    with live.client() as c:
        user, auth = new_user(c)
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    server_errors: list[str] = []
    sent = [0]
    # Bounded and reproducible: 10 cases per operation and mode (about 130 requests), a fixed seed.
    budget = settings(max_examples=10, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        own_user = "{user_id}" in operation.path and operation.method.lower() != "delete"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, headers=auth,
                                             path_parameters={"user_id": user} if own_user else None)

            @budget
            @given(case=strategy)
            def check(case):
                response = case.call(base_url=live.url, timeout=60)
                sent[0] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                         f"{response.text[:200]}")

            try:
                check()
            except Unsatisfiable:
                # No parameters and no body (POST /v1/users, GET /healthz): nothing invalid to generate.
                assert mode == GenerationMode.NEGATIVE, operation.label
                continue
    assert live.service.jobs.wait_idle(120)
    assert server_errors == []
    assert sent[0] > 80, sent


def test_tuned_schedule_refuses_jobs_for_tasks_it_does_not_cover(tmp_path, tiny, tiny_model_dir, anchors, caplog):
    """``--schedule tuned`` serves LaMP-7 (no searched row) but refuses to personalize it, up front (422)."""
    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path / "store", model=str(tiny_model_dir),
                         anchors=anchors, limits=LIMITS,
                         personalize=PersonalizeConfig(schedule="tuned", progress=False))
    with caplog.at_level("WARNING"):
        service = PrispService(config, generate_key(), tiny)
    try:
        assert "no Stage-2 row for LaMP-7" in caplog.text and "LaMP-4" not in caplog.text.split("row for")[1]
        issued = service.create_user(ADMIN)
        with pytest.raises(PrispError, match="no tuned Stage-2 schedule for prisp on LaMP-7"):
            service.start_job(issued.user_id, issued.token, "LaMP-7", lamp4_items(2), update=False)
        assert service.store.current(issued.user_id, "LaMP-7") is None
    finally:
        service.close()


def test_update_is_refused_under_oppu_instead_of_growing_the_rank(tmp_path, tiny, tiny_model_dir, anchors):
    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path / "store", model=str(tiny_model_dir),
                         anchors=anchors, limits=LIMITS,
                         personalize=PersonalizeConfig(strategy="oppu", progress=False))
    service = PrispService(config, generate_key(), tiny)
    try:
        issued = service.create_user(ADMIN)
        with pytest.raises(PrispError, match="update is not available under --strategy oppu") as refused:
            service.start_job(issued.user_id, issued.token, "LaMP-4", lamp4_items(2), update=True)
        assert refused.value.status == 422 and service.store.current(issued.user_id, "LaMP-4") is None
    finally:
        service.close()


def test_only_the_admin_creates_lists_and_deletes_any_user(live, client):
    assert client.post("/v1/users").status_code == 401  # no token
    assert client.post("/v1/users", headers={"Authorization": "Bearer nobody_" + "x" * 40}).status_code == 401
    user, headers = new_user(client)
    refused = client.post("/v1/users", headers=headers)  # a user's own token cannot create users
    assert refused.status_code == 403 and "admin token" in refused.json()["detail"]
    assert client.get("/v1/users", headers=headers).status_code == 403
    assert run_job(client, user, headers, lamp4_items(2))["status"] == "succeeded"
    listing = client.get("/v1/users", headers=ADMIN_HEADERS)
    assert listing.status_code == 200
    entry = next(u for u in listing.json()["users"] if u["user_id"] == user)
    assert [(a["task"], a["version"]) for a in entry["adapters"]] == [("LaMP-4", 1)]
    assert entry["adapters"][0]["size_bytes"] > 1000
    assert "token" not in listing.text and headers["Authorization"].split()[1] not in listing.text
    other, other_headers = new_user(client)
    assert client.delete(f"/v1/users/{other}", headers=headers).status_code == 403  # not another user's
    gone = client.delete(f"/v1/users/{other}", headers=ADMIN_HEADERS)
    assert gone.status_code == 200 and gone.json()["deleted"]
    assert client.delete(f"/v1/users/{other}", headers=ADMIN_HEADERS).status_code == 404
    assert other not in client.get("/v1/users", headers=ADMIN_HEADERS).text
    assert client.post(f"/v1/users/{other}/generate", json={"task": "LaMP-4", "input": TEXT},
                       headers=other_headers).status_code == 401  # the token died with the user


def test_quotas_answer_429_with_retry_after(tmp_path, tiny, tiny_model_dir, anchors):
    limits = ServeLimits(max_new_tokens=LIMITS.max_new_tokens, max_jobs_per_hour=2, max_adapters=1)
    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path / "store", model=str(tiny_model_dir),
                         anchors=anchors, limits=limits, personalize=PersonalizeConfig(lr=1e-2, progress=False))
    with serve_in_thread(config, generate_key(), tiny, start_timeout=30) as server, server.client() as c:
        user, headers = new_user(c)
        assert run_job(c, user, headers, lamp4_items(2))["status"] == "succeeded"
        other_task = c.post(f"/v1/users/{user}/personalize", headers=headers,
                            json={"task": "LaMP-7", "items": [{"id": "1", "text": "rain again"}]})
        assert other_task.status_code == 429 and "at most 1 tasks" in other_task.json()["detail"]
        assert run_job(c, user, headers, lamp4_items(2), kind="update")["status"] == "succeeded"
        third = c.post(f"/v1/users/{user}/update", headers=headers, json={"task": "LaMP-4", "items": lamp4_items(1)})
        assert third.status_code == 429 and 3000 < int(third.headers["Retry-After"]) <= 3600
        second_user, second_headers = new_user(c)  # quotas are per user
        assert run_job(c, second_user, second_headers, lamp4_items(1))["status"] == "succeeded"


def test_admin_credentials_are_required_or_registration_is_explicitly_open(tmp_path, tiny_model_dir, anchors):
    with pytest.raises(PrispError, match="no admin credentials"):
        ServeConfig(store=tmp_path / "s", model=str(tiny_model_dir), anchors=anchors)
    with pytest.raises(PrispError, match="64 lowercase hex"):
        ServeConfig(store=tmp_path / "s", model=str(tiny_model_dir), anchors=anchors, admin_token_hash="abc")
    assert ServeConfig(store=tmp_path / "s", model=str(tiny_model_dir), anchors=anchors, open_registration=True)


def test_job_records_survive_a_restart_and_unfinished_ones_read_failed(tmp_path, tiny, tiny_model_dir, anchors):
    from prisp.serve.service import INTERRUPTED

    config = ServeConfig(admin_token_hash=ADMIN_HASH, store=tmp_path / "store", model=str(tiny_model_dir),
                         anchors=anchors, limits=LIMITS, personalize=PersonalizeConfig(lr=1e-2, progress=False))
    key = generate_key()
    service = PrispService(config, key, tiny)
    try:
        issued = service.create_user(ADMIN)
        done = service.start_job(issued.user_id, issued.token, "LaMP-4", lamp4_items(2), update=False)
        assert service.jobs.wait_idle(60)
        # A job the process was running when it died: only its record is left behind.
        service.store.save_job({"job_id": "j_" + "0" * 32, "user_id": issued.user_id, "task": "LaMP-4",
                                "kind": "update", "status": "running", "created_at": time.time(),
                                "started_at": time.time(), "finished_at": None, "adapter_version": None,
                                "error": None})
    finally:
        service.close()
    restarted = PrispService(config, key, tiny)
    try:
        finished = restarted.job(done.job_id, issued.token)
        assert finished.status == "succeeded" and finished.adapter_version == 1
        lost = restarted.job("j_" + "0" * 32, issued.token)
        assert lost.status == "failed" and lost.error == INTERRUPTED and lost.finished_at is not None
        assert "items" not in restarted.store.job_records()[0]  # records hold no user data
        restarted.delete_user(issued.user_id, issued.token)
        assert restarted.store.job_records() == []  # deletion purges the user's job records too
    finally:
        restarted.close()


def test_a_job_past_its_timeout_fails_and_the_queue_moves_on():
    from prisp.serve.jobs import JobQueue

    records = []
    queue = JobQueue(4, journal=records.append, timeout_s=0.3)
    release, results = threading.Event(), []

    def hangs(cancelled):
        release.wait(10)
        results.append(("hung job discards its result", cancelled()))
        return 7

    slow = queue.submit("u1", "LaMP-4", "personalize", hangs)
    quick = queue.submit("u2", "LaMP-4", "personalize", lambda cancelled: 3)
    assert queue.wait_idle(10)
    assert queue.get(slow.job_id).status == "failed" and "timed out after 0 s" in queue.get(slow.job_id).error
    assert queue.get(quick.job_id).status == "succeeded" and queue.get(quick.job_id).adapter_version == 3
    release.set()
    deadline = time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        time.sleep(0.02)
    assert results == [("hung job discards its result", True)]
    time.sleep(0.05)
    assert queue.get(slow.job_id).status == "failed"  # the late return changed nothing
    statuses = [(r["job_id"], r["status"]) for r in records]
    assert (slow.job_id, "running") in statuses and statuses[-1] != (slow.job_id, "succeeded")
    queue.shutdown()


def test_a_job_is_journalled_queued_before_it_can_run():
    """A crash as the job starts must leave its record (the kill test finds the job by it), and a slow journal
    write of ``queued`` must never land after the worker's ``running``."""
    from prisp.serve.jobs import JobQueue

    records = []

    def slow_journal(record):
        if record["status"] == "queued":
            time.sleep(0.2)  # the worker would record "running" meanwhile if it were already scheduled
        records.append(record["status"])

    queue = JobQueue(4, journal=slow_journal)
    queue.submit("u1", "LaMP-4", "personalize", lambda cancelled: 1)
    assert queue.wait_idle(10)
    assert records == ["queued", "running", "succeeded"]
    queue.shutdown()
