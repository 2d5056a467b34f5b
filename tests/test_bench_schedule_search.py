"""bench/schedule_search.py's successive-halving round: which cells go on to more users, and which one is chosen
once some cells have more users than others."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "schedule_search.py"


def _search():
    spec = importlib.util.spec_from_file_location("bench_schedule_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(user: str, cell: str, nll: float, strategy: str = "no-bridge", task: str = "LaMP-4") -> dict:
    return {"task": task, "user": user, "strategy": strategy, "cell": cell, "held_nll": nll}


def _full_round(search, users=("u0", "u1"), strategy="no-bridge") -> list[dict]:
    # Cell i's held NLL is 10 + i on every user, so the grid's first cells lead.
    return [_record(u, cell, 10.0 + i, strategy) for u in users
            for i, cell in enumerate(search.grid_cells(strategy))]


def test_leaders_are_the_k_lowest_over_users_with_the_whole_grid():
    search = _search()
    records = _full_round(search)
    grid = search.grid_cells("no-bridge")
    # A third user with only the last cell, at a very low NLL, must not count: it lacks the rest of the grid.
    records.append(_record("u2", grid[-1], 0.0))
    assert search.leaders(records, "LaMP-4", "no-bridge", 3) == grid[:3]


def test_refinement_needs_a_full_first_round():
    search = _search()
    records = _full_round(search)[:-1]  # u1 lacks one cell: still u0 has the grid
    assert search.leaders(records, "LaMP-4", "no-bridge", 1)
    partial = [r for r in records if r["user"] == "u1"]
    with pytest.raises(SystemExit, match="no user with every grid cell"):
        search.leaders(partial, "LaMP-4", "no-bridge", 2)


def test_chosen_compares_finalists_over_their_shared_users():
    search = _search()
    grid = search.grid_cells("prisp")
    records = _full_round(search, strategy="prisp")
    # Refinement ran the round's two leaders on two more users, where the runner-up is far better.
    for user in ("u2", "u3"):
        records += [_record(user, grid[0], 12.0, "prisp"), _record(user, grid[1], 9.0, "prisp")]
    assert [c for c, _, _ in search.finalists(records, "LaMP-4", "prisp")] == [grid[1], grid[0]]
    assert search.chosen(records)[("LaMP-4", "prisp")] == grid[1]
    # Over the four shared users: grid[0] (10, 10, 12, 12) = 11.0, grid[1] (11, 11, 9, 9) = 10.0.
    assert search.finalists(records, "LaMP-4", "prisp")[0][1:] == (10.0, 4)
    report = search.report([{**r, "held_score": None, "query_nll": 1.0, "query_score": 0.0, "wall_s": 1.0,
                              "peak_rss_mb": 1.0, "steps": 5} for r in records], {})
    assert "## Refinement" in report and f"| LaMP-4 | prisp | **{grid[1]}** | 4 | 10.000 |" in report


def test_without_refinement_the_lowest_grid_cell_is_chosen_and_no_refinement_section():
    search = _search()
    records = _full_round(search)
    assert search.chosen(records)[("LaMP-4", "no-bridge")] == search.grid_cells("no-bridge")[0]
    report = search.report([{**r, "held_score": None, "query_nll": 1.0, "query_score": 0.0, "wall_s": 1.0,
                              "peak_rss_mb": 1.0, "steps": 5} for r in records], {})
    assert "## Refinement" not in report


def test_plan_keeps_the_anchor_and_the_leaders_only_when_refining():
    search = _search()
    records = _full_round(search)
    full = search.plan(records, "LaMP-4", ["no-bridge"], 0)["no-bridge"]
    assert [c["cell"] for c in full] == [c["cell"] for c in search.cells("no-bridge")]
    refined = search.plan(records, "LaMP-4", ["no-bridge"], 2)["no-bridge"]
    assert [c["cell"] for c in refined] == ["anchor", *search.grid_cells("no-bridge")[:2]]


def test_cli_refuses_a_refinement_without_a_first_round_before_loading_anything(tmp_path):
    out = tmp_path / "search"
    result = subprocess.run([sys.executable, str(SCRIPT), "--refine", "2", "--tasks", "LaMP-4", "--strategies",
                             "prisp", "--out", str(out), "--data", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "LaMP-4 prisp has no user with every grid cell" in result.stderr
    assert not out.with_suffix(".md").exists() and not out.with_suffix(".meta.json").exists()
