"""Train the Stage-1 hypernetwork for the default model, or summarise a finished run.

    # the run (about an hour on one core; resumable with --resume):
    python bench/hypernet_train.py train --out /tmp/hypernet-run
    # after it finished: ship the checkpoint and write bench/results/hypernet_train.md
    python bench/hypernet_train.py report --run /tmp/hypernet-run --ship

``report`` reads the run's ``checkpoint/hypernet.json`` and ``log.jsonl`` and times anchor generation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prisp.data.locations import default_sni_file
from prisp.files import JsonlLog

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hypernet_train.md"
SHIP_DIR = ROOT / "src" / "prisp" / "hypernet" / "checkpoints" / "smollm2-135m"
TRAIN_ARGS = ["--model", "smollm2-135m", "--encoder", "minilm", "--mode", "sft", "--epochs", "1", "--batch-size", "8",
              "--lr", "1e-4", "--max-length", "256", "--save-every", "25", "--eval-instances", "2", "--seed", "0",
              "--threads", "1"]
# Measured before the run (one thread, the other core busy with another benchmark), 8 examples per step.
PROBE_NOTES = """\
| setting (1 thread unless noted) | s/step (8 examples) |
|---|---|
| padded batch of 8, full-vocabulary loss | 16.1 |
| micro-batches of 1 (no padding), full-vocabulary loss | 11.3 |
| micro-batches of 1, LM head on answer positions only (the recipe) | 10-13 (noisy: shared cores) |
| 2 threads, micro-batches of 1 | did not finish 2 steps in 10 min (load average 6-8 on the 2 cores: OpenMP oversubscription collapse, as DESIGN.md warns) |
| the background run itself (1 thread, load average 5-8 from other work) | 26-45 s wall per step, about 12 s of CPU |
"""


# How the shipped run actually went (from its train.log); the code paths named here were changed afterwards.
RUN_HISTORY = """\
History of this run, from `train.log`: steps 1-58 ran first with the same options but `--save-every 25` and no
`--resume`/`--steps-limit` (planned: the full epoch); that process ended at step 58 with the session that started it,
leaving the step-50 checkpoint. It was resumed from step 50 with `--steps-limit 190` (shipped as an interim
checkpoint: held-out loss 2.2719, ROUGE-L probe 0.1512) and from step 190 with the command above, to step 315 =
one full epoch (every one of the 2,515 training examples seen once). Two properties of the resume path of that time
shaped it: each resume restarted AdamW's moments and the warm-up/decay, and `--steps-limit` cut the epoch's
remaining examples *by position* (SNI is ordered by task), so steps 51-190 saw mostly the tasks at the front of the
file and steps 191-315 the rest. Both were fixed afterwards (resume is now exact: AdamW state, RNG and one schedule
over the run are checkpointed; `--steps-limit` stops after the first N steps of the shuffled run), so a fresh run
with today's code is a properly shuffled epoch and will not reproduce this checkpoint bit for bit.
"""


def train(out: str, data: str, resume: bool) -> int:
    cmd = [sys.executable, "-m", "prisp.hypernet.cli", "train", "--out", out, "--data", data, *TRAIN_ARGS]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.call(cmd, env=env)


def _anchor_timing(ckpt_dir: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from prisp.hypernet.anchor import Anchorer

    started = time.perf_counter()
    anchorer = Anchorer.load(ckpt_dir, "smollm2-135m")
    load_s = time.perf_counter() - started
    text = "Given a product review, classify its sentiment as positive or negative."
    first = anchorer.generate(text).total_ms
    runs, cpu_ms = [], []
    for _ in range(20):
        # CPU time beside wall time: on shared cores the wall clock also counts waiting for a core.
        cpu_start = time.process_time()
        runs.append(anchorer.generate(text))
        cpu_ms.append((time.process_time() - cpu_start) * 1e3)
    return {"loadavg": os.getloadavg()[0], "load_s": load_s, "first_ms": first,
            "median_ms": statistics.median(r.total_ms for r in runs),
            "encode_ms": statistics.median(r.encode_ms for r in runs),
            "hypernet_ms": statistics.median(r.hypernet_ms for r in runs),
            "cpu_ms": statistics.median(cpu_ms)}


def _loss_windows(losses: list[float], width: int = 25) -> list[tuple[int, float]]:
    return [(min(len(losses), start + width),
             statistics.fmean(losses[start:start + width])) for start in range(0, len(losses), width)]


def report(run: Path, ship: bool) -> None:
    ckpt = run / "checkpoint"
    meta = json.loads((ckpt / "hypernet.json").read_text())
    records = JsonlLog(run / "log.jsonl").records()
    state, metrics = meta["state"], meta["metrics"]
    steps = [r for r in records if "loss" in r and r["step"] <= state["step"]]
    losses = [r["loss"] for r in steps]
    base = metrics["base"]
    size_mb = (ckpt / "hypernet.safetensors").stat().st_size / 1e6
    # An interrupted/in-progress call has not added its time to the state yet; its log lines carry it.
    seconds = state["seconds"] or (steps[-1]["seconds"] if steps else 0.0)
    per_step = seconds / max(1, state["step"])
    timing = _anchor_timing(ckpt)
    interim = [] if state["done"] else [
        (f"**Interim: the run was still in progress (step {state['step']}); this page summarises its latest "
         "checkpoint. Rerun `python bench/hypernet_train.py report --run /tmp/hypernet-run --ship` when it ends.**"),
        "",
    ]
    lines = [
        "# Stage-1 hypernetwork training (SmolLM2-135M-Instruct, SNI)",
        "",
        *interim,
        f"Command (from `{run}`, cwd `/work/main`, background, 1 torch thread):",
        "",
        f"    {meta['training_command']}",
        "",
        RUN_HISTORY,
        (f"- data: `tasks.jsonl` sha256 `{meta['data_sha256']}` ({meta['data_tasks']['train']} training tasks, "
         f"{meta['data_tasks']['heldout']} held-out tasks)"),
        (f"- hypernetwork: {meta['num_parameters']:,} parameters; checkpoint `hypernet.safetensors` {size_mb:.1f} MB "
         "(fp32) + `hypernet.json`"),
        (f"- description encoder: `{meta['encoder']}`; LoRA r={meta['config']['rank']}, alpha "
         f"{meta['config']['lora_alpha']}, rsLoRA={meta['config']['use_rslora']}, q_proj + v_proj x "
         f"{meta['config']['num_layers']} layers"),
        (f"- run: {state['step']} steps of 8 examples ({state['epoch']} full epoch(s) done), training time "
         f"{seconds / 60:.1f} min ({per_step:.1f} s/step wall on one thread, shared machine)"),
        "",
        "## Step time (measured before the run)",
        "",
        PROBE_NOTES,
        "## Training loss (mean answer-token cross-entropy per step)",
        "",
        (f"First step {losses[0]:.3f}, last step {losses[-1]:.3f}; mean of the first 25 steps "
         f"{statistics.fmean(losses[:25]):.3f}, of the last 25 {statistics.fmean(losses[-25:]):.3f}."),
        "",
        "| steps up to | mean loss over the window |",
        "|---|---|",
        *[f"| {end} | {value:.3f} |" for end, value in _loss_windows(losses)],
        "",
        "## Held-out tasks (11 SNI tasks never trained on, 110 instances; adapter from each task's eval description)",
        "",
        "| after | held-out answer loss | ROUGE-L (2 instances/task, greedy 32 tokens) | train loss (epoch mean) |",
        "|---|---|---|---|",
        f"| base model, no adapter | {base['heldout_loss']:.4f} | {base.get('heldout_rouge_l', float('nan')):.4f} | |",
        *[f"| epoch {h['epoch']} (step {h['step']}) with generated adapter | {h['heldout_loss']:.4f} | "
          f"{h.get('heldout_rouge_l', float('nan')):.4f} | {h.get('train_loss_mean', float('nan')):.3f} |"
          for h in state["history"]],
        "",
        _verdict(base, state["history"][-1] if state["history"] else None),
        "",
        "## Anchor generation (`prisp anchor`), one thread",
        "",
        (f"Loading the hypernet + MiniLM encoder: {timing['load_s']:.1f} s. Generation after loading: median "
         f"{timing['median_ms']:.1f} ms over 20 calls (encode {timing['encode_ms']:.1f} ms + hypernet forward "
         f"{timing['hypernet_ms']:.1f} ms); the first call took {timing['first_ms']:.1f} ms; CPU time per call "
         f"(median) {timing['cpu_ms']:.1f} ms. Measured with the machine's 1-minute load average at "
         f"{timing['loadavg']:.1f} on 2 cores" + (" (other work running, so the wall times include waiting for a "
         "core)." if timing["loadavg"] > 1.2 else ".")),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")
    if ship:
        _ship(ckpt)


def _verdict(base: dict, final: dict | None) -> str:
    if final is None:
        return "No held-out evaluation was recorded."
    delta = final["heldout_loss"] - base["heldout_loss"]
    better = "lower (better)" if delta < 0 else "higher (worse)"
    text = (f"With the generated adapter the held-out answer loss is {final['heldout_loss']:.4f} vs "
            f"{base['heldout_loss']:.4f} without: {abs(delta):.4f} {better}.")
    if "heldout_rouge_l" in final and "heldout_rouge_l" in base:
        text += (f" ROUGE-L on the small probe: {final['heldout_rouge_l']:.4f} vs {base['heldout_rouge_l']:.4f} "
                 "(22 answers: a coarse signal).")
    return text


def _ship(ckpt: Path) -> None:
    """Copy the checkpoint into the package, without the resume state (the run's JSON and train_state file keep it)."""
    SHIP_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt / "hypernet.safetensors", SHIP_DIR / "hypernet.safetensors")
    meta = json.loads((ckpt / "hypernet.json").read_text())
    state = meta.pop("state")
    meta.pop("train_state", None)  # scalars of train_state.safetensors, which is not shipped
    meta["training"] = {k: state[k] for k in ("epoch", "step", "seconds", "history", "base_metrics", "done")}
    (SHIP_DIR / "hypernet.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(f"shipped {SHIP_DIR}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", default="/tmp/hypernet-run")
    t.add_argument("--data", default=str(default_sni_file()))
    t.add_argument("--resume", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("--run", default="/tmp/hypernet-run", type=Path)
    r.add_argument("--ship", action="store_true")
    args = parser.parse_args()
    if args.command == "train":
        raise SystemExit(train(args.out, args.data, args.resume))
    report(args.run, args.ship)


if __name__ == "__main__":
    main()
