"""Crash safety at scale: the real server (a tiny random model, the real tokenizer) is SIGKILLed at seeded random
moments and at its named crash points while a client drives users through create / personalize / update /
generate / delete, then restarted and checked against what the client had been told (acknowledged).

    python bench/reliability.py [--kills 60] [--seed 0] [--out bench/results/reliability.md]

Invariants after every restart: every acknowledged adapter version (a job reported ``succeeded``) of a user not
acknowledged deleted is served at that version or a later one and decrypts intact; every acknowledged deletion
stays deleted; no job is left ``queued``/``running``; no file lies outside the store's rows.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from prisp.adapters import LoraSpec, random_init, save_adapter
from prisp.faults import POINTS
from prisp.files import write_atomic
from prisp.models import resolve_model
from prisp.serve.auth import issue_token
from prisp.serve.keys import generate_key
from prisp.serve.process import ServerProcess
from prisp.serve.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [{"id": str(i), "text": f"The council met on day {i} and approved the budget.",
          "title": f"Council approves budget, day {i}"} for i in range(3)]


def tiny_model(work: Path) -> Path:
    """A 2-layer random Llama with the default model's tokenizer (fast to load; the server code is the same)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, _ = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = work / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Driver:
    """Random operations against one server, recording what was acknowledged."""

    def __init__(self, server: ServerProcess, rng: random.Random, state: dict):
        self.server, self.rng, self.state = server, rng, state
        self.ops = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with self.server.client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    self.step(client)
                except (httpx.TransportError, httpx.HTTPStatusError, KeyError, ValueError):
                    return  # the server died under us: whatever was not acknowledged is not counted

    def step(self, client: httpx.Client) -> None:
        users = [u for u in self.state["users"] if u not in self.state["deleted"]]
        choice = self.rng.choice(["create"] * 2 + ["personalize"] * 3 + ["update"] * 2 + ["generate"] * 2
                                 + ["delete"]) if users else "create"
        self.ops += 1
        if choice == "create":
            body = client.post("/v1/users", headers=self.server.admin).raise_for_status().json()
            self.state["users"][body["user_id"]] = {"token": body["token"], "acked": None}
            return
        user = self.rng.choice(users)
        info = self.state["users"][user]
        headers = {"Authorization": f"Bearer {info['token']}"}
        if choice == "delete":
            self.state["deleting"].add(user)  # in flight: if the server dies now, either outcome is correct
            if client.delete(f"/v1/users/{user}", headers=self.server.admin).status_code == 200:
                self.state["deleted"].add(user)
        elif choice == "generate":
            client.post(f"/v1/users/{user}/generate", headers=headers, json={"task": "LaMP-4", "input": "Budget"})
        else:
            kind = "update" if choice == "update" and info["acked"] else "personalize"
            response = client.post(f"/v1/users/{user}/{kind}", headers=headers, json={"task": "LaMP-4",
                                                                                       "items": ITEMS})
            if response.status_code != 202:
                return
            job_id = response.json()["job_id"]
            while not self.stop.is_set():
                job = client.get(f"/v1/jobs/{job_id}", headers=headers).raise_for_status().json()
                if job["status"] == "succeeded":
                    info["acked"] = job["adapter_version"]
                    return
                if job["status"] == "failed":
                    return
                time.sleep(0.05)


def check(server: ServerProcess, state: dict) -> list[str]:
    """Every user against what the client was told, over HTTP on the restarted server."""
    lost = []
    with server.client() as client:
        for user, info in state["users"].items():
            headers = {"Authorization": f"Bearer {info['token']}"}
            answer = client.post(f"/v1/users/{user}/generate", headers=headers, json={"task": "LaMP-4",
                                                                                    "input": "Budget"})
            if user in state["deleted"]:
                if answer.status_code != 401:
                    lost.append(f"deleted user {user} answered {answer.status_code}")
            elif user in state["deleting"] and answer.status_code == 401:
                state["deleted"].add(user)  # an unacknowledged deletion that took effect: allowed
            elif info["acked"] is not None and (answer.status_code != 200
                                                or (answer.json()["adapter_version"] or 0) < info["acked"]):
                lost.append(f"user {user}: acknowledged v{info['acked']}, got {answer.status_code} {answer.text}")
    return lost


def final_check(server: ServerProcess) -> dict:
    """With the server stopped: every adapter decrypts, no job is left queued/running, no stray file."""
    with AdapterStore(server.store, server.key, writer=False) as store:
        stuck = sum(1 for r in store.job_records() if r["status"] in ("queued", "running"))
        referenced = set()
        for user, _ in store.users():
            for record in store.adapters(user):
                store.load(record)
                referenced.add(server.store / record.file)
    stray = {p for p in (server.store / "users").rglob("*") if p.is_file()} - referenced
    return {"stuck": stuck, "stray": len(stray), "adapters": len(referenced)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/reliability.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = time.perf_counter()
    counts = {"operations": 0, "kills": 0, "random_kills": 0, "crash_point_kills": 0, "recoveries": 0,
              "lost_acknowledged_writes": 0, "jobs_left_running": 0, "stray_files": 0}
    problems: list[str] = []
    points = [p for p in POINTS if not p.startswith("rotate:")]
    with tempfile.TemporaryDirectory(prefix="prisp-reliability-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        from prisp.models import load_model

        anchor = random_init(load_model(str(model)).model, LoraSpec(), seed=1)
        anchor_dir = save_adapter(anchor, work / "anchor", "tiny")
        log = Path(tempfile.gettempdir()) / "prisp-reliability-server.log"  # kept: a failure's evidence
        log.unlink(missing_ok=True)
        server = ServerProcess(work / "store", str(model), {"LaMP-4": anchor_dir}, generate_key(),
                               issue_token().token, log)
        state = {"users": {}, "deleted": set(), "deleting": set()}
        for round_ in range(args.kills):
            point = rng.choice(points) if rng.random() < 0.4 else None
            if not server.start(fault=point):
                raise SystemExit(f"round {round_}: the server did not start; see {server.log}")
            if round_:
                counts["recoveries"] += 1  # restarted after the previous round's kill
            found = check(server, state)  # before this round drives it: what the last kill left
            problems += found
            counts["lost_acknowledged_writes"] += len(found)
            driver = Driver(server, rng, state)
            thread = threading.Thread(target=driver.run, daemon=True)
            thread.start()
            if point is not None and server.wait_dead(timeout=rng.uniform(2.0, 7.0)):
                counts["crash_point_kills"] += 1
            else:
                if point is None:
                    time.sleep(rng.uniform(2.0, 7.0))
                server.kill()
                counts["random_kills"] += 1
            counts["kills"] += 1
            driver.stop.set()
            thread.join(30)
            counts["operations"] += driver.ops
            print(f"round {round_ + 1}/{args.kills}: {'point ' + point if point else 'random kill'}; "
                  f"{driver.ops} ops; users {len(state['users'])}, deleted {len(state['deleted'])}; "
                  f"lost so far {counts['lost_acknowledged_writes']}", flush=True)
        if not server.start():  # the last recovery, then the last HTTP check
            raise SystemExit(f"no restart after the last kill; see {server.log}")
        counts["recoveries"] += 1
        found = check(server, state)
        problems += found
        counts["lost_acknowledged_writes"] += len(found)
        server.stop()
        final = final_check(server)
        counts["jobs_left_running"], counts["stray_files"] = final["stuck"], final["stray"]
        acknowledged = sum(1 for info in state["users"].values() if info["acked"] is not None)
    seconds = time.perf_counter() - started
    lines = [
        "# Reliability: SIGKILL at random moments and at the named crash points",
        "",
        f"Command: `python bench/reliability.py --kills {args.kills} --seed {args.seed}` ({seconds / 60:.1f} min; "
        f"`uptime` before: `{uptime}`).",
        "",
        "| operations | kills | at random moments | at crash points | recoveries | users | acknowledged adapters "
        "| acknowledged deletions | lost acknowledged writes | jobs left running | stray files |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {counts['operations']} | {counts['kills']} | {counts['random_kills']} | {counts['crash_point_kills']} | "
        f"{counts['recoveries']} | {len(state['users'])} | {acknowledged} | {len(state['deleted'])} | "
        f"{counts['lost_acknowledged_writes']} | {counts['jobs_left_running']} | {counts['stray_files']} |",
        "",
        "Each round starts the server (40% of rounds armed with a random crash point of `prisp.faults.POINTS`, "
        "rotation excepted: it runs offline), drives random create / personalize / update / generate / delete "
        "requests from a client, kills the server (at its crash point, or with SIGKILL after a random 2-7 s), "
        "restarts it (the next round's server) and first checks every user against what the client was told: an acknowledged adapter version is "
        "served at that version or a later one and decrypts intact (a user whose deletion was in flight at the kill "
        "may be either whole or gone); an acknowledged deletion stays deleted (401); "
        "at the end, with the server stopped, the store is opened read-only: every adapter decrypts, no job record is "
        "left queued or running, no file lies outside the rows. "
        "Target: 0 lost acknowledged writes.",
    ]
    if problems:
        lines += ["", "Problems:", *[f"- {p}" for p in problems[:50]]]
    write_atomic(args.out, "\n".join(lines) + "\n")
    write_atomic(args.out.with_suffix(".json"), json.dumps({"counts": counts, "problems": problems}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
