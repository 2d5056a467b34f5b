"""Foundation benchmark: NP and RAG (k=1) with the default model on the offline LaMP dev splits.

Runs the public CLI (`prisp predict` then `prisp eval --json`) for each task and method, so the committed table
is reproduced by exactly the commands it lists. Writes bench/results/foundation.md and the predictions beside it.

    python bench/foundation.py [--data ../shared/data/lamp-offline] [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from prisp.data.locations import default_data_dir

TASKS = ("LaMP-1", "LaMP-2N", "LaMP-4", "LaMP-5")
METHODS = ("np", "rag")
ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir(benchmark=True)))
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    preds_dir = out_dir / "foundation"
    preds_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PRISP_THREADS": str(args.threads)}
    rows = []
    for task in TASKS:
        golds = Path(args.data) / task / f"{args.split}_outputs.json"
        questions = Path(args.data) / task / f"{args.split}_questions.json"
        for method in METHODS:
            preds = preds_dir / f"{task}.{method}.json"
            predict = ["prisp", "predict", "--task", task, "--data", args.data, "--split", args.split,
                       "--method", method, "--k", "1", "--out", str(preds)]
            if args.limit:
                predict += ["--limit", str(args.limit)]
            start = time.perf_counter()
            summary = run(predict, env).strip()
            wall = time.perf_counter() - start
            evaluate = ["prisp", "eval", "--task", task, "--golds", str(golds), "--preds", str(preds),
                        "--questions", str(questions), "--json"] + (["--partial"] if args.limit else [])
            metrics = json.loads(run(evaluate, env))
            n = len(json.loads(preds.read_text())["golds"])
            gen_seconds = float(summary.split(" queries in ")[1].split(" s ")[0])
            rows.append({"task": task, "method": method, "n": n, "metrics": metrics, "gen_s": gen_seconds,
                         "wall_s": wall, "predict": predict, "eval": evaluate})
            print(f"{task} {method}: {metrics} ({n} q, {gen_seconds:.1f} s)", flush=True)
    write_report(out_dir / "foundation.md", rows, args)


def write_report(path: Path, rows: list[dict], args) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "# Foundation benchmark: NP vs RAG (BM25 top-1) with the default model",
        "",
        f"Model `smollm2-135m` (SmolLM2-135M-Instruct, fp32 from the packaged GGUF), greedy decoding, "
        f"data `{args.data}` split `{args.split}` (offline LaMP proxies; not comparable with published LaMP numbers). "
        f"RAG retrieves from each user's 10 most recent profile items. Label answers that start with a label are "
        f"snapped onto it (`1` -> `[1]`, `Politics.` -> `politics`; `--no-snap` turns it off); the metric itself is "
        f"the official one. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads}; git {rev.strip()}.",
        "",
        "Produced by:",
        "",
        "```",
        f"python bench/foundation.py --data {args.data} --split {args.split} --threads {args.threads}"
        + (f" --limit {args.limit}" if args.limit else ""),
        "```",
        "",
        "| task | method | queries | metrics | queries/s | generation s |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        lines.append(f"| {r['task']} | {r['method'].upper()} | {r['n']} | {metrics} | {r['n'] / r['gen_s']:.3f} "
                     f"| {r['gen_s']:.1f} |")
    lines += ["", "Each row is reproduced by its two commands (predictions are committed under `foundation/`):", ""]
    for r in rows:
        lines += [f"- {r['task']} {r['method'].upper()}:", f"  `{' '.join(r['predict'])}` then",
                  f"  `{' '.join(r['eval'])}`"]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
