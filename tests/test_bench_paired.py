"""bench/paired.py picks the intended row of a results file (main, Figure 6 size, Figure 7 source, Figure 8
wording) and prints the paired difference the bootstrap gives for those rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paired.py"
LABELS = ["politics", "sports"]


def _paired():
    spec = importlib.util.spec_from_file_location("bench_paired", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, correct: list[bool], items: int = 10, source: str = "", description: str = "") -> dict:
    records = [{"id": f"u{i}-0", "user": f"u{i}", "gold": "sports", "output": "sports" if ok else "politics"}
               for i, ok in enumerate(correct)]
    return {"method": method, "variant": "np", "task": "LaMP-2N", "items": items, "source": source,
            "description": description, "score": sum(correct) / len(correct), "seconds": 1.0,
            "predictions": records, "labels": LABELS}


ROWS = [
    _row("prisp", [True, True, False, False]),                 # main row (10 items) comes first
    _row("prisp", [False, False, False, False], items=1),
    _row("prisp", [True, True, True, True], items=50),
    _row("prisp", [True, False, False, False], description="paraphrase"),
    _row("per-pcs", [True, True, True, False]),
    _row("per-pcs", [False, True, False, False], source="LaMP-4"),
]


def test_pick_tells_main_size_source_and_wording_rows_apart():
    pick = _paired().pick
    assert pick(ROWS, "prisp:np", ["LaMP-2N"], "")["LaMP-2N"] is ROWS[0]
    assert pick(ROWS, "prisp:np#1", ["LaMP-2N"], "")["LaMP-2N"] is ROWS[1]
    assert pick(ROWS, "prisp:np#50", ["LaMP-2N"], "")["LaMP-2N"] is ROWS[2]
    assert pick(ROWS, "prisp:np", ["LaMP-2N"], "paraphrase")["LaMP-2N"] is ROWS[3]
    assert pick(ROWS, "per-pcs:np", ["LaMP-2N"], "")["LaMP-2N"] is ROWS[4]
    assert pick(ROWS, "per-pcs:np@LaMP-4", ["LaMP-2N"], "")["LaMP-2N"] is ROWS[5]
    assert pick(ROWS, "prisp:np#30", ["LaMP-2N"], "") == {}


def test_main_prints_each_side_and_the_paired_difference(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--a", "prisp:np#50",
                           "--b", "prisp:np#1,per-pcs:np@LaMP-4", "--replicates", "200"],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert "| prisp:np#50 | 1.000 | 1.0 |" in lines
    assert "| prisp:np#1 | 0.000 | 1.0 |" in lines
    # every user right at 50 items and wrong at 1, so every replicate gives the same difference: accuracy +1 and
    # macro F1 +0.5 (the never-gold label scores 0 on both sides), averaged as the LaMP-2 score
    assert "prisp:np#50 - prisp:np#1: +0.750 [+0.750, +0.750] P(>0) 1.00 over LaMP-2N (4 users)" in lines
    assert any(line.startswith("prisp:np#50 - per-pcs:np@LaMP-4: +0.525 [") for line in lines)
