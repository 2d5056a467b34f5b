"""Does the Stage-1 anchor help? Held-out SNI tasks, LaMP dev, and description robustness (Fig. 8).

    python bench/hypernet_eval.py [--sni ../shared/data/sni/tasks.jsonl] [--data ../shared/data/lamp-offline]
                                  [--users 4] [--threads 1] [--hypernet PATH] [--parts sni,lamp,robustness]

1. The 11 held-out SNI tasks: base model vs base + the anchor generated from each task's held-out description
   (ROUGE-L and exact match over every instance).
2. LaMP dev (LaMP-1, 2N, 4, 5), the first ``--users`` users of each task (the same users as
   ``prisp bench --profile standard --users N``): NP on the base model, the Stage-1 anchor alone (Table 11
   descriptions), Stage 2 (the ``prisp`` strategy) from the hypernetwork anchor, from the task-adapted anchor
   and from a random anchor (peft's init: A random, B = 0); the task-adapted anchor alone for reference.
3. LaMP-2N with the reference description, a paraphrase and an imprecise one: Stage 1 and Stage 2.

Task-adapted anchors and per-user adapters are read from / written to the standard benchmark's cache
(``--bench-out``, default ``bench/results/standard``): both are content-addressed (anchor weights, options, user
items), so a cell computed by either script is the same computation. Writes
``bench/results/hypernet_eval.md`` and ``hypernet_eval.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from prisp.data.locations import default_data_dir, default_sni_file

ROOT = Path(__file__).resolve().parents[1]
LAMP_TASKS = ("LaMP-1", "LaMP-2N", "LaMP-4", "LaMP-5")
# Fig. 8's three kinds of description for LaMP-2N (the reference one is Table 11's, see TaskSpec.description).
ROBUSTNESS = {
    "paraphrase": "Read a news headline together with its short description and assign the article to the "
    "single category it belongs to.",
    "imprecise": "Help me sort some news.",
}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .")


def exact_match(golds: list[str], preds: list[str]) -> float:
    return sum(normalize(g) == normalize(p) for g, p in zip(golds, preds)) / max(1, len(golds))


def sni_scores(golds: list[str], preds: list[str]) -> dict:
    from prisp.metrics import generation_metrics

    return {"rouge-L": generation_metrics(golds, preds)["rouge-L"], "em": exact_match(golds, preds)}


def sni_part(loaded, anchorer, sni_path: Path, max_new_tokens: int) -> dict:
    from prisp.adapters import attach_lora
    from prisp.generation import GenerationConfig, generate
    from prisp.hypernet.data import load_sni

    data = load_sni(sni_path)
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=8, max_input_tokens=512)
    rows, all_golds, all_base, all_anchor = [], [], [], []
    for task in data.split("heldout"):
        prompts = [i.input for i in task.instances]
        golds = [i.output for i in task.instances]
        anchor = anchorer.generate(task.eval_description)
        base_out = generate(loaded.model, loaded.tokenizer, prompts, config).texts
        model = attach_lora(copy.deepcopy(loaded.model), anchor.weights).eval()
        anchor_out = generate(model, loaded.tokenizer, prompts, config).texts
        del model
        row = {
            "task": task.name,
            "n": len(prompts),
            "description": task.eval_description,
            "base": sni_scores(golds, base_out),
            "anchor": sni_scores(golds, anchor_out),
            "examples": [
                {"gold": g, "base": b, "anchor": a} for g, b, a in list(zip(golds, base_out, anchor_out))[:2]
            ],
        }
        print(f"SNI {task.name}: base {row['base']} anchor {row['anchor']}", flush=True)
        rows.append(row)
        all_golds += golds
        all_base += base_out
        all_anchor += anchor_out
    overall = {
        "n": len(all_golds),
        "base": sni_scores(all_golds, all_base),
        "anchor": sni_scores(all_golds, all_anchor),
    }
    return {"tasks": rows, "overall": overall, "sha256": data.sha256}


class LampEval:
    """Scores one LaMP task's target users under several anchors / stages, on the benchmark's settings."""

    def __init__(self, loaded, model_name: str, data: Path, task: str, users: int, bench_out: Path):
        from prisp.bench.config import BenchConfig
        from prisp.bench.context import TaskContext
        from prisp.bench.runner import predict_config

        self.loaded, self.model_name, self.task = loaded, model_name, task
        self.config = BenchConfig(
            tasks=(task,), data=data, users=users, model=model_name, out=bench_out, progress=False
        )
        self.ctx = TaskContext(self.config, task, loaded, embedder=None)
        self.targets = self.ctx.targets(users)
        # The benchmark's own options (Base variant): identical prompts and decoding, and identical adapter
        # cache keys, so a user personalized by either script is reused by the other.
        self.pconf, _ = predict_config(self.config, self.ctx, self.targets, "np", self.config.items)

    def score(self, run) -> dict:
        from prisp.metrics import evaluate, task_score

        metrics = evaluate(self.task, [g or "" for g in run.golds], run.outputs, self.ctx.labels)
        return {"metrics": metrics, "score": task_score(self.task, metrics), "queries": len(run.ids)}

    def stage1(self, weights) -> dict:
        """Predictions with ``weights`` applied (None: the base model)."""
        from prisp.adapters import attach_lora
        from prisp.predict import predict_split

        model = (
            self.loaded.model if weights is None else attach_lora(copy.deepcopy(self.loaded.model), weights)
        )
        start = time.perf_counter()
        out = self.score(predict_split(model.eval(), self.loaded.tokenizer, self.targets, self.pconf))
        return {**out, "seconds": time.perf_counter() - start}

    def stage2(self, weights) -> dict:
        """Stage 2 (the prisp strategy, Table 7 schedule) per user from ``weights``, then predictions: the
        benchmark's PRISP cell with ``weights`` plugged in as the PRISP anchor."""
        from prisp.bench.anchors import Anchor
        from prisp.bench.context import TaskContext
        from prisp.bench.methods import get_method
        from prisp.bench.results import Cell
        from prisp.bench.runner import run_personal

        ctx = TaskContext(self.config, self.task, self.loaded, embedder=None,
                          prisp_anchor=lambda _: Anchor(weights, "given", requires_task_data=False))
        cell = Cell(self.task, "prisp", "np", self.config.items, self.config.users)
        start = time.perf_counter()
        outcome = run_personal(ctx, get_method("prisp"), cell, self.targets, self.pconf)
        train = [c.seconds for c in outcome.costs]
        return {
            **self.score(outcome.run),
            "seconds": time.perf_counter() - start,
            "train_seconds_mean": sum(train) / len(train),
            "cached_users": sum(c.cached for c in outcome.costs),
        }


def lamp_part(loaded, anchorer, args, out: dict, save) -> dict:
    """Adds each task of ``args.tasks`` not yet in ``out`` (a resumed run keeps finished tasks), saving after each."""
    from prisp.adapters import LoraSpec, random_init
    from prisp.data.tasks import get_task

    for task in args.tasks:
        if task in out:
            continue
        ev = LampEval(loaded, args.model, Path(args.data), task, args.users, Path(args.bench_out))
        hyper = anchorer.generate(get_task(task).description).weights
        adapted = ev.ctx.task_anchor(with_sharer_data=False)
        rand = random_init(loaded.model, LoraSpec(), seed=args.seed)
        rows = {}
        for name, stage, weights in (
            ("NP (base model)", ev.stage1, None),
            ("Stage 1: hypernet anchor alone", ev.stage1, hyper),
            ("task-adapted anchor alone", ev.stage1, adapted.weights),
            ("Stage 2 from hypernet anchor", ev.stage2, hyper),
            ("Stage 2 from task-adapted anchor", ev.stage2, adapted.weights),
            ("Stage 2 from random anchor", ev.stage2, rand),
        ):
            rows[name] = stage(weights)
            print(f"{task} {name}: {rows[name]['metrics']}", flush=True)
        out[task] = {"users": len(ev.targets.users), "rows": rows, "task_adapted_source": adapted.source}
        save()
    return out


def robustness_part(loaded, anchorer, args, lamp: dict) -> dict:
    from prisp.data.tasks import get_task

    task = "LaMP-2N"
    ev = LampEval(loaded, args.model, Path(args.data), task, args.users, Path(args.bench_out))
    rows = {}
    for kind, text in (("reference", get_task(task).description), *ROBUSTNESS.items()):
        if kind == "reference" and task in lamp:
            stage1 = lamp[task]["rows"]["Stage 1: hypernet anchor alone"]
            stage2 = lamp[task]["rows"]["Stage 2 from hypernet anchor"]
        else:
            weights = anchorer.generate(text).weights
            stage1, stage2 = ev.stage1(weights), ev.stage2(weights)
        rows[kind] = {"description": text, "stage1": stage1, "stage2": stage2}
        print(f"robustness {kind}: stage1 {stage1['metrics']} stage2 {stage2['metrics']}", flush=True)
    return rows


def fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def write_report(path: Path, result: dict, args) -> None:
    lines = [
        "# Does the Stage-1 anchor help? (issue 4's benchmark)",
        "",
        f"Hypernetwork: {result['hypernet']}. Model `{args.model}`, greedy decoding, {args.threads} torch "
        f"thread(s) on {platform.machine()} ({os.cpu_count()} cores), git {result['git']}. "
        f"Wall time {result['seconds'] / 60:.1f} min (all commands).",
        "",
        "Produced by:",
        "",
        "```",
        *result["commands"],
        "```",
        "",
    ]
    if "sni" in result:
        sni = result["sni"]
        o = sni["overall"]
        lines += [
            "## 1. Held-out SNI tasks (never trained on; anchor from each task's held-out description)",
            "",
            f"Data sha256 `{sni['sha256']}`; every instance of the 11 held-out tasks ({o['n']}), "
            f"answers cut at {args.sni_max_new_tokens} new tokens and at the first line. Exact match compares "
            "lower-cased, whitespace-collapsed text without a final period.",
            "",
            "| task | n | base ROUGE-L | anchor ROUGE-L | base EM | anchor EM |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in sni["tasks"]:
            lines.append(
                f"| {r['task']} | {r['n']} | {r['base']['rouge-L']:.4f} | {r['anchor']['rouge-L']:.4f} "
                f"| {r['base']['em']:.3f} | {r['anchor']['em']:.3f} |"
            )
        lines += [
            f"| **all** | {o['n']} | **{o['base']['rouge-L']:.4f}** | **{o['anchor']['rouge-L']:.4f}** "
            f"| **{o['base']['em']:.3f}** | **{o['anchor']['em']:.3f}** |",
            "",
        ]
    if "lamp" in result:
        lines += [
            "## 2. LaMP dev: NP vs Stage 1 vs Stage 2 from three anchors",
            "",
            f"The first {args.users} users of each task's dev split (the standard benchmark's target users), "
            "their queries answered with the Table 16 prompt (Base variant, no retrieval). Stage 2 = the `prisp` "
            "strategy (A frozen, B and the bridge C trained one epoch on the user's 10 most recent items, Table 7 "
            "schedule). Score = the task's Table 2 number ((acc+F1)/2 or (R1+RL)/2). Task-adapted anchor: 50 "
            "task-adaptive queries, 3 epochs (it *requires task data*; the hypernet anchor does not).",
            "",
            "| task | users / queries | row | metrics | score | train s / user |",
            "|---|---|---|---|---:|---:|",
        ]
        for task, t in result["lamp"].items():
            for name, r in t["rows"].items():
                train = f"{r['train_seconds_mean']:.1f}" if "train_seconds_mean" in r else ""
                lines.append(
                    f"| {task} | {t['users']} / {r['queries']} | {name} | {fmt_metrics(r['metrics'])} "
                    f"| {r['score']:.4f} | {train} |"
                )
        names = list(next(iter(result["lamp"].values()))["rows"])
        lines += ["", "Average score over the tasks:", "", "| row | avg score |", "|---|---:|"]
        for name in names:
            avg = sum(t["rows"][name]["score"] for t in result["lamp"].values()) / len(result["lamp"])
            lines.append(f"| {name} | {avg:.4f} |")
        lines.append("")
    if "robustness" in result:
        lines += [
            "## 3. Description robustness on LaMP-2N (Fig. 8)",
            "",
            "| description | text | Stage 1 score | Stage 2 score |",
            "|---|---|---:|---:|",
        ]
        for kind, r in result["robustness"].items():
            lines.append(
                f"| {kind} | {r['description']} | {r['stage1']['score']:.4f} | {r['stage2']['score']:.4f} |"
            )
        lines.append("")
    lines += ["## What this shows", "", "(written by hand after the run; see the issue's closing note)", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sni", default=str(default_sni_file()))
    parser.add_argument("--data", default=str(default_data_dir(benchmark=True)))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--hypernet", default=None, help="checkpoint (default: the one shipped for the model)"
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--tasks", default=",".join(LAMP_TASKS))
    parser.add_argument("--parts", default="sni,lamp,robustness")
    parser.add_argument("--bench-out", default=str(ROOT / "bench/results/standard"))
    parser.add_argument("--sni-max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench/results/hypernet_eval.md"))
    parser.add_argument("--fresh", action="store_true", help="ignore the results of an earlier run")
    args = parser.parse_args()
    args.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    parts = set(args.parts.split(","))

    import torch

    torch.set_num_threads(args.threads)
    from prisp.console import quiet_transformers
    from prisp.hypernet.anchor import Anchorer
    from prisp.hypernet.checkpoint import read_meta, shipped_checkpoint
    from prisp.models import load_model

    quiet_transformers()
    started = time.perf_counter()
    loaded = load_model(args.model)
    anchorer = Anchorer.load(args.hypernet, args.model, loaded.model, loaded.tokenizer)
    hyper_path = Path(args.hypernet) if args.hypernet else shipped_checkpoint(args.model)
    meta = read_meta(hyper_path)
    steps = (meta.get("training") or {}).get("step")
    hypernet = f"`{hyper_path.relative_to(ROOT) if hyper_path.is_relative_to(ROOT) else hyper_path}`" + (
        f" ({steps} SFT steps)" if steps else ""
    )
    out = Path(args.out)
    json_file = out.with_suffix(".json")
    # Parts (and LaMP tasks) already in the JSON from an earlier run with the same hypernet are kept, so an
    # interrupted evaluation continues where it stopped; --fresh starts over.
    result = json.loads(json_file.read_text()) if json_file.is_file() and not args.fresh else {}
    if result.get("hypernet") != hypernet:
        result = {"hypernet": hypernet, "commands": [], "seconds": 0.0}
    result["commands"].append("python bench/hypernet_eval.py " + " ".join(sys.argv[1:]))
    result["git"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    seconds_before = result["seconds"]

    def save() -> None:
        result["seconds"] = seconds_before + time.perf_counter() - started
        tmp = json_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(json_file)
        write_report(out, result, args)

    if "sni" in parts and "sni" not in result:
        result["sni"] = sni_part(loaded, anchorer, Path(args.sni), args.sni_max_new_tokens)
        save()
    if "lamp" in parts:
        result["lamp"] = lamp_part(loaded, anchorer, args, result.get("lamp", {}), save)
    if "robustness" in parts and "robustness" not in result:
        result["robustness"] = robustness_part(loaded, anchorer, args, result.get("lamp", {}))
    save()


if __name__ == "__main__":
    main()
