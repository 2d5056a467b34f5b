"""PRISP vs OPPU training cost in CPU seconds, interleaved on one user (wall time on shared cores misleads).

    python bench/prisp_oppu_cpu.py [--data ../shared/data/lamp-offline] [--task LaMP-2N] [--reps 2]

Both strategies start from the shipped hypernetwork's anchor and train on the same examples (the first dev
user's 10 most recent items, Table 7 schedule), alternating prisp, oppu, prisp, oppu so that any drift in machine
load hits both. CPU time (``time.process_time``) counts only this process's work, so other jobs on the cores
inflate the wall clock but barely move it. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from prisp.data.locations import default_data_dir

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir(benchmark=True)))
    parser.add_argument("--task", default="LaMP-2N")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from prisp.console import quiet_transformers
    from prisp.data.lamp import load_task_split
    from prisp.data.tasks import get_task, label_set
    from prisp.hypernet.anchor import Anchorer
    from prisp.models import load_model
    from prisp.personalize import PersonalizeConfig
    from prisp.personalize.personalizer import personalize

    quiet_transformers()
    loaded = load_model("smollm2-135m")
    split = load_task_split(args.data, args.task, "dev")
    _, queries = next(iter(split.users.items()))
    anchorer = Anchorer.load(None, "smollm2-135m", loaded.model, loaded.tokenizer)
    anchor = anchorer.generate(get_task(split.task).description).weights
    labels = label_set(split.task, split.inputs)
    for _ in range(args.reps):
        for strategy in ("prisp", "oppu"):
            cpu, wall = time.process_time(), time.perf_counter()
            result = personalize(loaded.model, loaded.tokenizer, anchor, split.task, queries[0].profile,
                                 PersonalizeConfig(strategy=strategy, progress=False), labels)
            train = result.train.to_dict()
            print(json.dumps({"strategy": strategy, "cpu_s": round(time.process_time() - cpu, 1),
                              "wall_s": round(time.perf_counter() - wall, 1), "examples": result.examples,
                              "steps": train["steps"], "trainable_params": train["trainable_params"],
                              "peak_rss_delta_mb": train["peak_rss_delta_mb"],
                              "loadavg_1min": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
