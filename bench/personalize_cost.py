"""Stage 2 cost: seconds and peak memory per user for PRISP, OPPU and the Table 5 ablations, interleaved.

Every strategy personalizes the same users from the same anchor (the shipped hypernetwork's, generated from the
task's description), Table 7 schedules, default model. Strategies take turns **user by user** (user 1: prisp,
oppu, full-lora, ...; user 2: ...), so a change of machine load hits every strategy alike. With ``--old-code
DIR`` a second process runs another checkout of prisp (e.g. a ``git worktree`` of the previous revision) on the
same users and strategies, interleaved job by job with this one, for a before/after ratio; only one of the two
computes at any time.

Records go to ``--out``'s ``.jsonl`` as they finish; a re-run skips what is there (resumable). The report is
rewritten from those records at the end (``--report-only`` rewrites it without running anything).

    python bench/personalize_cost.py --tasks LaMP-4:10,LaMP-1:4,LaMP-2N:4,LaMP-5:4 --threads 2 \\
        [--old-code /tmp/prisp-old --old-strategies prisp,oppu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prisp.data.locations import default_data_dir
from prisp.files import JsonlLog, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("prisp", "oppu", "full-lora", "no-bridge", "bridge-only")


class Personalizer:
    """The model, anchors and users of one checkout of prisp, in this process."""

    def __init__(self, data: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        from prisp.console import quiet_transformers
        from prisp.models import load_model

        quiet_transformers()
        start = time.perf_counter()
        self.loaded = load_model("smollm2-135m")
        self.load_seconds = time.perf_counter() - start
        self.data = data
        self.tasks: dict[str, tuple] = {}

    def _task(self, task: str):
        if task not in self.tasks:
            from prisp.data.lamp import load_task_split
            from prisp.data.tasks import get_task, label_set
            from prisp.hypernet.anchor import Anchorer

            split = load_task_split(self.data, task, "dev")
            anchorer = Anchorer.load(None, "smollm2-135m", self.loaded.model, self.loaded.tokenizer)
            anchor = anchorer.generate(get_task(split.task).description).weights
            self.tasks[task] = (split, anchor, label_set(split.task, split.inputs))
        return self.tasks[task]

    def run(self, task: str, user_index: int, strategy: str) -> dict:
        """Personalize the ``user_index``-th dev user of ``task`` under ``strategy``; what it cost."""
        import torch

        from prisp.personalize import PersonalizeConfig
        from prisp.personalize.personalizer import personalize

        split, anchor, labels = self._task(task)
        user, queries = list(split.users.items())[user_index]
        start = time.perf_counter()
        result = personalize(self.loaded.model, self.loaded.tokenizer, anchor, split.task, queries[0].profile,
                             PersonalizeConfig(strategy=strategy, progress=False), labels)
        wall = time.perf_counter() - start
        train = result.train
        return {"task": task, "user": user, "strategy": strategy, "wall_s": wall, "train_s": train.seconds,
                "peak_rss_mb": train.peak_rss_mb, "peak_rss_delta_mb": train.peak_rss_delta_mb,
                "trainable_params": train.trainable_params, "steps": train.steps, "examples": result.examples,
                "losses": train.losses, "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}


def serve_jobs(args) -> None:
    """``--serve-jobs``: read job lines on stdin, answer one JSON line each on stdout (the --old-code side)."""
    worker = Personalizer(args.data, args.threads)
    print(json.dumps({"ready": True, "load_s": worker.load_seconds}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(worker.run(job["task"], job["user_index"], job["strategy"])), flush=True)


class OldCode:
    """A ``--serve-jobs`` process of this script importing prisp from another checkout."""

    def __init__(self, checkout: Path, data: str, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-jobs", "--data", data,
                   "--threads", str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env, cwd=checkout)
        self.revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                                       text=True).stdout.strip()
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the old-code process stopped (exit {self.process.wait()})")
        return json.loads(line)

    def run(self, task: str, user_index: int, strategy: str) -> dict:
        self.process.stdin.write(json.dumps({"task": task, "user_index": user_index, "strategy": strategy}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def git_revision() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="LaMP-4:10,LaMP-1:4,LaMP-2N:4,LaMP-5:4",
                        help="task:users pairs (the first N dev users of each)")
    parser.add_argument("--data", default=str(default_data_dir(benchmark=True)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--old-code", type=Path, default=None, help="another prisp checkout to compare against")
    parser.add_argument("--old-strategies", default="prisp,oppu", help="strategies also run on --old-code")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/personalize_cost.md")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--profile", metavar="TASK", default=None,
                        help="instead: one prisp user of TASK under torch.profiler (after a warm-up user); writes "
                             "the op table to --out's _profile.md")
    parser.add_argument("--serve-jobs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_jobs:
        return serve_jobs(args)
    if args.profile:
        return profile(args)
    records_path = args.out.with_suffix(".jsonl")
    meta_path = args.out.with_suffix(".meta.json")
    if not args.report_only:
        run(args, records_path, meta_path)
    write_report(args.out, JsonlLog(records_path).records(),
                 json.loads(meta_path.read_text()))


def run(args, records_path: Path, meta_path: Path) -> None:
    log = JsonlLog(records_path)
    done = {(r["code"], r["task"], r["user_index"], r["strategy"]) for r in log}
    plan = [(task, int(n)) for task, n in (pair.split(":") for pair in args.tasks.split(","))]
    strategies = args.strategies.split(",")
    old_strategies = args.old_strategies.split(",") if args.old_code else []
    jobs = [(code, task, i, s) for task, n in plan for i in range(n) for s in strategies
            for code in (("new", "old") if s in old_strategies else ("new",))]
    todo = [job for job in jobs if job not in done]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{len(todo)} of {len(jobs)} jobs to run; {uptime}", flush=True)
    new = Personalizer(args.data, args.threads)
    old = OldCode(args.old_code, args.data, args.threads) if args.old_code and any(j[0] == "old" for j in todo) else None
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"runs": []}
    meta["runs"].append({"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                         "git": git_revision(), "old_git": old.revision if old else None,
                         "uptime_start": uptime, "machine": platform.machine(), "cores": os.cpu_count(),
                         "threads": args.threads, "load_s": new.load_seconds,
                         "old_load_s": old.ready["load_s"] if old else None})
    write_json_atomic(meta_path, meta)
    try:
        for code, task, index, strategy in todo:
            record = (old if code == "old" else new).run(task, index, strategy)
            record.update(code=code, user_index=index)
            log.append(record)
            print(f"{code} {task} {record['user']} {strategy}: {record['wall_s']:.1f} s, "
                  f"peak {record['peak_rss_mb']:.0f} MB, load {record['loadavg_1min']:.1f}", flush=True)
    finally:
        if old:
            old.close()
        meta["runs"][-1]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        write_json_atomic(meta_path, meta)


def profile(args) -> None:
    """Where one user's time goes: torch.profiler's operator table and the loop's share of ``personalize()``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    worker = Personalizer(args.data, args.threads)
    warm = worker.run(args.profile, 1, "prisp")  # another user first: one-off allocations stay out of the table
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        record = worker.run(args.profile, 0, "prisp")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = args.out.with_name(args.out.stem + "_profile.md")
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    out.write_text("\n".join([
        f"# Where a PRISP user's time goes ({args.profile}, {record['user']}, default model)", "",
        "```", command, "```", "",
        f"git {git_revision()}; torch threads {args.threads}; `uptime`: `{uptime}`. Warm-up user "
        f"({warm['user']}) {warm['wall_s']:.1f} s, then the profiled user: `personalize()` {record['wall_s']:.1f} s "
        f"wall (under the profiler, which adds overhead), of which the training loop {record['train_s']:.1f} s; "
        f"{record['examples']} examples, {record['steps']} optimizer steps.", "",
        "Operators by self CPU time (torch.profiler, `key_averages()`):", "", "```", table, "```", ""]))
    print(f"wrote {out}")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def write_report(path: Path, records: list[dict], meta: dict) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in records)]
    runs = meta["runs"]
    lines = ["# Stage 2 cost per user: PRISP vs OPPU and the ablations (default model, 2 cores)", "",
             "Every strategy personalizes the same dev users of `../shared/data/lamp-offline` from the same anchor "
             "(the shipped hypernetwork's, from the task description), Table 7 schedule (one epoch over the 10 most "
             "recent items, plain + BM25-augmented examples), strategies interleaved user by user. *wall* is "
             "`personalize()` end to end in a loaded process (examples, tokenization, working copy, training, "
             "export); *train* is the loop alone; peak RSS is the process's resident size sampled during training "
             "(it includes the loaded model). Model load, once per process, is not in these numbers "
             f"({runs[-1]['load_s']:.1f} s here). Quality is not measured here (see the standard report): the "
             "loop's equivalence to the previous code path is a test (`tests/test_personalize.py`).", "",
             "Commands (each run appends to `personalize_cost.jsonl`; the report is rebuilt from all records):", ""]
    for run in runs:
        lines += ["```", f"python {run['command']}", "```",
                  f"git {run['git']}" + (f", old code git {run['old_git']}" if run.get("old_git") else "")
                  + f"; torch threads {run['threads']}; {run['machine']}, {run['cores']} cores.",
                  f"`uptime` at start: `{run['uptime_start']}`; at end: `{run.get('uptime_end', '?')}`", ""]
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        users = len({r["user"] for r in rows})
        lines += [f"## {task} ({users} users)", "",
                  "| strategy | code | users | wall s (mean) | wall s (max) | train s | peak RSS MB | peak delta MB "
                  "| trainable params | examples | final loss |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for strategy in strategies:
            for code in ("new", "old"):
                sel = [r for r in rows if r["strategy"] == strategy and r["code"] == code]
                if not sel:
                    continue
                lines.append(f"| {strategy} | {code} | {len(sel)} | {_mean(r['wall_s'] for r in sel):.1f} | "
                             f"{max(r['wall_s'] for r in sel):.1f} | {_mean(r['train_s'] for r in sel):.1f} | "
                             f"{_mean(r['peak_rss_mb'] for r in sel):.0f} | "
                             f"{_mean(r['peak_rss_delta_mb'] for r in sel):.0f} | {sel[0]['trainable_params']:,} | "
                             f"{_mean(r['examples'] for r in sel):.1f} | {_mean(r['losses'][-1] for r in sel):.4f} |")
        lines.append("")
        lines += _ratios(rows)
    lines += _targets(records)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def _ratios(rows: list[dict]) -> list[str]:
    out = []
    new = {(r["user"], r["strategy"]): r for r in rows if r["code"] == "new"}
    pairs = [(new[(r["user"], r["strategy"])], r) for r in rows if r["code"] == "old" and (r["user"], r["strategy"]) in new]
    for strategy in STRATEGIES:
        sel = [(n, o) for n, o in pairs if n["strategy"] == strategy]
        if not sel:
            continue
        loss_gap = max(abs(a - b) for n, o in sel for a, b in zip(n["losses"], o["losses"]))
        out.append(f"- {strategy}, before/after on the same {len(sel)} users: wall {_mean(o['wall_s'] for _, o in sel):.1f}"
                   f" -> {_mean(n['wall_s'] for n, _ in sel):.1f} s ({_mean(o['wall_s'] for _, o in sel) / _mean(n['wall_s'] for n, _ in sel):.2f}x"
                   f" faster), peak RSS {_mean(o['peak_rss_mb'] for _, o in sel):.0f} -> "
                   f"{_mean(n['peak_rss_mb'] for n, _ in sel):.0f} MB; largest per-step loss difference "
                   f"{loss_gap:.4f} (dropout masks fall on other rows once micro-batches are grouped by length).")
    return out + [""] if out else []


def _targets(records: list[dict]) -> list[str]:
    new = [r for r in records if r["code"] == "new"]
    lines = ["## Targets (issue: LaMP-4 <= 15 s wall per user, every task <= 45 s, PRISP <= OPPU in time and memory)",
             ""]
    for task in dict.fromkeys(r["task"] for r in new):
        rows = [r for r in new if r["task"] == task]
        p = [r for r in rows if r["strategy"] == "prisp"]
        o = [r for r in rows if r["strategy"] == "oppu"]
        if not p:
            continue
        limit = 15 if task == "LaMP-4" else 45
        worst = max(r["wall_s"] for r in rows)
        line = (f"- {task}: PRISP mean {_mean(r['wall_s'] for r in p):.1f} s (limit {limit}); slowest job of any "
                f"strategy {worst:.1f} s")
        if o:
            line += (f"; PRISP / OPPU time {_mean(r['wall_s'] for r in p) / _mean(r['wall_s'] for r in o):.2f}, "
                     f"peak RSS {_mean(r['peak_rss_mb'] for r in p) / _mean(r['peak_rss_mb'] for r in o):.3f}, "
                     f"peak delta {_mean(r['peak_rss_delta_mb'] for r in p) / _mean(r['peak_rss_delta_mb'] for r in o):.2f}")
        lines.append(line + ".")
    return lines + [""]


if __name__ == "__main__":
    main()
