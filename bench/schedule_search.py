"""Stage-2 schedule search on ``train``-split users (never ``dev``): the source of ``--schedule tuned``.

For every task and every trained strategy (prisp, oppu, no-bridge, bridge-only) the same grid of
(learning rate, epochs) at batch size 4 is tried on the same users from the same anchor (the shipped
hypernetwork's, from the task's description), so each method gets the same search and the same budget.

What a cell is judged by: the personalized model's mean per-token NLL of the user's own answers on
**held-out history items** (the items just older than the 10 it trained on, in the task's prompt wording),
averaged per user and then over users. It is the question Stage 2 exists to answer (does the adapter predict
*this* user better?), it is available for every task, and with ~8 probes per user it is far less noisy than
the one LaMP query a user has. Beside it: the task score on those held-out items (label tasks by label
scoring, generation tasks by greedy decoding; LaMP-1's items are abstracts, so none), the user's query
answered as the product does (labels for LaMP-1/2N, free text for LaMP-4/5), and seconds per user.
Reference rows: ``anchor`` (no Stage 2) and ``paper`` (Table 7's schedule).

Records go to ``--out``'s ``.jsonl`` as they finish; a re-run skips what is there (resumable), and more
``--users`` extends a finished search. ``--report-only`` rewrites the report.

``--refine K`` is the second round of a successive-halving search: each strategy's K best grid cells (lowest held
NLL over the users every one of its grid cells has) are run on more users, up to ``--users``; the rest of the grid
is not. The same K for every strategy keeps the budget equal. The chosen cell is then the finalist with the lowest
held NLL over the users all finalists share, so one or two users no longer decide a task's schedule alone.

    python bench/schedule_search.py --data ../shared/data/lamp-offline --tasks LaMP-4,LaMP-2N,LaMP-1,LaMP-5 \\
        --users 2 --threads 2 --out bench/results/schedule_search
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

from prisp.data.locations import default_data_dir
from prisp.files import JsonlLog, write_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("prisp", "oppu", "no-bridge", "bridge-only")
# One epoch at three learning rates, and one two-epoch cell: a second epoch doubles the per-user cost, so it has
# to earn it. Measured first on one train user (LaMP-4): held NLL anchor 4.51, paper 4.32, 1e-3 4.09, 3e-3 3.90.
# 3e-2 and 1e-1 were added after the first pass: bridge-only (64 trainable numbers per module) chose the grid's
# top lr, 1e-2, on every task; the cells run for every strategy so the budget stays the same for all. 3e-1 was
# added for the same reason when bridge-only chose 1e-1, again the top, on every task.
GRID = ((1e-3, 1), (3e-3, 1), (1e-2, 1), (3e-2, 1), (1e-1, 1), (3e-1, 1), (3e-3, 2))
BATCH = 4
HELD_OUT = 8
MIN_HELD_OUT = 4


# Own learning rate for a second factor, two cells for each strategy that trains two factors: PRISP's bridge C
# (bridge-only's best rate was the grid's top, ~30x B's) and, with as many cells, OPPU's B (LoRA+-style: B faster
# than A). no-bridge and bridge-only train one factor each: their single lr already spans 1e-3..3e-1.
# The second pass added 3e-1 (PRISP chose 1e-1, the top, on LaMP-2N) and the same rates at two epochs (the
# two-epoch cell won on LaMP-1 and LaMP-5, where the factor rates had only been tried at one).
FACTOR_BASES = ((3e-3, 1), (3e-3, 2))
FACTOR_LRS = {"prisp": ("C", (3e-2, 1e-1, 3e-1)), "oppu": ("B", (3e-2, 1e-1, 3e-1))}
# The SVD starts (PiSSA, LoRA-GA) begin with large factors (the base weights' principal components, or the scaled
# gradient's), so their optimum sits lower: on the first LaMP-4 train user both beat the grid's bottom cell (1e-3)
# with Table 7's 5e-4. Two lower cells for them only; more cells can only help these baselines.
LOW_LRS = {"pissa": ((1e-4, 1), (3e-4, 1)), "lora-ga": ((1e-4, 1), (3e-4, 1))}


def grid_cells(strategy: str) -> list[str]:
    return [c["cell"] for c in cells(strategy) if c["cell"].startswith("lr=")]


def cells(strategy: str | None = None) -> list[dict]:
    grid = [{"cell": f"lr={lr:g},ep={ep}", "lr": lr, "epochs": ep, "batch_size": BATCH}
            for lr, ep in (*LOW_LRS.get(strategy, ()), *GRID)]
    if strategy in FACTOR_LRS:
        factor, rates = FACTOR_LRS[strategy]
        grid += [{"cell": f"lr={lr:g},ep={ep},lr{factor}={rate:g}", "lr": lr, "epochs": ep, "batch_size": BATCH,
                  f"lr_{factor}": rate} for lr, ep in FACTOR_BASES for rate in rates]
    return [{"cell": "anchor"}, {"cell": "paper"}] + grid


class Search:
    def __init__(self, data: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        from prisp.console import quiet_transformers
        from prisp.models import load_model

        quiet_transformers()
        self.loaded = load_model("smollm2-135m")
        self.data = data
        self.tasks: dict[str, tuple] = {}

    def task(self, task: str, users: int, seed: int):
        if task not in self.tasks:
            from prisp.data.lamp import load_task_split
            from prisp.data.tasks import get_task, label_set
            from prisp.hypernet.anchor import Anchorer

            split = load_task_split(self.data, task, "train")
            anchorer = Anchorer.load(None, "smollm2-135m", self.loaded.model, self.loaded.tokenizer)
            anchor = anchorer.generate(get_task(split.task).description).weights
            eligible = sorted(u for u, qs in split.users.items() if len(qs[0].profile) >= 10 + MIN_HELD_OUT)
            random.Random(seed).shuffle(eligible)
            self.tasks[task] = (split, anchor, label_set(split.task, split.inputs), eligible)
        split, anchor, labels, eligible = self.tasks[task]
        return split, anchor, labels, eligible[:users]

    def run(self, task: str, user: str, strategy: str, cell: dict, users: int, seed: int) -> dict:
        import torch

        from prisp.adapters import attach_lora, shared_copy
        from prisp.personalize import PersonalizeConfig
        from prisp.personalize.personalizer import personalize

        split, anchor, labels, _ = self.task(task, users, seed)
        query = split.users[user][0]
        model_, tok = self.loaded.model, self.loaded.tokenizer
        wall, train = 0.0, None
        if cell["cell"] == "anchor":
            model = attach_lora(shared_copy(model_), anchor).eval()
        else:
            options = {} if cell["cell"] == "paper" else {
                k: cell[k] for k in ("lr", "epochs", "batch_size", "lr_B", "lr_C") if k in cell}
            start = time.perf_counter()
            result = personalize(model_, tok, anchor, split.task, query.profile,
                                 PersonalizeConfig(strategy=strategy, progress=False, **options), labels)
            wall = time.perf_counter() - start
            model, train = result.model, result.train
        with torch.no_grad():
            probe = evaluate(model, tok, split.task, query, labels)
        return {"task": task, "user": user, "strategy": strategy, "cell": cell["cell"],
                "lr": result.hyperparams["lr"] if train else None,
                "epochs": result.hyperparams["epochs"] if train else None,
                "batch_size": result.hyperparams["batch_size"] if train else None,
                "lr_B": result.hyperparams.get("lr_B") if train else None,
                "lr_C": result.hyperparams.get("lr_C") if train else None,
                "steps": train.steps if train else 0, "wall_s": wall,
                "peak_rss_mb": train.peak_rss_mb if train else None, **probe,
                "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}


def evaluate(model, tokenizer, task: str, query, labels) -> dict:
    """Held-out history NLL and score, and the query's NLL and answer, for one personalized model."""
    from prisp.data.examples import item_example
    from prisp.data.protocol import recent_items
    from prisp.data.tasks import get_task
    from prisp.generation import GenerationConfig, generate
    from prisp.metrics import rouge_per_query
    from prisp.predict import METHODS, PredictConfig, build_prompt
    from prisp.scoring import score_labels
    from prisp.training import Example, causal_lm_loss, collate, tokenize_examples

    spec = get_task(task)
    older = recent_items(query.profile, 10 + HELD_OUT)[:-10][-HELD_OUT:]
    held = [item_example(spec.name, item, labels) for item in older]
    prompt = build_prompt(spec.name, query, METHODS["np"], PredictConfig(), labels)
    examples = held + [Example(prompt, query.gold)]
    pad = tokenizer.pad_token_id or 0
    nll = [float(causal_lm_loss(model, collate([t], pad))) for t in tokenize_examples(tokenizer, examples, 512)]

    def answers(prompts: list[str]) -> list[str]:
        if spec.kind != "generation":
            return list(score_labels(model, tokenizer, prompts, labels).choices)
        return list(generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=spec.max_new_tokens)).texts)

    def scores(golds: list[str], preds: list[str]) -> list[float]:
        if spec.kind != "generation":
            return [float(p.strip() == g.strip()) for g, p in zip(golds, preds)]
        return [(r1 + rl) / 2 for r1, rl in rouge_per_query(golds, preds)]

    held_score = None
    if spec.name != "LaMP-1":  # LaMP-1's history items are abstracts, not citation choices
        held_score = statistics.fmean(scores([e.answer for e in held], answers([e.prompt for e in held])))
    answer = answers([prompt])[0]
    return {"held_out": len(held), "held_nll": statistics.fmean(nll[:-1]), "held_score": held_score,
            "query_nll": nll[-1], "query_answer": answer, "query_gold": query.gold,
            "query_score": scores([query.gold], [answer])[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir(benchmark=True)))
    parser.add_argument("--tasks", default="LaMP-4,LaMP-2N,LaMP-1,LaMP-5")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/schedule_search"))
    parser.add_argument("--refine", type=int, default=0, metavar="K",
                        help="run only each strategy's K best grid cells on the users up to --users (0: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.refine < 0:
        parser.error("--refine must be >= 0")
    out = Path(args.out)
    records_path, meta_path = out.with_suffix(".jsonl"), out.with_suffix(".meta.json")
    if not args.report_only:
        run(args, records_path, meta_path)
    records = JsonlLog(records_path).records()
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    write_atomic(out.with_suffix(".md"), report(records, meta))
    print(out.with_suffix(".md"))


def run(args, records_path: Path, meta_path: Path) -> None:
    log = JsonlLog(records_path)
    records = log.records()
    done = {(r["task"], r["user"], r["strategy"], r["cell"]) for r in records}
    strategies = args.strategies.split(",")
    # Every task's plan before the model loads: a refinement that cannot run is refused before any work.
    plans = {task: plan(records, task, strategies, args.refine) for task in args.tasks.split(",")}
    search = Search(args.data, args.threads)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    meta = {"command": "python bench/schedule_search.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("report_only", "data")),
        "revision": revision, "grid": {"lr_epochs": GRID, "batch_size": BATCH},
        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    for task, grids in plans.items():
        _, _, _, users = search.task(task, args.users, args.seed)
        if args.refine:
            for strategy, grid in grids.items():
                print(f"{task} {strategy}: refining {', '.join(sorted(c['cell'] for c in grid[1:]))}", flush=True)
        for user in users:  # strategies and cells take turns user by user: load changes hit all alike
            for strategy, grid in grids.items():
                for cell in grid:
                    if (task, user, strategy, cell["cell"]) in done:
                        continue
                    if cell["cell"] == "anchor" and (task, user, "-", "anchor") in done:
                        continue  # the anchor is the same model for every strategy
                    record = search.run(task, user, strategy, cell, args.users, args.seed)
                    if cell["cell"] == "anchor":
                        record["strategy"] = "-"
                    log.append(record)
                    done.add((task, user, record["strategy"], cell["cell"]))
                    print(f"{task} {user} {strategy} {cell['cell']}: held NLL {record['held_nll']:.3f} "
                          f"score {record['held_score']} query {record['query_score']:.2f} "
                          f"{record['wall_s']:.1f}s", flush=True)
    meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    earlier = json.loads(meta_path.read_text()).get("runs", []) if meta_path.exists() else []
    write_json_atomic(meta_path, {**meta, "runs": earlier + [meta]})


def plan(records: list[dict], task: str, strategies: list[str], refine: int) -> dict[str, list[dict]]:
    """Each strategy's cells to run on ``task``: the whole grid, or with ``refine`` K the anchor and its K leaders.

    Raises:
        SystemExit: ``refine`` without a full first round (:func:`leaders`).
    """
    grids = {strategy: cells(strategy) for strategy in strategies}
    if refine:
        for strategy, grid in grids.items():
            keep = set(leaders(records, task, strategy, refine))
            grids[strategy] = [c for c in grid if c["cell"] == "anchor" or c["cell"] in keep]
    return grids


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summarise(records: list[dict]) -> dict:
    """{(task, strategy, cell): means over users} with the anchor's row under every strategy."""
    table: dict[tuple, dict] = {}
    unique = {(r["task"], r["user"], r["strategy"], r["cell"]): r for r in records}  # a resumed run's repeats
    records = list(unique.values())
    keys = sorted({(r["task"], r["strategy"], r["cell"]) for r in records})
    for task, strategy, cell in keys:
        rows = [r for r in records if (r["task"], r["strategy"], r["cell"]) == (task, strategy, cell)]
        table[(task, strategy, cell)] = {
            "users": len(rows), "held_nll": _mean(r["held_nll"] for r in rows),
            "held_score": _mean(r["held_score"] for r in rows), "query_nll": _mean(r["query_nll"] for r in rows),
            "query_score": _mean(r["query_score"] for r in rows), "wall_s": _mean(r["wall_s"] for r in rows),
            "peak_rss_mb": _mean(r["peak_rss_mb"] for r in rows), "steps": _mean(r["steps"] for r in rows)}
    return table


def _held(records: list[dict], task: str, strategy: str) -> dict[str, dict[str, float]]:
    """{grid cell: {user: held NLL}} of one (task, strategy)."""
    held: dict[str, dict[str, float]] = {}
    for r in records:
        if (r["task"], r["strategy"]) == (task, strategy) and r["cell"].startswith("lr="):
            held.setdefault(r["cell"], {})[r["user"]] = r["held_nll"]
    return held


def _ranked(held: dict[str, dict[str, float]], names) -> list[tuple[str, float, int]]:
    """(cell, mean held NLL over the users all ``names`` share, users), best first."""
    names = list(names)
    common = set.intersection(*(set(held[c]) for c in names)) if names else set()
    if not common:
        return []
    return sorted(((c, statistics.fmean(held[c][u] for u in common), len(common)) for c in names),
                  key=lambda row: row[1])


def leaders(records: list[dict], task: str, strategy: str, k: int) -> list[str]:
    """The k grid cells of (task, strategy) with the lowest mean held NLL over the users every grid cell has.

    Raises:
        SystemExit: no user has the whole grid yet (refinement needs a full first round).
    """
    held, grid = _held(records, task, strategy), grid_cells(strategy)
    ranked = _ranked(held, grid) if all(c in held for c in grid) else []
    if not ranked:
        raise SystemExit(f"--refine: {task} {strategy} has no user with every grid cell; run the full grid first")
    return [cell for cell, _, _ in ranked[:k]]


def finalists(records: list[dict], task: str, strategy: str) -> list[tuple[str, float, int]]:
    """The cells run on the most users (all cells before any refinement), ranked over the users they share."""
    held = _held(records, task, strategy)
    if not held:
        return []
    most = max(len(users) for users in held.values())
    return _ranked(held, [c for c, users in held.items() if len(users) == most])


def all_finalists(records: list[dict]) -> dict[tuple[str, str], list[tuple[str, float, int]]]:
    """:func:`finalists` of every searched (task, strategy); a resumed run's repeats count once (the last)."""
    pairs = sorted({(r["task"], r["strategy"]) for r in records if r["strategy"] != "-"})
    return {pair: ranked for pair in pairs if (ranked := finalists(records, *pair))}


def chosen(records: list[dict]) -> dict[tuple[str, str], str]:
    """The finalist with the lowest held-out NLL per (task, strategy), over the users the finalists share."""
    return {pair: ranked[0][0] for pair, ranked in all_finalists(records).items()}


def parse_cell(cell: str) -> dict:
    """``lr=0.003,ep=1,lrC=0.1`` -> {"lr": 0.003, "epochs": 1, "lr_C": 0.1}."""
    row = {}
    for part in cell.split(","):
        key, value = part.split("=")
        name = {"lr": "lr", "ep": "epochs", "lrB": "lr_B", "lrC": "lr_C"}[key]
        row[name] = int(value) if name == "epochs" else float(value)
    return row


def report(records: list[dict], meta: dict) -> str:
    table = summarise(records)
    ranked_by = all_finalists(records)
    picks = {pair: ranked[0][0] for pair, ranked in ranked_by.items()}
    lines = ["# Stage-2 schedule search (train users)", "",
             "Source of `--schedule tuned` (`prisp.personalize.hyperparams.TUNED`). Written by:", "",
             *[f"    {run['command']}  # revision {run['revision']}; uptime before: {run['uptime_start']}; "
               f"after: {run['uptime_end']}" for run in meta.get("runs", [meta] if meta else [])], "",
             "Cells are judged by **held NLL**: mean per-token NLL of the user's own answers on up to "
             f"{HELD_OUT} held-out history items (just older than the 10 trained on), lower is better. "
             "held score: task score on those items (accuracy, or (ROUGE-1 + ROUGE-L) / 2; none for LaMP-1). "
             "query: the user's LaMP query answered as the product does (labels on LaMP-1/2N). s/user: "
             "personalization wall seconds (2 threads). `anchor` = no Stage 2; `paper` = Table 7. "
             "`lrC=` / `lrB=`: the bridge C's (PRISP) or B's (OPPU, LoRA+-style) own learning rate, the other "
             "factor at `lr`; two such cells for each strategy that trains two factors. "
             "**Bold** = chosen: the lowest held NLL among the finalists (every grid cell, or after `--refine` "
             "the cells run on the most users), compared over the users they share; see *Refinement*.", ""]
    for task in sorted({t for t, _, _ in table}):
        anchor = table.get((task, "-", "anchor"))
        lines += [f"## {task}", "", "| strategy | cell | users | held NLL | held score | query NLL | query score "
                  "| steps | s/user | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        if anchor:
            lines.append(f"| (none) | anchor | {anchor['users']} | {_fmt(anchor['held_nll'])} | "
                         f"{_fmt(anchor['held_score'])} | {_fmt(anchor['query_nll'])} | "
                         f"{_fmt(anchor['query_score'])} | 0 | 0 | – |")
        others = sorted({s for _, s, _ in table} - set(STRATEGIES) - {"-"})  # e.g. --strategies pissa,lora-ga
        for strategy in (*STRATEGIES, *others):
            for cell in [c["cell"] for c in cells(strategy)[1:]]:
                row = table.get((task, strategy, cell))
                if not row:
                    continue
                name = f"**{cell}**" if picks.get((task, strategy)) == cell else cell
                lines.append(f"| {strategy} | {name} | {row['users']} | {_fmt(row['held_nll'])} | "
                             f"{_fmt(row['held_score'])} | {_fmt(row['query_nll'])} | {_fmt(row['query_score'])} | "
                             f"{_fmt(row['steps'], 1)} | {_fmt(row['wall_s'], 1)} | {_fmt(row['peak_rss_mb'], 0)} |")
        lines.append("")
    refined = []
    for (task, strategy), ranked in ranked_by.items():
        if len(ranked) < len([c for (t, s, c) in table if (t, s) == (task, strategy) and c.startswith("lr=")]):
            refined += [f"| {task} | {strategy} | {'**' + cell + '**' if i == 0 else cell} | {users} | {nll:.3f} |"
                        for i, (cell, nll, users) in enumerate(ranked)]
    if refined:
        lines += ["## Refinement", "", "Finalists (`--refine`): each strategy's best grid cells after the first "
                  "round, run on more users; held NLL here is the mean over the users every finalist has.", "",
                  "| task | strategy | finalist | users | held NLL |", "|---|---|---|---:|---:|", *refined, ""]
    lines += ["## Chosen", "", "| task | strategy | lr | epochs | batch | lr_B | lr_C |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for (task, strategy), cell in sorted(picks.items()):
        row = parse_cell(cell)
        lines.append(f"| {task} | {strategy} | {row['lr']:g} | {row['epochs']} | {BATCH} | "
                     f"{row.get('lr_B', '–'):{'g' if 'lr_B' in row else ''}} | "
                     f"{row.get('lr_C', '–'):{'g' if 'lr_C' in row else ''}} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
