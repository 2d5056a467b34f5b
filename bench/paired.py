"""Paired comparisons between any two kinds of row of a bench results.jsonl (the report pairs best variants only).

    python bench/paired.py --results bench/results/product-16users/results.jsonl --a prisp:np \
        --b pissa:np,lora-ga:np,no-bridge:np [--tasks LaMP-2N,LaMP-4] [--description paraphrase]

A side is ``method:variant``, ``method:variant@SOURCE`` for a Figure 7 row whose sharers come from task SOURCE, or
``method:variant#N`` for a Figure 6 row trained on each user's N most recent items (without ``#N``, the first
match is used, which is the main row); rows must share decoding, schedule and users.
Prints each side's score per task and, per ``--b``, the paired user bootstrap of ``a - b`` over the tasks both
have (prisp.bench.stats: users resampled, official metrics rebuilt per replicate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prisp.bench.stats import UserStats, paired_bootstrap


def pick(rows: list[dict], side: str, tasks: list[str], description: str) -> dict[str, dict]:
    side, _, items = side.partition("#")
    side, _, source = side.partition("@")
    method, variant = side.split(":")
    found: dict[str, dict] = {}
    for row in rows:
        if (row["method"], row["variant"]) == (method, variant) and row["task"] in tasks \
                and (row.get("source") or "") == source and (row.get("description") or "") == description \
                and (not items or row.get("items") == int(items)):
            found.setdefault(row["task"], row)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True, help="comma-separated sides")
    parser.add_argument("--tasks", default="")
    parser.add_argument("--description", default="", help="the a side's description wording (Figure 8 rows)")
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    tasks = args.tasks.split(",") if args.tasks else sorted({r["task"] for r in rows})
    a = pick(rows, args.a, tasks, args.description)
    sides = {args.a + (f" ({args.description})" if args.description else ""): a}
    sides.update({side: pick(rows, side, tasks, "") for side in args.b.split(",")})
    print("| side | " + " | ".join(tasks) + " | s/user |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, found in sides.items():
        cells = [f"{found[t]['score']:.3f}" if t in found else "–" for t in tasks]
        secs = [found[t].get("seconds") for t in tasks if t in found and found[t].get("seconds") is not None]
        per_user = f"{sum(secs) / len(secs):.1f}" if secs else "–"
        print(f"| {name} | " + " | ".join(cells) + f" | {per_user} |")
    stats_a = {t: UserStats.from_row(r) for t, r in a.items()}
    print()
    for side in args.b.split(","):
        stats_b = {t: UserStats.from_row(r) for t, r in sides[side].items()}
        diff = paired_bootstrap({t: s for t, s in stats_a.items() if s}, {t: s for t, s in stats_b.items() if s},
                                replicates=args.replicates)
        if diff is None:
            print(f"{args.a} - {side}: nothing to pair")
            continue
        print(f"{args.a} - {side}: {diff.difference:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] "
              f"P(>0) {diff.share_positive:.2f} over {', '.join(diff.tasks)} ({diff.users} users)")


if __name__ == "__main__":
    main()
