"""Stage 2 cost benchmark: PRISP vs OPPU and the Table 5 ablations, for the same users, from the same anchor.

For the first N users of a task's dev split (default model, Table 7 hyperparameters), every strategy personalizes
each user from the same task-adapted anchor (50 random task samples from the task-adaptive `train` users, Table 7
task-adaptation settings) and answers that user's queries. Records per user: seconds, peak memory, trainable
parameters; per strategy: the task metrics of the personalized predictions vs NP (base model) and the anchor alone.

    python bench/personalize_cost.py [--task LaMP-4] [--users 10] [--data ../shared/data/lamp-offline]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from prisp.adapters import attach_lora
from prisp.data.lamp import LampSplit, load_task_split
from prisp.data.tasks import label_set
from prisp.metrics import evaluate, task_score
from prisp.models import load_model
from prisp.personalize import STRATEGIES, PersonalizeConfig, personalization_hyperparams, personalize, task_adapt
from prisp.predict import PredictConfig, predict_split

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="LaMP-4")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--data", default=os.environ.get("PRISP_DATA", str(ROOT.parent / "shared/data/lamp-offline")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="override Table 7's personalization lr")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", default=str(ROOT / "bench/results/personalize_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    dev = load_task_split(args.data, args.task, "dev")
    train_split = load_task_split(args.data, args.task, "train")
    labels = label_set(args.task, dev.inputs)
    users = list(dev.users.items())[: args.users]
    queries = [q for _, qs in users for q in qs]
    subset = LampSplit(dev.task, dev.split, queries)
    golds = [q.gold for q in queries]

    start = time.perf_counter()
    adapted = task_adapt(model, tok, args.task, train_split.queries, 50, seed=0,
                         labels=label_set(args.task, train_split.inputs))
    print(f"anchor: task-adapted in {time.perf_counter() - start:.1f} s", flush=True)
    rows = {"np": _score(args.task, golds, predict_split(model, tok, subset, PredictConfig()).outputs, labels)}
    anchored = attach_lora(copy.deepcopy(model), adapted.weights).eval()
    rows["anchor"] = _score(args.task, golds, predict_split(anchored, tok, subset, PredictConfig()).outputs, labels)
    del anchored
    print(f"np: {rows['np']}\nanchor: {rows['anchor']}", flush=True)

    per_user: dict[str, list[dict]] = {}
    for name in args.strategies.split(","):
        config = PersonalizeConfig(strategy=name, lr=args.lr, progress=False)
        outputs, per_user[name] = [], []
        for user, user_queries in users:
            result = personalize(model, tok, adapted.weights, args.task, user_queries[0].profile, config, labels)
            run = predict_split(result.model, tok, LampSplit(dev.task, dev.split, user_queries), PredictConfig())
            outputs += run.outputs
            per_user[name].append({"user": user, "seconds": result.train.seconds, "peak_rss_mb": result.train.peak_rss_mb,
                                   "peak_delta_mb": result.train.peak_rss_delta_mb,
                                   "trainable": result.train.trainable_params, "steps": result.train.steps,
                                   "final_loss": result.train.final_loss})
            del result
            print(f"{name} {user}: {per_user[name][-1]}", flush=True)
        rows[name] = _score(args.task, golds, outputs, labels)
        print(f"{name}: {rows[name]}", flush=True)
    write_report(Path(args.out), args, rows, per_user, adapted, len(queries))


def _score(task, golds, preds, labels) -> dict:
    metrics = evaluate(task, golds, preds, labels)
    return {**metrics, "score": task_score(task, metrics)}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else float("nan")


def write_report(path: Path, args, rows, per_user, adapted, n_queries) -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    hp = personalization_hyperparams(args.task)
    keys = [k for k in rows["np"] if k != "score"]
    cmd = (f"python bench/personalize_cost.py --task {args.task} --users {args.users} --data {args.data} "
           f"--threads {args.threads}" + (f" --lr {args.lr}" if args.lr else ""))
    lines = [f"# Stage 2 cost: PRISP vs OPPU and ablations ({args.task}, {args.users} users, default model)", "",
             f"Data `{args.data}` dev split, first {args.users} users ({n_queries} queries). Anchor: task-adapted "
             f"LoRA (r 8, q/v) on 50 random `train` samples, 3 epochs, lr 1e-4, batch 6 "
             f"({adapted.train.seconds:.1f} s). Personalization: one epoch over the 10 most recent items (plain + "
             f"BM25-augmented = up to 19 examples), batch {hp.batch_size}, lr {args.lr or hp.lr} (Table 7), "
             f"micro-batch 4. Peak memory is process RSS sampled during training (CPU); 'delta' is the rise above "
             f"the RSS at the start of training. Machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"torch threads {args.threads}; git {rev.strip()}.", "", "```", cmd, "```", "",
             "## Averages per user", "",
             f"| method | trainable params | seconds | peak RSS MB | peak delta MB | {' | '.join(keys)} | score |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(keys) + 1)]
    for name in ("np", "anchor", *per_user):
        users = per_user.get(name, [])
        cost = (f"{users[0]['trainable']:,} | {_mean(u['seconds'] for u in users):.2f} | "
                f"{_mean(u['peak_rss_mb'] for u in users):.0f} | {_mean(u['peak_delta_mb'] for u in users):.0f}"
                if users else "- | - | - | -")
        metrics = " | ".join(f"{rows[name][k]:.4f}" for k in keys)
        lines.append(f"| {name} | {cost} | {metrics} | {rows[name]['score']:.4f} |")
    if "prisp" in per_user and "oppu" in per_user:
        p, o = per_user["prisp"], per_user["oppu"]
        lines += ["", f"Measured ratios PRISP / OPPU: time {_mean(u['seconds'] for u in p) / _mean(u['seconds'] for u in o):.2f}, "
                  f"peak RSS {_mean(u['peak_rss_mb'] for u in p) / _mean(u['peak_rss_mb'] for u in o):.2f}, "
                  f"peak delta {_mean(u['peak_delta_mb'] for u in p) / _mean(u['peak_delta_mb'] for u in o):.2f}, "
                  f"trainable params {p[0]['trainable'] / o[0]['trainable']:.2f}."]
    lines += ["", "## Per user", "", "| method | user | seconds | peak RSS MB | peak delta MB | steps | final loss |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, users in per_user.items():
        for u in users:
            lines.append(f"| {name} | {u['user']} | {u['seconds']:.2f} | {u['peak_rss_mb']:.0f} | "
                         f"{u['peak_delta_mb']:.0f} | {u['steps']} | {u['final_loss']:.4f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (path.with_suffix(".json")).write_text(json.dumps({"rows": rows, "per_user": per_user}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
