"""``report.md`` from results.jsonl: Table 2 (best variant per method and task), every variant (Table 13),
costs (Figure 3), the cost-performance trade-off (Figure 4, composite cost as in App. B) and data-size
curves (Figure 6).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from prisp.bench import figures
from prisp.bench.config import BenchConfig
from prisp.bench.methods import BENCH_METHODS, UNTRAINED_KINDS, VARIANTS
from prisp.bench.results import KEY_DEFAULTS, git_revision
from prisp.bench.stats import UserStats, paired_bootstrap
from prisp.files import write_atomic
from prisp.metrics import metric_keys

REPORT_NAME = "report.md"
_SHORT = {
    "accuracy": "Acc ↑",
    "f1": "F1 ↑",
    "MAE": "MAE ↓",
    "RMSE": "RMSE ↓",
    "rouge-1": "R-1 ↑",
    "rouge-L": "R-L ↑",
    "meteor": "METEOR ↑",
}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def select_rows(config: BenchConfig, rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """This run's main-grid rows and its data-size rows (same model, protocol, split, decoding and schedule;
    own-task sharer pools)."""
    mine = [r for r in _this_run(config, rows) if not r.get("source") and not r.get("description")]
    main = [r for r in mine if r["items"] == config.items and r["users"] == config.users]
    size_users = config.data_size_users or config.users
    sizes = [
        r
        for r in mine
        if r["variant"] == "np"
        and r["users"] == size_users
        and r["task"] in config.data_size_tasks
        and r["items"] in config.data_sizes
    ]
    return main, sizes


def _this_run(config: BenchConfig, rows: Sequence[dict], methods: Sequence[str] = ()) -> list[dict]:
    """Rows of this run's setting (model, protocol, split, decoding, schedule, tasks) and methods (``methods``
    are taken as well, whether or not the run names them)."""
    return [
        r
        for r in rows
        if (r["model"], r["protocol"], r["split"]) == (config.model, config.protocol, config.split)
        and r.get("decode", KEY_DEFAULTS["decode"]) == config.decode
        and r.get("schedule", KEY_DEFAULTS["schedule"]) == config.schedule
        and r["task"] in config.tasks
        and (r["method"] in config.methods or r["method"] in methods)
    ]


def adaptability(config: BenchConfig, rows: Sequence[dict]) -> dict[str, dict[tuple[str, str], dict]]:
    """Figure 7, per sharer method: ``{(source, target): {"score", "own", "ratio"}}`` for every ordered pair of
    distinct tasks with both rows: Perf(source sharers -> target) / Perf(target sharers -> target), the two on
    the same target users (Base variant)."""
    users = config.cross_task_users or config.users
    cells = {(r["method"], r.get("source") or r["task"], r["task"]): r for r in _this_run(config, rows)
             if r["variant"] == "np" and r["items"] == config.items and r["users"] == users
             and BENCH_METHODS[r["method"]].kind == "sharer"}
    out: dict[str, dict[tuple[str, str], dict]] = {}
    for (method, source, target), row in sorted(cells.items()):
        own = cells.get((method, target, target))
        if source == target or own is None or (source not in config.tasks):
            continue
        ratio = row["score"] / own["score"] if own["score"] > 0 else None
        out.setdefault(method, {})[(source, target)] = {"score": row["score"], "own": own["score"],
                                                         "ratio": ratio}
    return out


def adaptability_lines(config: BenchConfig, rows: Sequence[dict], out: Path) -> list[str]:
    """The Figure 7 section: a source x target table of adaptability per sharer method, and the heat map."""
    table = adaptability(config, rows)
    if not table:
        return []
    users = config.cross_task_users or config.users or "all"
    lines = ["## Cross-task adaptability (Figure 7)", "",
             "Adaptability = Perf(source-task sharers -> target task) / Perf(target-task sharers -> target task): "
             "the source task's sharer LoRAs (and the task-adapted anchor they sit on) reused without retraining, "
             "the method's selection on the target user's history the only adaptation; Base variant, "
             f"{users} target users per task, both scores on the same users. PRISP needs no sharers: its anchor "
             "comes from the target task's description alone, so its adaptability is 100% by construction.", ""]
    for method, pairs in table.items():
        label = BENCH_METHODS[method].label
        sources = [t for t in config.tasks if any(s == t for s, _ in pairs)]
        targets = [t for t in config.tasks if any(g == t for _, g in pairs)]
        lines += [f"**{label}** (rows: source, columns: target; cell: adaptability, source-sharer score / own)",
                  "", "| source \\ target | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]
        for source in sources:
            cells = []
            for target in targets:
                cell = pairs.get((source, target))
                cells.append("–" if cell is None else
                             f"{_pct(cell['ratio'])} ({_fmt(cell['score'])} / {_fmt(cell['own'])})")
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        ratios = [c["ratio"] for c in pairs.values() if c["ratio"] is not None]
        lines += ["", f"Mean adaptability of {label}: {_pct(_mean(ratios))} over {len(ratios)} pairs.", ""]
    figures.adaptability_heatmaps(out / "fig7_adaptability.png", config.tasks,
                                  {BENCH_METHODS[m].label: {k: v["ratio"] for k, v in pairs.items()}
                                   for m, pairs in table.items()})
    return lines + ["![Figure 7: cross-task adaptability](fig7_adaptability.png)", ""]


def robustness(config: BenchConfig, rows: Sequence[dict]) -> dict[tuple[str, str, str], dict]:
    """Figure 8: ``{(kind, stage, task): row}`` for the reference and each other description wording; stage
    ``"Stage 1"`` is the anchor alone, ``"Stage 2"`` PRISP from it (Base variant)."""
    stages = {"anchor": "Stage 1", "prisp": "Stage 2"}  # Figure 8's rows whether or not --methods names them
    return {(r.get("description") or "reference", stages[r["method"]], r["task"]): r
            for r in _this_run(config, rows, methods=tuple(stages))
            if r["method"] in stages and r["variant"] == "np" and r["items"] == config.items
            and r["users"] == config.users and not r.get("source")
            and (r.get("description") or "") in ("", *config.descriptions)}


def robustness_lines(config: BenchConfig, rows: Sequence[dict], out: Path) -> list[str]:
    """The Figure 8 section: score per description wording and stage, per task and averaged, and the figure."""
    if not config.descriptions:
        return []
    cells = robustness(config, rows)
    kinds = ["reference", *config.descriptions]
    lines = ["## Description robustness (Figure 8)", "",
             f"Stage 1: the anchor generated from each wording alone; Stage 2: PRISP from that anchor. Base variant, "
             f"{config.users or 'all'} users per task, label answers by `{config.decode}` decoding.", "",
             "| description | stage | " + " | ".join(config.tasks) + " | Avg. |", "|" + "---|" * (len(config.tasks) + 3)]
    series: dict[str, dict[str, list[float | None]]] = {}
    for kind in kinds:
        for stage in ("Stage 1", "Stage 2"):
            scores = [cells[kind, stage, t]["score"] if (kind, stage, t) in cells else None for t in config.tasks]
            done = [s for s in scores if s is not None]
            avg = _fmt(_mean(done)) + ("" if len(done) == len(scores) else "*")
            lines.append(f"| {kind} | {stage} | " + " | ".join(_fmt(s) for s in scores) + f" | {avg} |")
            series.setdefault(stage, {})[kind] = scores
    lines += ["", "Wordings (the reference is the task's own description):", ""]
    for task in config.tasks:
        for kind in config.descriptions:
            row = cells.get((kind, "Stage 1", task)) or cells.get((kind, "Stage 2", task))
            if row and row["details"].get("description"):
                d = row["details"]["description"]
                lines.append(f"- {task} {kind} ({d['origin']}): \"{d['text']}\"")
    figures.robustness_bars(out / "fig8_descriptions.png", config.tasks, series)
    return lines + ["", "![Figure 8: description robustness](fig8_descriptions.png)", ""]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def best_rows(main: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Each (method, task)'s best variant by task score (the paper's Table 2 convention)."""
    best: dict[tuple[str, str], dict] = {}
    for row in main:
        key = (row["method"], row["task"])
        if key not in best or row["score"] > best[key]["score"]:
            best[key] = row
    return best


def _methods(config: BenchConfig, rows: Sequence[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in BENCH_METHODS if m in present and m in config.methods]


def table2(config: BenchConfig, main: Sequence[dict]) -> list[str]:
    """Markdown lines: Table 2 layout with the Avg. over tasks and the privacy / task-data columns."""
    best = best_rows(main)
    header = ["Method", "Shared Params", "Requires Task Data"]
    for task in config.tasks:
        header += [f"{task} {_SHORT[k]}" for k in metric_keys(task)]
    lines = ["| " + " | ".join(header + ["Avg. ↑"]) + " |", "|" + "---|" * (len(header) + 1)]
    notes = []
    for name in _methods(config, main):
        rows = [best.get((name, task)) for task in config.tasks]
        first = next(r for r in rows if r)
        shared = "✓" if first["shared_params"] else "×"
        needs = "Yes" if any(r["requires_task_data"] for r in rows if r) else "No"
        cells = [BENCH_METHODS[name].label, shared, needs]
        for task, row in zip(config.tasks, rows):
            cells += [_fmt(row["metrics"][k]) if row else "–" for k in metric_keys(task)]
        scores = [r["score"] for r in rows if r]
        avg = _fmt(_mean(scores)) + ("" if len(scores) == len(rows) else "*")
        lines.append("| " + " | ".join(cells + [avg]) + " |")
        if BENCH_METHODS[name].kind != "prompt":
            notes.append(
                f"{BENCH_METHODS[name].label}: "
                + ", ".join(f"{t} {VARIANTS[r['variant']]}" for t, r in zip(config.tasks, rows) if r)
            )
    best_note = "Best variant per task: " + "; ".join(notes) + "." if notes else ""
    return [*lines, "", best_note, _AVG_NOTE]


def variants_table(config: BenchConfig, main: Sequence[dict]) -> list[str]:
    """Markdown lines: every (method, variant) with its task scores (Table 13 in one score per task)."""
    lines = [
        "| Method | Variant | " + " | ".join(config.tasks) + " | Avg. |",
        "|" + "---|" * (len(config.tasks) + 3),
    ]
    index = {(r["method"], r["variant"], r["task"]): r for r in main}
    for name in _methods(config, main):
        for variant in VARIANTS:
            rows = [index.get((name, variant, task)) for task in config.tasks]
            if not any(rows):
                continue
            scores = [r["score"] if r else None for r in rows]
            lines.append(
                f"| {BENCH_METHODS[name].label} | {VARIANTS[variant]} | "
                + " | ".join(_fmt(s) for s in scores)
                + f" | {_fmt(_mean(scores))} |"
            )
    return lines


def cost_summary(config: BenchConfig, main: Sequence[dict]) -> dict[str, dict]:
    """Per trained method: task-averaged seconds and peak memory per user, and the composite cost (App. B)."""
    best = best_rows(main)
    names = [m for m in _methods(config, main) if BENCH_METHODS[m].kind not in UNTRAINED_KINDS]
    per_task: dict[str, list[float]] = {m: [] for m in names}
    for task in config.tasks:
        rows = {m: best[(m, task)] for m in names if (m, task) in best}
        max_s = max((r["seconds"] for r in rows.values()), default=0.0) or 1.0
        max_m = max((r["peak_memory_mb"] or 0.0 for r in rows.values()), default=0.0) or 1.0
        for m, r in rows.items():  # max-normalise per task, then average memory and time with equal weights
            per_task[m].append(((r["peak_memory_mb"] or 0.0) / max_m + r["seconds"] / max_s) / 2)
    summary = {}
    for m in names:
        rows = [best[(m, t)] for t in config.tasks if (m, t) in best]
        summary[m] = {
            "seconds": _mean([r["seconds"] for r in rows]) or 0.0,
            "memory": _mean([r["peak_memory_mb"] for r in rows]),
            "composite": _mean(per_task[m]),
            "score": _mean([r["score"] for r in rows]),
            "trainable": _mean([r["trainable_params"] for r in rows]),
            "sharer_seconds": _mean([r["details"].get("sharer_seconds") for r in rows]),
        }
    return summary


_COST_HEADER = (
    "| Method | Time / user (s) | of which sharer training (s) | Peak memory / user (MB) | "
    "Trainable params / user | Composite cost | Avg. ↑ |"
)
_COMPOSITE_NOTE = (
    "Composite cost (App. B): per task, memory and time are divided by the largest value among these "
    "methods, averaged with equal weights, then averaged over tasks."
)
_TIME_NOTE = (
    "- Time: mean personalization seconds per target user (sharer methods include the training of the "
    "sharer LoRAs they use and their own search; prompt-only methods train nothing)."
)
_MEMORY_NOTE = (
    "- Memory: mean per-user peak as the training loop records it (CPU: sampled process RSS, which "
    "includes the loaded model; GPU: max allocated)."
)
_AVG_NOTE = "Avg. = mean over tasks of (Acc+F1)/2, 1-(MAE+RMSE)/2 or (R-1+R-L)/2; * = some task missing."


def cost_lines(summary: dict[str, dict]) -> list[str]:
    lines = [_COST_HEADER, "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(
            f"| {BENCH_METHODS[m].label} | {_fmt(s['seconds'], 2)} | {_fmt(s['sharer_seconds'], 2)} | "
            f"{_fmt(s['memory'], 0)} | {_fmt(s['trainable'], 0)} | {_fmt(s['composite'])} | "
            f"{_fmt(s['score'])} |"
        )
    return lines


def data_size_series(config: BenchConfig, sizes_rows: Sequence[dict]) -> dict[str, dict[str, list[float | None]]]:
    """Per data-size task (and their mean, keyed ``"mean"``, when there are several), per method, the score at
    each size."""
    tasks = [t for t in config.data_size_tasks if any(r["task"] == t for r in sizes_rows)]
    groups = {task: [task] for task in tasks}
    if len(tasks) > 1:
        groups["mean"] = tasks
    out: dict[str, dict[str, list[float | None]]] = {}
    for group, members in groups.items():
        for name in _methods(config, sizes_rows):
            out.setdefault(group, {})[BENCH_METHODS[name].label] = [
                _mean([r["score"] for r in sizes_rows
                       if r["method"] == name and r["items"] == size and r["task"] in members])
                for size in config.data_sizes
            ]
    return out


def _rise(values: Sequence[float | None]) -> float | None:
    """Score at the largest measured size minus score at the smallest: Figure 6's slope, read off the ends."""
    measured = [v for v in values if v is not None]
    return measured[-1] - measured[0] if len(measured) > 1 else None


def data_size_lines(config: BenchConfig, sizes_rows: Sequence[dict], out: Path) -> list[str]:
    """The Figure 6 section: score per method and size, per task and averaged, the rise from the smallest to
    the largest size, and the curves."""
    series = data_size_series(config, sizes_rows)
    if not series:
        return []
    figures.data_size_curves(out / "fig6_data_size.png", config.data_sizes, series)
    sizes = " | ".join(str(s) for s in config.data_sizes)
    table = [f"| Task | Method | {sizes} | rise |", "|" + "---|" * (len(config.data_sizes) + 3)]
    for group, methods in series.items():
        for label, values in methods.items():
            table.append(f"| {group} | {label} | " + " | ".join(_fmt(v) for v in values)
                         + f" | {_fmt(_rise(values))} |")
    users = config.data_size_users or config.users or "all"
    return [
        "## Data size (Figure 6)",
        "",
        *table,
        "",
        f"Base variant; the first {users} target users of each task; each user's most recent N history items "
        "(fewer where the history is shorter). Rise: score at the largest size minus score at the smallest.",
        "",
        "![Figure 6: data size](fig6_data_size.png)",
        "",
    ]


_PAIRED_NOTE = (
    "Paired bootstrap over target users ({replicates} replicates, seed 0): each replicate redraws every task's "
    "users with replacement, the same draw for both methods, re-scores both methods' stored answers with the "
    "official metrics and averages over the tasks both have. P(>0) / P(<0): share of replicates where PRISP is "
    "ahead / behind. The first table pairs Table 2's best variant of each method, picked on these same queries, "
    "which favours methods with more variants (prompt-only baselines have one); the second pairs the same prompt "
    "variant on both sides, which has no such selection. With few users per task the interval is too narrow "
    "rather than too wide: the bootstrap treats the users run as the whole population."
)
_PAIRED_HEADER = [
    "| PRISP − method | Tasks | Users | Δ Avg. | 95% interval | P(>0) | P(<0) |",
    "|---|---|---|---|---|---|---|",
]


def paired_lines(config: BenchConfig, main: Sequence[dict], replicates: int = 2000) -> list[str]:
    """Markdown lines: PRISP minus every other method in task-averaged score, with a user-bootstrap interval,
    under Table 2's best-variant convention and variant by variant."""
    if not any(r["method"] == "prisp" for r in main):
        return []
    stats = {id(r): UserStats.from_row(r) for r in main}
    lacking = sorted({f"{r['task']} {r['method']} {r['variant']}" for r in main if stats[id(r)] is None})

    def by_task(rows) -> dict:
        return {r["task"]: stats[id(r)] for r in rows if stats[id(r)] is not None}

    def line(label: str, ours: list[dict], theirs: list[dict]) -> list[str]:
        diff = paired_bootstrap(by_task(ours), by_task(theirs), replicates=replicates)
        if diff is None:
            return []
        interval = f"[{diff.low:+.3f}, {diff.high:+.3f}]"
        shares = f"{diff.share_positive:.2f} | {diff.share_negative:.2f}"
        return [f"| {label} | {', '.join(diff.tasks)} | {diff.users} | {diff.difference:+.3f} | {interval} | {shares} |"]

    best = best_rows(main)
    theirs = [m for m in _methods(config, main) if m != "prisp"]
    best_of = {m: [best[(m, t)] for t in config.tasks if (m, t) in best] for m in ["prisp", *theirs]}
    lines = ["## How much the differences mean (paired bootstrap over users)", "",
             "Best variant per method and task (Table 2):", "", *_PAIRED_HEADER]
    for name in theirs:
        lines += line(BENCH_METHODS[name].label, best_of["prisp"], best_of[name])
    if len(config.tasks) > 1:  # an average can hide a task where PRISP is behind
        lines += ["", "Per task, best variant:", "", *_PAIRED_HEADER]
        for task in config.tasks:
            for name in theirs:
                if ("prisp", task) in best and (name, task) in best:
                    lines += line(BENCH_METHODS[name].label, [best[("prisp", task)]], [best[(name, task)]])
    lines += ["", "Same prompt variant on both sides:", "", *_PAIRED_HEADER]
    index: dict[tuple[str, str], list[dict]] = {}
    for row in main:
        index.setdefault((row["method"], row["variant"]), []).append(row)
    for name in theirs:
        for variant in VARIANTS:
            if (name, variant) in index:
                label = f"{BENCH_METHODS[name].label} ({VARIANTS[variant]})"
                lines += line(label, index.get(("prisp", variant), []), index[(name, variant)])
    lines += ["", _PAIRED_NOTE.format(replicates=replicates)]
    if lacking:
        lines.append(f"Left out (rows written before per-query answers were recorded): {'; '.join(lacking)}.")
    return [*lines, ""]


def command_line(config: BenchConfig) -> str:
    users = f" --users {config.users}" if config.users else ""
    swept = [t for t in config.data_size_tasks if t in config.tasks]
    sizes = ",".join(map(str, config.data_sizes)) if config.data_sizes and swept else "none"
    if sizes != "none":
        sizes += f" --data-size-tasks {','.join(swept)}"
        if config.data_size_users or config.users:
            sizes += f" --data-size-users {config.data_size_users or config.users}"
    return (
        f"prisp bench --profile {config.profile} --tasks {','.join(config.tasks)} --methods "
        f"{','.join(config.methods)} --variants {','.join(config.variants)} --protocol {config.protocol} "
        f"--data {config.data} --split {config.split}{users} --model {config.model} --decode {config.decode} "
        f"--schedule {config.schedule} --data-sizes {sizes} --out {config.out}"
        + (f" --cross-task --cross-task-users {config.cross_task_users or config.users}" if config.cross_task else "")
        + (f" --descriptions {','.join(config.descriptions)}" if config.descriptions else "")
    )


def write_report(config: BenchConfig, rows: Sequence[dict], missing: Sequence = ()) -> Path:
    """Write ``report.md`` and its PNG figures into ``config.out``; returns the report path.

    ``missing``: grid cells (``prisp.bench.results.Cell``) with no row yet; listed so a partial report says what
    it lacks.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    main, sizes = select_rows(config, rows)
    anchors = sorted({f"{r['task']}: {r['anchor']}" for r in main if r["method"] == "prisp" and r["anchor"]})
    setting = (
        f"Model `{config.model}`, protocol {config.protocol}, split `{config.split}`, label answers by "
        f"`{config.decode}` decoding, Stage-2 schedule `{config.schedule}`, target users per task: "
        f"{config.users or 'all'}, git revision `{git_revision()}`, {len(main)} main rows."
    )
    lines = [
        f"# prisp bench: {config.profile} profile",
        "",
        f"Command: `{command_line(config)}`",
        "",
        setting,
        "",
        "## Main results (Table 2 layout)",
        "",
        *table2(config, main),
        "",
        "## Every prompt variant (scores per task)",
        "",
        *variants_table(config, main),
        "",
    ]
    lines += paired_lines(config, main)
    lines += _figure_sections(config, main, sizes, out)
    lines += adaptability_lines(config, rows, out)
    lines += robustness_lines(config, rows, out)
    anchor_note = "- PRISP anchor: " + ("; ".join(anchors) if anchors else "not run") + "."
    lines += ["## Notes", "", _TIME_NOTE, _MEMORY_NOTE, anchor_note]
    if missing:
        lines += ["", f"## Not run ({len(missing)} cells)", "",
                  "| task | method | variant | items | users | sharers from |", "|---|---|---|---|---|---|"]
        lines += [f"| {c.task} | {c.method} | {c.variant} | {c.items} | {c.users} | {c.source or c.task} |"
                  for c in missing]
    path = out / REPORT_NAME
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _figure_sections(
    config: BenchConfig, main: Sequence[dict], sizes: Sequence[dict], out: Path
) -> list[str]:
    summary = cost_summary(config, main)
    lines: list[str] = []
    if summary:
        labels = [BENCH_METHODS[m].label for m in summary]
        figures.cost_bars(
            out / "fig3_cost.png",
            labels,
            [s["seconds"] for s in summary.values()],
            [s["memory"] for s in summary.values()],
        )
        figures.tradeoff_scatter(
            out / "fig4_tradeoff.png",
            labels,
            [s["composite"] or 0.0 for s in summary.values()],
            [s["score"] or 0.0 for s in summary.values()],
        )
        lines += [
            "## Cost (Figure 3) and cost-performance (Figure 4)",
            "",
            *cost_lines(summary),
            "",
            "![Figure 3: time and memory](fig3_cost.png)",
            "",
            "![Figure 4: cost-performance](fig4_tradeoff.png)",
            "",
            _COMPOSITE_NOTE,
            "",
        ]
    lines += data_size_lines(config, sizes, out)
    return lines
