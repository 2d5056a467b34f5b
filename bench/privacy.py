"""Privacy of Stage 2: canary exposure, loss-based membership inference and cross-user leakage per strategy.

Every strategy personalizes from the same anchor (``--anchor DIR``, or a task-adapted LoRA trained here on
``--anchor-samples`` task-level samples of the ``train`` users, Table 7) with the same examples and schedule
(Table 7, one epoch over the 10 most recent items, plain + BM25-augmented copies).

* Canary exposure (Carlini et al. 2019, "The Secret Sharer"). A synthetic user A takes the most recent items of
  a real ``dev`` user and gets ``--canaries`` secrets planted among their k most recent items: each canary is
  an item whose answer (the LaMP-4/5 title the loss is on) is ``"<prefix> d d d d d"`` with random digits,
  repeated ``--repeats`` times. Exposure = log2|R| - log2 rank(canary) where R is the space of all
  ``10**digits`` secrets of the canary's format and the rank orders them by the model's log-perplexity of the
  whole answer given the canary item's prompt (higher exposure = more memorized; log2|R| = fully extracted,
  about 1.44 on average for a model that never saw it). The rank is estimated from ``--candidates`` secrets
  drawn uniformly without replacement: rank ~ 1 + (|R| - 1) * (share of drawn secrets at least as likely),
  with a one-sided 95% Clopper-Pearson lower bound on exposure, and the paper's skew-normal extrapolation
  (fit to the drawn candidates' log-perplexities; resolves exposures above log2(candidates)). When the
  candidates cover all of R the rank is exact.
* Membership inference. For each of ``--mia-users`` real users, the per-example answer loss of the items the
  adapter was trained on (the k most recent) against that user's older, unused items (the ``--heldout`` most
  recent of them), as ROC-AUC (sklearn; 0.5 = no leakage). "calibrated" scores each item by how much its loss
  dropped from the anchor (a reference-model attack); the anchor's own AUC shows the old-vs-recent shift that
  is not caused by training.
* Cross-user leakage. The log-likelihood of A's canaries under A's adapter, under user B's adapter (B = the
  first membership user, a different real user without canaries) and under the anchor; "margin" is the
  canary's log-likelihood minus the median of ``--margin-candidates`` alternative secrets of the same format
  (bits), which removes any shift of the format itself.

    python bench/privacy.py [--model smollm2-135m] [--task LaMP-4] [--strategies prisp,oppu,full-lora]
                            [--canaries 3] [--out bench/results/privacy.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prisp.adapters import LoraWeights, attach_lora, load_adapter, save_adapter
from prisp.bench.results import git_revision
from prisp.data.lamp import ProfileItem, load_task_split
from prisp.data.locations import default_data_dir
from prisp.data.tasks import label_set
from prisp.models import load_model
from prisp.personalize import STRATEGIES, PersonalizeConfig, personalize, task_adapt
from prisp.privacy import (
    CANARY_FIELDS,
    LEAK_BITS,
    Canary,
    CanaryScore,
    MiaUser,
    canary_history,
    example_losses,
    exposure_stats,
    make_canaries,
    margin,
    mia_user,
    sample_alternatives,
    score_canaries,
)

ROOT = Path(__file__).resolve().parents[1]
@dataclass
class Record:
    """Everything measured for one model (the anchor or a strategy)."""

    train: dict = field(default_factory=dict)
    exposure: list[dict] = field(default_factory=list)  # per canary
    margins: dict = field(default_factory=dict)  # "A" / "B" -> per-canary {"ll", "margin_bits"}
    losses: dict = field(default_factory=dict)  # user -> {"members": [...], "nonmembers": [...]}
    seconds: float = 0.0



def resolve_data(data: str | None) -> Path:
    return Path(data) if data else default_data_dir(benchmark=True, sample_if_missing=True)


def get_anchor(args, base, tokenizer, data: Path) -> tuple[LoraWeights, str, float]:
    if args.anchor:
        return load_adapter(args.anchor), f"peft adapter {args.anchor}", 0.0
    train = load_task_split(data, args.task, "train")
    start = time.perf_counter()
    adapted = task_adapt(base, tokenizer, args.task, train.queries, args.anchor_samples, seed=args.seed,
                         labels=label_set(args.task, train.inputs))
    seconds = time.perf_counter() - start
    if args.save_anchor:
        save_adapter(adapted.weights, args.save_anchor, args.model)
    source = (f"task-adapted LoRA (r {adapted.weights.spec.r}) on {len(adapted.query_ids)} random `train` samples, "
              "Table 7 (3 epochs, lr 1e-4, batch 6)")
    return adapted.weights, source, seconds


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What every model is measured on: user A's canaries and alternatives, the membership users."""

    args: argparse.Namespace
    tokenizer: object
    canaries: list[Canary]
    candidates: dict[int, list[str]]
    a_history: tuple[ProfileItem, ...]
    mias: list[MiaUser]

    def canaries_under(self, model, limit: int | None = None) -> list[CanaryScore]:
        args = self.args
        return score_canaries(model, self.tokenizer, args.task, self.canaries, self.candidates, limit, args.batch_size)

    def measure_a(self, model, record: Record) -> None:
        """Exposure and margins of user A's canaries under ``model``."""
        scores = self.canaries_under(model)
        record.exposure = [exposure_stats(s.canary_ll, s.candidate_ll, 10**self.args.digits) for s in scores]
        record.margins["A"] = [margin(s, self.args.margin_candidates) for s in scores]

    def losses(self, model, user: MiaUser) -> dict:
        return {"members": example_losses(model, self.tokenizer, user.members),
                "nonmembers": example_losses(model, self.tokenizer, user.nonmembers)}


def run_anchor(base, anchor: LoraWeights, setup: Setup) -> Record:
    record, start = Record(), time.perf_counter()
    anchored = attach_lora(copy.deepcopy(base), anchor).eval()
    setup.measure_a(anchored, record)
    for user in setup.mias:
        record.losses[user.user] = setup.losses(anchored, user)
    record.seconds = time.perf_counter() - start
    print(f"anchor: user A exposure {[round(e['exposure'], 2) for e in record.exposure]}", flush=True)
    return record


def run_strategy(name: str, base, anchor: LoraWeights, labels, setup: Setup) -> Record:
    """Personalize user A and every membership user with ``name``; user B = the first membership user."""
    args, tok = setup.args, setup.tokenizer
    config = PersonalizeConfig(strategy=name, lr=args.lr, progress=False, seed=args.seed, k=args.k,
                               epochs=args.epochs)
    record, start = Record(), time.perf_counter()
    result = personalize(base, tok, anchor, args.task, setup.a_history, config, labels)
    schedule = config.train_config(args.task)
    record.train = {
        "seconds": result.train.seconds,
        "steps": result.train.steps,
        "examples": result.examples,
        "trainable": result.train.trainable_params,
        "final_loss": result.train.final_loss,
        "lr": schedule.lr,
        "batch_size": schedule.batch_size,
    }
    setup.measure_a(result.model, record)
    del result
    print(f"{name}: user A exposure {[round(e['exposure'], 2) for e in record.exposure]}", flush=True)
    for index, user in enumerate(setup.mias):
        result = personalize(base, tok, anchor, args.task, user.history, config, labels)
        record.losses[user.user] = setup.losses(result.model, user)
        if index == 0:  # user B: a different real user; how likely are A's canaries under B's adapter?
            scores = setup.canaries_under(result.model, args.margin_candidates)
            record.margins["B"] = [margin(s, args.margin_candidates) for s in scores]
        del result
    record.seconds = time.perf_counter() - start
    print(f"{name}: done in {record.seconds:.0f} s", flush=True)
    return record


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started, load_start = time.time(), os.getloadavg()
    repeats, strategies = [int(r) for r in args.repeats.split(",")], args.strategies.split(",")
    data = resolve_data(args.data)
    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    dev = load_task_split(data, args.task, "dev", require_golds=False)
    labels = label_set(args.task, dev.inputs)
    need = args.k + args.min_heldout
    users = [(u, qs[0].profile) for u, qs in dev.users.items() if len(qs[0].profile) >= need]
    if len(users) < 2:
        raise SystemExit(f"{data} {args.task} dev has {len(users)} users with >= {need} items; need 2 "
                         "(user A's source and user B)")
    rng = random.Random(args.seed)
    canaries = make_canaries(rng, args.canaries, repeats, args.digits)
    candidates = {c.index: sample_alternatives(rng, c, args.digits, args.candidates) for c in canaries}
    a_history = canary_history(args.task, users[0][1], canaries, args.k)
    mias = [mia_user(args.task, u, p, args.k, args.heldout, labels) for u, p in users[1 : 1 + args.mia_users]]
    setup = Setup(args, tok, canaries, candidates, a_history, mias)
    anchor, anchor_source, anchor_seconds = get_anchor(args, base, tok, data)
    print(f"anchor: {anchor_source} ({anchor_seconds:.0f} s)", flush=True)
    records = {"anchor": run_anchor(base, anchor, setup)}
    for name in strategies:
        records[name] = run_strategy(name, base, anchor, labels, setup)
    context = {"data": str(data), "users": users, "mias": mias, "canaries": canaries, "anchor": anchor_source,
               "anchor_seconds": anchor_seconds, "seconds": time.time() - started, "load_start": load_start,
               "load_end": os.getloadavg(), "a_history": a_history, "model_name": loaded.name}
    write_report(Path(args.out), args, records, context)


# ---- report ------------------------------------------------------------------------------------------------
def mia_summary(record: Record, anchor: Record) -> dict:
    from sklearn.metrics import roc_auc_score

    per_user, calibrated, pooled_y, pooled_s, pooled_c = [], [], [], [], []
    member_losses, non_losses = [], []
    for user, losses in record.losses.items():
        ref = anchor.losses[user]
        y = [1] * len(losses["members"]) + [0] * len(losses["nonmembers"])
        s = [-x for x in losses["members"] + losses["nonmembers"]]
        c = [r - x for r, x in zip(ref["members"] + ref["nonmembers"], losses["members"] + losses["nonmembers"])]
        per_user.append(roc_auc_score(y, s))
        calibrated.append(roc_auc_score(y, c))
        pooled_y += y
        pooled_s += s
        pooled_c += c
        member_losses += losses["members"]
        non_losses += losses["nonmembers"]
    return {"auc_mean": statistics.mean(per_user), "auc_sd": statistics.pstdev(per_user),
            "auc_pooled": roc_auc_score(pooled_y, pooled_s), "cal_mean": statistics.mean(calibrated),
            "cal_pooled": roc_auc_score(pooled_y, pooled_c), "member_loss": statistics.mean(member_losses),
            "nonmember_loss": statistics.mean(non_losses), "per_user": dict(zip(record.losses, per_user)),
            "members": len(member_losses), "nonmembers": len(non_losses)}


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _exposure_section(args, records: dict[str, Record], ctx: dict) -> list[str]:
    space, canaries = 10**args.digits, ctx["canaries"]
    lines = [
        "## Canary exposure",
        "",
        (f"User A = the {args.k - sum(c.repeats for c in canaries)} most recent items of real user "
         f"`{ctx['users'][0][0]}` plus {len(canaries)} canaries (answers `<prefix> d d d d d`, {args.digits} "
         f"random digits, |R| = {space:,}, max exposure log2|R| = {math.log2(space):.2f}), each repeated as listed "
         "and interleaved among the k items; each copy trains a plain and (with BM25 context) an augmented example. "
         "Rank by log-perplexity of the whole answer given the canary item's prompt, estimated from "
         f"{records['anchor'].exposure[0]['candidates']:,} alternatives per canary drawn uniformly without "
         "replacement (exact when they cover R): rank = 1 + (|R| - 1) x share of alternatives at least as likely. "
         "'lo95' is the one-sided 95% Clopper-Pearson lower bound of that estimate; 'skew-normal' is the paper's "
         "extrapolation from a skew-normal fit to the alternatives' log-perplexities (resolves exposures above "
         "log2(alternatives)). A model that never saw a canary has exposure ~1.44 on average."),
        "",
        "| model | canary | repeats | answer bits | alternatives more likely | exposure | lo95 | skew-normal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, record in records.items():
        for c, e in zip(canaries, record.exposure):
            lines.append(
                _row(name, f"`{c.text()}`", c.repeats, f"{e['canary_bits']:.1f}",
                     f"{e['more_likely']:g} / {e['candidates']:,}", f"{e['exposure']:.2f}",
                     f"{e['exposure_lo95']:.2f}", f"{e['exposure_skewnorm']:.2f}")
            )  # fmt: skip
    lines += ["", "| model | mean exposure | max exposure | mean skew-normal |", "|---|---:|---:|---:|"]
    for name, record in records.items():
        exp, sn = [e["exposure"] for e in record.exposure], [e["exposure_skewnorm"] for e in record.exposure]
        lines.append(
            _row(name, f"{statistics.mean(exp):.2f}", f"{max(exp):.2f}", f"{statistics.mean(sn):.2f}")
        )
    return lines


def _mia_section(args, mia: dict[str, dict], ctx: dict) -> list[str]:
    mias = ctx["mias"]
    lines = [
        "## Loss-based membership inference",
        "",
        (f"{len(mias)} real users (the next dev users after user A's source with >= {args.k + args.min_heldout} "
         f"items: `{'`, `'.join(m.user for m in mias)}`); members = the {args.k} items each user's adapter was "
         f"trained on, non-members = up to {args.heldout} of the same user's older, unused items "
         f"({mia['anchor']['members']} vs {mia['anchor']['nonmembers']} items in all). Score = minus the mean "
         "answer-token loss of the item's plain prompt; calibrated = the loss drop from the anchor (reference-model "
         "attack). ROC-AUC (sklearn), 0.5 = no leakage; the anchor row shows the old-vs-recent shift that training "
         "did not cause."),
        "",
        ("| model | AUC mean over users (sd) | AUC pooled | calibrated AUC mean | calibrated pooled | member loss "
         "| non-member loss |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in mia.items():
        cal = ("-", "-") if name == "anchor" else (f"{m['cal_mean']:.3f}", f"{m['cal_pooled']:.3f}")
        lines.append(
            _row(name, f"{m['auc_mean']:.3f} ({m['auc_sd']:.3f})", f"{m['auc_pooled']:.3f}", *cal,
                 f"{m['member_loss']:.3f}", f"{m['nonmember_loss']:.3f}")
        )  # fmt: skip
    return lines


def _cross_section(args, records: dict[str, Record], ctx: dict) -> list[str]:
    lines = [
        "## Cross-user leakage",
        "",
        ("Log-likelihood (nats, whole answer + EOS, given the canary item's prompt) of user A's canaries under the "
         f"anchor, under A's adapter and under the adapter of user B = `{ctx['mias'][0].user}` (a different real "
         "user, no canaries), per strategy. Margin = the canary's log-likelihood minus the median of "
         f"{args.margin_candidates} alternative secrets of its format, in bits; gain = a model's margin minus the "
         "anchor's: how much more likely the canary became relative to other secrets of its format. The raw "
         "log-likelihood also moves with whatever an adapter learns about the answer format (e.g. the EOS after a "
         f"headline), so the verdict uses the gain: B leaks A's secret if its gain exceeds {LEAK_BITS:g} bit (the "
         "canary at least twice as likely, relative to its alternatives, as under the anchor)."),
        "",
        ("| strategy | canary | anchor LL | A LL | B LL | B - anchor | raw B <= anchor | gain A (bits) | "
         "gain B (bits) | B leaks A's secret |"),
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    base = records["anchor"].margins["A"]
    for name, record in records.items():
        if name == "anchor":
            continue
        for c, a0, a, b in zip(ctx["canaries"], base, record.margins["A"], record.margins["B"]):
            gain_a, gain_b = a["margin_bits"] - a0["margin_bits"], b["margin_bits"] - a0["margin_bits"]
            lines.append(
                _row(name, f"`{c.text()}`", f"{a0['ll']:.2f}", f"{a['ll']:.2f}", f"{b['ll']:.2f}",
                     f"{b['ll'] - a0['ll']:+.3f}", "yes" if b["ll"] <= a0["ll"] else "no", f"{gain_a:+.2f}",
                     f"{gain_b:+.2f}", "YES" if gain_b > LEAK_BITS else "no")
            )  # fmt: skip
    return lines


def _timing_section(records: dict[str, Record]) -> list[str]:
    lines = [
        "## Training and timing",
        "",
        "Phase seconds: personalizing user A and every membership user plus all scoring, per model.",
        "",
        "| model | trainable params | steps | examples | train s (user A) | final loss | phase s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in records.items():
        t = r.train
        cells = (
            (
                f"{t['trainable']:,}",
                t["steps"],
                t["examples"],
                f"{t['seconds']:.1f}",
                f"{t['final_loss']:.4f}",
            )
            if t
            else ("-",) * 5
        )
        lines.append(_row(name, *cells, f"{r.seconds:.0f}"))
    return lines


def write_report(path: Path, args, records: dict[str, Record], ctx: dict) -> None:
    command = "python bench/privacy.py " + shlex.join(sys.argv[1:])
    first = next(r for r in records.values() if r.train)
    mia = {name: mia_summary(r, records["anchor"]) for name, r in records.items()}
    lines = [
        f"# Privacy of Stage 2 personalization ({args.task}, model `{ctx['model_name']}`)",
        "",
        "```",
        command,
        "```",
        "",
        (f"Data `{ctx['data']}` ({args.task} dev). Anchor: {ctx['anchor']} ({ctx['anchor_seconds']:.0f} s). Every "
         f"strategy starts from it with the same examples: the k = {args.k} most recent items, plain + "
         f"BM25-augmented copies, {args.epochs} epoch(s), batch {first.train['batch_size']}, lr {first.train['lr']} (Table 7"
         f"{'' if args.lr is None else ', overridden'}), seed {args.seed}. Machine: {platform.machine()}, "
         f"{os.cpu_count()} cores, torch threads {args.threads}, load average {ctx['load_start'][0]:.1f} at start "
         f"and {ctx['load_end'][0]:.1f} at the end; total {ctx['seconds'] / 60:.1f} min; git "
         f"{git_revision(ROOT) or 'unknown'}."),
        "",
        *_exposure_section(args, records, ctx),
        "",
        *_mia_section(args, mia, ctx),
        "",
        *_cross_section(args, records, ctx),
        "",
        *_timing_section(records),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    raw = {
        "command": command,
        "args": vars(args),
        "git": git_revision(ROOT),
        "canaries": [vars(c) for c in ctx["canaries"]],
        "user_a_items": [i.id for i in ctx["a_history"]],
        "mia": mia,
        "records": {n: vars(r) for n, r in records.items()},
    }
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print("\n".join(lines))
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registered model name or a model directory")
    p.add_argument("--task", default="LaMP-4", choices=sorted(CANARY_FIELDS))
    p.add_argument("--strategies", default="prisp,oppu,full-lora")
    p.add_argument("--canaries", type=int, default=3)
    p.add_argument("--repeats", default="1,2,3", help="copies of canary i: entry i of this list (cycling)")
    p.add_argument("--digits", type=int, default=5, help="digits per secret: |R| = 10**digits")
    p.add_argument("--candidates", type=int, default=2000, help="alternative secrets sampled per canary")
    p.add_argument("--margin-candidates", type=int, default=200, help="alternatives for the cross-user margin")
    p.add_argument("--mia-users", type=int, default=8)
    p.add_argument("--heldout", type=int, default=10, help="older, unused items per membership user (at most)")
    p.add_argument("--min-heldout", type=int, default=5, help="users need k + this many items")
    p.add_argument("--k", type=int, default=10, help="most recent items used for training (protocol: 10)")
    p.add_argument("--data", default=None, help="LaMP data dir [$PRISP_DATA, ../shared/data/lamp-offline, sample]")
    p.add_argument("--anchor", default=None, help="peft anchor directory (default: task-adapt one here)")
    p.add_argument("--anchor-samples", type=int, default=50, help="task samples of the task-adapted anchor")
    p.add_argument("--save-anchor", default=None, help="write the task-adapted anchor here for reuse")
    p.add_argument("--lr", type=float, default=None, help="override Table 7's personalization lr")
    p.add_argument("--epochs", type=int, default=1, help="personalization epochs (protocol: 1; more = stress test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="alternatives scored per forward pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/privacy.md"))
    args = p.parse_args(argv)
    for name in ("canaries", "digits", "candidates", "margin_candidates", "mia_users", "heldout", "k", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.margin_candidates > args.candidates:
        p.error("--margin-candidates cannot exceed --candidates")
    unknown = [s for s in args.strategies.split(",") if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if not all(r.strip().isdigit() and int(r) >= 1 for r in args.repeats.split(",")):
        p.error(f"--repeats must be positive integers separated by commas, got {args.repeats!r}")
    return args


if __name__ == "__main__":
    main()
