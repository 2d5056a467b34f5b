"""Bounded load on the real prisp HTTP server: requests/s, latency, adapter swap time, decoding throughput.

Starts the FastAPI app under uvicorn in a thread of this process, on 127.0.0.1 and a free port, with a
temporary encrypted store and a fresh key (both removed at the end). Creates ``--users`` users over HTTP;
the first ``--personalize`` of them are personalized through ``POST /v1/users/{id}/personalize`` with the 10
most recent items of a real dev user (timed), the others get a random LoRA of the anchor's shape (B drawn
from N(0, 0.01)) sealed straight into the store with ``AdapterStore.save`` to save time: serving cost does not
depend on the values. Then, per ``--concurrency`` level, exactly ``--requests`` generate requests go out from
that many client threads (httpx) to users drawn at random (LRU cache of ``--cache-size`` adapters), stopping
early at ``--max-seconds``. The server batches concurrent generate requests (``--batch-window-ms``,
``--max-batch``, ``--adapter-slots``, passed to its config); the engine's batch counters, read before and
after each level, give the mean batch size per level. After the load: adapter swap time (store read +
AES-GCM decrypt + parse + shape check + copy into a peft slot for an adapter not in the cache, vs a cached
one already in a slot), measured in-process on the server's own objects; and fixed-length greedy decoding
(``--decode-tokens``, EOS suppressed) of the base model vs the folded adapter applied as the server applies
it (unmerged peft LoRA) vs merged into the weights.

    python bench/serve_load.py [--model smollm2-135m] [--users 32] [--requests 32] [--concurrency 1,4,8]
                               [--batch-window-ms 10] [--max-batch 8] [--out bench/results/serve_load.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from prisp.adapters import LoraWeights, attach_lora, random_init, shared_copy
from prisp.bench.results import git_revision
from prisp.data.lamp import load_task_split
from prisp.data.locations import default_data_dir
from prisp.data.prompts import query_prompt
from prisp.data.protocol import recent_items
from prisp.generation import format_prompt
from prisp.models import load_model
from prisp.personalize import PersonalizeConfig
from prisp.serve.auth import hash_token, issue_token
from prisp.serve.config import ServeConfig, ServeLimits
from prisp.serve.embedded import EmbeddedServer, serve_in_thread
from prisp.serve.keys import generate_key
from prisp.serve.store import SaveRequest

ROOT = Path(__file__).resolve().parents[1]


ADMIN = issue_token().token  # this run's admin token: creating users needs it


def resolve_data(data: str | None) -> Path:
    return Path(data) if data else default_data_dir(benchmark=True, sample_if_missing=True)


def seeded_adapter(model, like: LoraWeights, seed: int, scale: float = 0.01) -> LoraWeights:
    """A random LoRA with the anchor's spec and a non-zero B (the shape of a personalized prisp adapter)."""
    weights = random_init(model, like.spec, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for pair in weights.pairs.values():
        pair.B.normal_(0, scale, generator=generator)
    return weights


# ---- phases --------------------------------------------------------------------------------------------
def create_users(client: httpx.Client, n: int) -> list[tuple[str, dict]]:
    users = []
    for _ in range(n):
        response = client.post("/v1/users", headers={"Authorization": f"Bearer {ADMIN}"})
        response.raise_for_status()
        body = response.json()
        users.append((body["user_id"], {"Authorization": f"Bearer {body['token']}"}))
    return users


def personalize_over_http(client, users, histories, task: str, timeout: float) -> list[float]:
    """One personalization job per user (sequential, as the server runs one job at a time); seconds each."""
    seconds = []
    for (user, headers), items in zip(users, histories):
        start = time.perf_counter()
        response = client.post(
            f"/v1/users/{user}/personalize", json={"task": task, "items": items}, headers=headers
        )
        response.raise_for_status()
        job = response.json()["job_id"]
        while True:
            state = client.get(f"/v1/jobs/{job}", headers=headers).json()
            if state["status"] == "succeeded":
                break
            if state["status"] == "failed" or time.perf_counter() - start > timeout:
                raise SystemExit(f"personalization job {job} of user {user}: {state}")
            time.sleep(0.1)
        seconds.append(time.perf_counter() - start)
    return seconds


def seed_store(service, users, task: str, start_seed: int) -> float:
    """Seal a random adapter for each user straight into the store; returns seconds per user."""
    anchor = service.anchors[task]
    start = time.perf_counter()
    for index, (user, _) in enumerate(users):
        weights = seeded_adapter(service.engine.base, anchor, start_seed + index)
        request = SaveRequest(
            user_id=user, task=task, base_model=service.model_name, strategy="seeded-random", items=0
        )
        service.store.save(request, weights)
    return (time.perf_counter() - start) / max(1, len(users))


def run_load(url: str, plan: list[tuple[str, dict, str]], task: str, concurrency: int, args) -> dict:
    """Send the planned generate requests from ``concurrency`` threads; stop issuing at the deadline."""
    deadline = time.monotonic() + args.max_seconds
    limits = httpx.Limits(max_connections=concurrency)

    with httpx.Client(base_url=url, timeout=args.request_timeout, limits=limits) as client:

        def one(entry):
            user, headers, text = entry
            if time.monotonic() > deadline:
                return None
            start = time.perf_counter()
            response = client.post(
                f"/v1/users/{user}/generate", json={"task": task, "input": text}, headers=headers
            )
            latency = time.perf_counter() - start
            body = response.json() if response.status_code == 200 else {}
            return latency, response.status_code, body.get("adapter_version"), len(body.get("output", ""))

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, plan))
        wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    ok = [r for r in done if r[1] == 200]
    latencies = np.array([r[0] for r in ok]) if ok else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "planned": len(plan),
        "sent": len(done),
        "ok": len(ok),
        "errors": {
            str(code): sum(r[1] == code for r in done) for code in {r[1] for r in done if r[1] != 200}
        },
        "anchor_answers": sum(r[2] is None for r in ok),
        "wall_s": wall,
        "rps": len(ok) / wall if wall > 0 else float("nan"),
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "max_s": float(latencies.max()),
        "mean_output_chars": statistics.mean(r[3] for r in ok) if ok else float("nan"),
    }


def batch_counts(before, after) -> dict:
    """Batches run, mean requests per batch and slot loads between two snapshots of the engine's counters."""
    batches = after.batches - before.batches
    requests = after.requests - before.requests
    return {
        "batches": batches,
        "mean_batch": requests / batches if batches else float("nan"),
        "largest_batch_so_far": after.largest,
        "adapter_loads": after.adapter_loads - before.adapter_loads,
    }


def swap_times(service, users, task: str, n: int) -> dict:
    """Cold (not cached) vs warm (cached, already in a slot) adapter swap, on the server's own objects."""
    engine = service.engine
    rows = []
    for user, _ in users[:n]:
        service.cache.drop_user(user)
        t0 = time.perf_counter()
        weights, _ = service.adapter_for(user, task)  # store read, AES-GCM decrypt, parse, check, cache put
        t1 = time.perf_counter()
        # What a batch does for it: a new object, so copy A and B into the slot of the user's older copy.
        engine.place(weights, (user, task))
        t2 = time.perf_counter()
        weights, _ = service.adapter_for(user, task)  # cache hit: the same object
        t3 = time.perf_counter()
        engine.place(weights)  # the slot already holds it: nothing to copy
        t4 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    med = [statistics.median(col) * 1000 for col in zip(*rows)]
    record = service.store.current(users[0][0], task)
    size = (service.store.root / record.file).stat().st_size
    return {
        "n": len(rows),
        "cold_load_ms": med[0],
        "cold_apply_ms": med[1],
        "cold_total_ms": med[0] + med[1],
        "warm_lookup_ms": med[2],
        "warm_apply_ms": med[3],
        "warm_total_ms": med[2] + med[3],
        "sealed_kb": size / 1024,
        "parameters": service.anchors[task].num_parameters(),
    }


@torch.no_grad()
def decode_rates(models: dict, tokenizer, prompt: str, tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s per model of greedy decoding of exactly ``tokens`` new tokens (EOS suppressed), batch 1.

    The models take turns within each repeat, so a change of machine load hits them alike.
    """
    text = format_prompt(tokenizer, prompt)
    encoded = tokenizer(
        text, add_special_tokens=not getattr(tokenizer, "chat_template", None), return_tensors="pt"
    )
    options = {
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for model in models.values():  # warm-up
        model.generate(**encoded, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            out = model.generate(**encoded, **options)
            rates[name].append((out.shape[1] - encoded["input_ids"].shape[1]) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def decoding(loaded, weights: LoraWeights, prompt: str, args) -> dict:
    base, tok = loaded.model, loaded.tokenizer
    models = {
        "base model": base,
        # peft injects in place: the served variant works on a structural copy sharing the base's tensors
        "folded adapter, unmerged peft LoRA (as served)": attach_lora(shared_copy(base), weights).eval(),
        "folded adapter merged into the weights": attach_lora(copy.deepcopy(base), weights)
        .merge_and_unload()
        .eval(),
    }
    rates = decode_rates(models, tok, prompt, args.decode_tokens, args.decode_repeats)
    prompt_tokens = len(tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
    return {"rates": rates, "prompt_tokens": prompt_tokens}


# ---- the run -------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started, load_start = time.time(), os.getloadavg()
    levels = [int(c) for c in args.concurrency.split(",")]
    data = resolve_data(args.data)
    dev = load_task_split(data, args.task, "dev", require_golds=False)
    profiles = [qs[0].profile for qs in dev.users.values()]
    inputs = [q.input for q in dev.queries]
    if args.personalize > len(profiles):
        raise SystemExit(f"--personalize {args.personalize}: {data} {args.task} dev has only {len(profiles)} users")
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    timings = {"model_load_s": time.perf_counter() - t0}
    anchors = {args.task: Path(args.anchor)} if args.anchor else {}
    with tempfile.TemporaryDirectory(prefix="prisp-serve-load-") as tmp:
        config = ServeConfig(
            store=Path(tmp) / "store",
            model=args.model,
            admin_token_hash=hash_token(ADMIN),
            anchors=anchors,
            random_anchors=not anchors,
            cache_size=args.cache_size,
            batch_window_ms=args.batch_window_ms,
            max_batch=args.max_batch,
            adapter_slots=args.adapter_slots,
            limits=ServeLimits(
                max_new_tokens=args.max_new_tokens, max_pending_jobs=max(2, args.personalize + 1)
            ),
            personalize=PersonalizeConfig(lr=args.lr, progress=False),
        )
        t0 = time.perf_counter()
        live = serve_in_thread(config, generate_key(), loaded)
        timings["server_start_s"] = time.perf_counter() - t0
        try:
            results = exercise(live, loaded, args, levels, profiles, inputs, timings)
        finally:
            live.stop()
    ctx = {
        "data": str(data),
        "seconds": time.time() - started,
        "load_start": load_start,
        "levels": levels,
        "load_end": os.getloadavg(),
        "anchor": args.anchor or "random-init anchor (B = 0: the base model)",
    }
    write_report(Path(args.out), args, timings, results, ctx)


def exercise(live: EmbeddedServer, loaded, args, levels, profiles, inputs, timings) -> dict:
    service, task = live.service, args.task
    rng = random.Random(args.seed)
    with httpx.Client(base_url=live.url, timeout=args.request_timeout) as client:
        t0 = time.perf_counter()
        users = create_users(client, args.users)
        timings["create_user_ms"] = (time.perf_counter() - t0) / len(users) * 1000
        real = users[: args.personalize]
        histories = [[item.to_json() for item in recent_items(p, 10)] for p in profiles[: len(real)]]
        timings["personalize_job_s"] = personalize_over_http(client, real, histories, task, args.max_seconds)
    timings["seed_per_user_ms"] = seed_store(service, users[len(real) :], task, args.seed + 1000) * 1000
    warm = run_load(live.url, [(users[0][0], users[0][1], inputs[0])], task, 1, args)  # builds the peft model
    loads = []
    for level in levels:
        plan = [(*rng.choice(users), inputs[i % len(inputs)]) for i in range(args.requests)]
        before = service.engine.stats()
        loads.append(run_load(live.url, plan, task, level, args))
        loads[-1].update(batch_counts(before, service.engine.stats()))
        print(f"concurrency {level}: {json.dumps(loads[-1])}", flush=True)
    swaps = swap_times(service, users, task, min(args.swaps, len(users)))
    print(f"swap: {json.dumps(swaps)}", flush=True)
    record = service.store.current(users[0][0], task)
    weights = service.store.load(record)
    which = "personalized over HTTP" if real else "seeded"
    prompt = query_prompt(task, inputs[0])
    decode = decoding(loaded, weights, prompt, args)
    decode["adapter"] = f"user {users[0][0]}'s adapter ({which}, r {weights.spec.r})"
    print(f"decode: {json.dumps(decode)}", flush=True)
    return {"warmup": warm, "loads": loads, "swaps": swaps, "decode": decode, "personalized": len(real)}


# ---- report --------------------------------------------------------------------------------------------
def write_report(path: Path, args, timings: dict, results: dict, ctx: dict) -> None:
    cmd = "python bench/serve_load.py " + shlex.join(sys.argv[1:])
    jobs = timings["personalize_job_s"]
    job_text = f"{statistics.mean(jobs):.1f} s per job, {len(jobs)} run" if jobs else "none run"
    lines = [
        f"# Serving under bounded load ({args.task}, model `{args.model}`)",
        "",
        "```",
        cmd,
        "```",
        "",
        (
            f"Real `prisp serve` app (FastAPI + uvicorn) in a thread of the benchmark process on 127.0.0.1, with a "
            f"temporary encrypted store and a fresh key; anchor: {ctx['anchor']}; LRU cache of {args.cache_size} "
            f"adapters; answers capped at {args.max_new_tokens} new tokens (greedy, first line). {args.users} users "
            f"created over HTTP ({timings['create_user_ms']:.1f} ms each); {results['personalized']} personalized "
            f"through `POST /v1/users/{{id}}/personalize` with the 10 most recent items of a real dev user "
            f"({job_text}, queue to done); the other {args.users - results['personalized']} got a random LoRA of "
            f"the anchor's shape sealed directly into the store with `AdapterStore.save` "
            f"({timings['seed_per_user_ms']:.1f} ms each) to save time (serving cost does not depend on the "
            f"values). Inputs: {args.task} dev inputs of `{ctx['data']}`, cycled; users drawn uniformly at random "
            f"(seed {args.seed}). Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{args.threads}, load average {ctx['load_start'][0]:.1f} at start, {ctx['load_end'][0]:.1f} at the "
            f"end; model load {timings['model_load_s']:.1f} s, server start {timings['server_start_s']:.1f} s, "
            f"total {ctx['seconds'] / 60:.1f} min; git {git_revision(ROOT) or 'unknown'}."
        ),
        "",
        "## Generate requests",
        "",
        (
            f"{args.requests} requests per concurrency level (client threads), at most {args.max_seconds:.0f} s "
            "each. The server batches concurrent generate requests of different users into one greedy "
            "generation with a per-row adapter (peft mixed-adapter batches): a batcher thread takes the "
            f"first waiting request, waits up to {args.batch_window_ms:g} ms for more, up to {args.max_batch} per "
            f"batch, with {args.adapter_slots} adapter slots (LRU). *Batches* and *mean batch* come from the "
            "engine's counters read before and after each level; *slot loads* counts adapters copied into a "
            "slot (misses of the slot pool)."
        ),
        "",
        (
            "| concurrency | ok / sent | errors | wall s | requests/s | p50 s | p95 s | max s | batches | "
            "mean batch | slot loads | anchor answers | mean answer chars |"
        ),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["loads"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
        lines.append(
            f"| {r['concurrency']} | {r['ok']} / {r['sent']} (of {r['planned']}) | {errors} | {r['wall_s']:.1f} | "
            f"{r['rps']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['max_s']:.3f} | {r['batches']} | "
            f"{r['mean_batch']:.2f} | {r['adapter_loads']} | {r['anchor_answers']} | "
            f"{r['mean_output_chars']:.0f} |"
        )
    s = results["swaps"]
    lines += [
        "",
        "## Adapter swap",
        "",
        (
            f"Median over {s['n']} users, in-process on the server's own store, cache and engine. Cold = not in the "
            "cache: store read + AES-GCM decrypt + safetensors parse + shape check (+ cache insert), then copy of A "
            "and B into the peft slot that held the user's previous copy (a decrypted adapter is a new object, "
            "so it is always copied); warm = cache hit, the same object, which its slot already holds: no copy. "
            f"Sealed adapter {s['sealed_kb']:.0f} KiB ({s['parameters']:,} parameters)."
        ),
        "",
        "| | load / lookup ms | apply ms | total ms |",
        "|---|---:|---:|---:|",
        f"| cold (not cached) | {s['cold_load_ms']:.2f} | {s['cold_apply_ms']:.2f} | {s['cold_total_ms']:.2f} |",
        f"| warm (cached, in a slot) | {s['warm_lookup_ms']:.3f} | {s['warm_apply_ms']:.3f} | "
        f"{s['warm_total_ms']:.3f} |",
    ]
    d = results["decode"]
    base_rate = d["rates"]["base model"]
    lines += [
        "",
        "## Decoding throughput",
        "",
        (
            f"Greedy decoding of exactly {args.decode_tokens} new tokens (EOS suppressed), batch 1, after a "
            f"{d['prompt_tokens']}-token prompt, median of {args.decode_repeats} runs after a warm-up (the three "
            f"models take turns within each run); adapter: "
            f"{d['adapter']}."
        ),
        "",
        "| model | tokens/s | relative to base |",
        "|---|---:|---:|",
    ]
    for name, rate in d["rates"].items():
        lines.append(f"| {name} | {rate:.1f} | {rate / base_rate:.2f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    raw = {"command": cmd, "args": vars(args), "git": git_revision(ROOT), "timings": timings, **results}
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print("\n".join(lines))
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registered model name or a model directory")
    p.add_argument("--task", default="LaMP-4")
    p.add_argument("--users", type=int, default=32)
    p.add_argument(
        "--personalize", type=int, default=1, help="users personalized over HTTP; the rest are seeded"
    )
    p.add_argument("--requests", type=int, default=32, help="generate requests per concurrency level")
    p.add_argument(
        "--concurrency", default="1,4,8", help="client threads; a comma list runs one pass per level"
    )
    p.add_argument("--cache-size", type=int, default=16, help="server LRU cache of decrypted adapters")
    p.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="server: wait for a batch's companions"
    )
    p.add_argument("--max-batch", type=int, default=8, help="server: most generate requests per batch")
    p.add_argument(
        "--adapter-slots", type=int, default=32, help="server: adapters kept loaded (>= --max-batch)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--max-seconds", type=float, default=600, help="per phase: stop issuing requests after this"
    )
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--swaps", type=int, default=8, help="users timed for the adapter swap")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--anchor", default=None, help="peft anchor directory for --task (default: random-init)")
    p.add_argument("--lr", type=float, default=None, help="personalization lr (default: Table 7)")
    p.add_argument(
        "--data", default=None, help="LaMP data dir [$PRISP_DATA, ../shared/data/lamp-offline, sample]"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/serve_load.md"))
    args = p.parse_args(argv)
    for name in (
        "users",
        "requests",
        "cache_size",
        "max_new_tokens",
        "max_batch",
        "adapter_slots",
        "swaps",
        "decode_tokens",
        "decode_repeats",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.personalize <= args.users:
        p.error("--personalize must be between 0 and --users")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency expects a comma list of integers, got {args.concurrency!r}")
    if any(c < 1 for c in levels):
        p.error("--concurrency levels must be at least 1")
    if not args.batch_window_ms >= 0:
        p.error("--batch-window-ms must be at least 0")
    if args.adapter_slots < args.max_batch:
        p.error("--adapter-slots must be at least --max-batch")
    return args


if __name__ == "__main__":
    main()
