"""The report's figures as PNG files: Figure 3 (time and memory bars), Figure 4 (cost vs performance), Figure
6 (score vs user data size), Figure 7 (cross-task adaptability heat maps) and Figure 8 (score per description
wording and stage). Drawn with matplotlib's object API on the Agg canvas, so no display or global backend is
touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    return fig, fig.subplots(1, ncols)


def cost_bars(
    path: Path, labels: Sequence[str], seconds: Sequence[float], memory: Sequence[float | None]
) -> Path:
    """Figure 3: task-averaged personalization time per user (log scale) and peak memory per method."""
    fig, (ax_mem, ax_time) = _figure(8, 3.2, ncols=2)
    colors = [f"C{i}" for i in range(len(labels))]
    ax_mem.bar(labels, [m or 0.0 for m in memory], color=colors)
    ax_mem.set_ylabel("peak memory per user (MB)")
    ax_mem.set_title("Memory")
    ax_time.bar(labels, [max(s, 1e-3) for s in seconds], color=colors)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("personalization time per user (s, log)")
    ax_time.set_title("Training time")
    for ax in (ax_mem, ax_time):
        ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(path)
    return path


def tradeoff_scatter(
    path: Path, labels: Sequence[str], cost: Sequence[float], score: Sequence[float]
) -> Path:
    """Figure 4: task-averaged score against the composite cost (App. B), one point per method."""
    fig, ax = _figure(5, 3.6)
    for i, (label, x, y) in enumerate(zip(labels, cost, score)):
        ax.scatter([x], [y], s=60, color=f"C{i}", label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("composite cost (max-normalised memory and time, averaged)")
    ax.set_ylabel("Avg. score")
    ax.set_xlim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def data_size_curves(path: Path, sizes: Sequence[int],
                     panels: Mapping[str, Mapping[str, Sequence[float | None]]]) -> Path:
    """Figure 6: score against the number of target-user items, one panel per task (and their mean), one line
    per method (gaps where not run)."""
    import numpy as np

    fig, axes = _figure(4.2 * len(panels), 3.4, ncols=len(panels))
    for ax, (title, series) in zip(np.atleast_1d(axes), panels.items()):
        for i, (label, scores) in enumerate(series.items()):
            points = [(s, v) for s, v in zip(sizes, scores) if v is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=label)
        ax.set_xscale("log")
        ax.minorticks_off()  # only the measured sizes are labelled
        ax.set_xticks(list(sizes), [str(s) for s in sizes])
        ax.set_xlabel("target user items")
        ax.set_ylabel("score")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def adaptability_heatmaps(path: Path, tasks: Sequence[str],
                          methods: Mapping[str, Mapping[tuple[str, str], float | None]]) -> Path:
    """Figure 7: per sharer method, a source x target heat map of adaptability (%); blank where not run."""
    import numpy as np

    fig, axes = _figure(3.6 * len(methods), 3.4, ncols=len(methods))
    axes = np.atleast_1d(axes)
    for ax, (label, pairs) in zip(axes, methods.items()):
        grid = np.full((len(tasks), len(tasks)), np.nan)
        for (source, target), ratio in pairs.items():
            if ratio is not None:
                grid[tasks.index(source), tasks.index(target)] = 100 * ratio
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(100.0, float(np.nanmax(grid)) if
                                                                  np.isfinite(grid).any() else 100.0))
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                text = "–" if i == j else ("" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}")
                ax.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xlabel("target task")
        ax.set_ylabel("source task (sharers)")
        ax.set_title(f"{label} adaptability (%)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path)
    return path


def robustness_bars(path: Path, tasks: Sequence[str],
                    series: Mapping[str, Mapping[str, Sequence[float | None]]]) -> Path:
    """Figure 8: one panel per stage, grouped bars of score per task, one bar per description wording."""
    fig, axes = _figure(4.2 * len(series), 3.4, ncols=len(series))
    axes = axes if len(series) > 1 else [axes]
    for ax, (stage, kinds) in zip(axes, series.items()):
        width = 0.8 / max(1, len(kinds))
        for i, (kind, scores) in enumerate(kinds.items()):
            xs = [t + (i - (len(kinds) - 1) / 2) * width for t in range(len(tasks))]
            ax.bar(xs, [s if s is not None else 0.0 for s in scores], width, color=f"C{i}", label=kind)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        ax.set_ylabel("score")
        ax.set_title(stage)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path
