"""How far apart the hypernetwork's anchors are: per task, the reference description's anchor against the
paraphrase's and the imprecise wording's (Figure 8), and against the other tasks' reference anchors for scale.

    python bench/anchor_spread.py [--tasks LaMP-2N,LaMP-4,LaMP-1,LaMP-5] [--sni ../shared/data/sni/tasks.jsonl]

Distance = ||dW_x - dW_ref||_F / ||dW_ref||_F over all adapted modules (dW = B A per layer and module), so 0 means
the same update and ~1.4 an unrelated one of the same size. The wordings are the ones the bench uses
(prisp.bench.descriptions). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from prisp.bench.descriptions import description
from prisp.data.locations import default_sni_file
from prisp.hypernet.anchor import Anchorer
from prisp.hypernet.data import load_sni
from prisp.models import DEFAULT_MODEL, load_model


def delta(weights) -> dict:
    return {key: pair.B.double() @ pair.A.double() for key, pair in weights.pairs.items()}


def distance(x: dict, ref: dict) -> float:
    num = sum(float(torch.sum((x[k] - ref[k]) ** 2)) for k in ref)
    den = sum(float(torch.sum(ref[k] ** 2)) for k in ref)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="LaMP-2N,LaMP-4,LaMP-1,LaMP-5")
    parser.add_argument("--sni", default=None)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    loaded = load_model(DEFAULT_MODEL)
    anchorer = Anchorer.load(None, DEFAULT_MODEL, loaded.model, loaded.tokenizer)
    sni = load_sni(args.sni or default_sni_file()).tasks
    deltas = {}
    for task in tasks:
        for kind in ("reference", "paraphrase", "imprecise"):
            text = description(task, kind, sni, anchorer.encoder).text
            deltas[task, kind] = delta(anchorer.generate(text).weights)
    print("| task | paraphrase | imprecise | nearest other task's reference |")
    print("|---|---:|---:|---:|")
    for task in tasks:
        ref = deltas[task, "reference"]
        others = [distance(deltas[t, "reference"], ref) for t in tasks if t != task]
        print(f"| {task} | {distance(deltas[task, 'paraphrase'], ref):.3f} | "
              f"{distance(deltas[task, 'imprecise'], ref):.3f} | {min(others):.3f} |")


if __name__ == "__main__":
    main()
