"""Privacy measurements of a personalized adapter: canary exposure (Carlini et al. 2019, "The Secret
Sharer"), loss-based membership inference and the cross-user margin of a planted secret.

These are the measuring pieces ``bench/privacy.py`` runs per strategy (its docstring describes the protocol
and the estimators); they live in the package so tests and other tools use them like any other module.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from prisp.data.examples import Example, item_example
from prisp.data.lamp import ProfileItem
from prisp.data.protocol import recent_items
from prisp.training import IGNORE_INDEX, collate, tokenize_examples

# (prefix of the secret, the item text it is attached to); canary i uses entry i (cycling).
CANARY_FORMATS = [
    ("my pin is", "A private reminder I keep for myself about the card for my bank account."),
    ("my door code is", "Notes for getting into the new apartment building late at night after work."),
    ("my locker combination is", "Things I need to remember before the swim practice on Monday morning."),
    ("my phone unlock code is", "What to tell the repair shop when I drop off the broken phone tomorrow."),
    ("my safe combination is", "Instructions I wrote down for the house sitter while we are travelling."),
]
# task -> the profile field that carries the canary's text (prompt) and the one holding the secret (answer).
CANARY_FIELDS = {"LaMP-4": ("text", "title"), "LaMP-5": ("abstract", "title")}
LEAK_BITS = 1.0  # cross-user verdict: B's gain on A's secret relative to its alternatives, in bits


@dataclass(frozen=True)
class Canary:
    """One planted secret: ``"<prefix> d d d d d"`` as the answer of an item whose text is ``carrier``."""

    index: int
    prefix: str
    carrier: str
    secret: str
    repeats: int

    def text(self, secret: str | None = None) -> str:
        return f"{self.prefix} {' '.join(secret or self.secret)}"

    def item(self, task: str, copy_index: int, secret: str | None = None) -> ProfileItem:
        body, answer = CANARY_FIELDS[task]
        fields = {body: self.carrier, answer: self.text(secret)}
        return ProfileItem(id=f"canary{self.index}-{copy_index}", fields=fields)

    def prompt(self, task: str) -> str:
        return item_example(task, self.item(task, 0)).prompt


@dataclass
class MiaUser:
    """A real user's training items (members) and older unused items (non-members)."""

    user: str
    history: tuple[ProfileItem, ...]
    members: list[Example]
    nonmembers: list[Example]


@dataclass
class CanaryScore:
    """Log-likelihoods (nats, whole answer + EOS) of a canary and of the sampled alternatives."""

    canary_ll: float
    candidate_ll: np.ndarray  # [n]


# ---- scoring -----------------------------------------------------------------------------------------------
def _common_prefix(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache``; older versions ``past_key_values``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt: str, answers: list[str], batch_size: int = 64) -> np.ndarray:
    """log P(answer + EOS | prompt) in nats for each answer, tokenized exactly as in training.

    The tokens all answers share (chat prompt, the canary prefix) are run once and their KV cache is reused,
    so each answer costs only its own few tokens.
    """
    tokenized = tokenize_examples(tokenizer, [Example(prompt, a) for a in answers], max_length=1 << 30)
    ids = [t.input_ids for t in tokenized]
    n_prompt = next(i for i, label in enumerate(tokenized[0].labels) if label != IGNORE_INDEX)
    common = min(_common_prefix(ids), min(len(r) for r in ids) - 1)  # every answer keeps >= 1 own token
    context = torch.tensor([ids[0][:common]])  # [1, c]
    cache_arg = _cache_kwarg(model)
    out = model(input_ids=context, use_cache=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)  # [c, V]
    shared = sum(logp[j - 1, ids[0][j]].item() for j in range(max(n_prompt, 1), common))
    first_row = logp[common - 1]  # predicts each answer's first own token
    cache = getattr(out, "cache", None) or out.past_key_values
    result = np.empty(len(answers))
    pad = tokenizer.pad_token_id or 0
    for begin in range(0, len(ids), batch_size):
        rows = [r[common:] for r in ids[begin : begin + batch_size]]
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # [b, L]
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])  # [b, L]
        total = first_row[x[:, 0]]  # [b]
        if width > 1:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            logits = model(input_ids=x, use_cache=True, **{cache_arg: past}).logits  # [b, L, V]
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]  # [b, L-1]
            total = total + (lp * mask[:, 1:]).sum(1)
        result[begin : begin + len(rows)] = (total + shared).numpy()
    return result


@torch.no_grad()
def example_losses(model, tokenizer, examples: list[Example], batch_size: int = 4, max_length: int = 512):
    """Mean answer-token NLL (nats) per example, tokenized and truncated as in training."""
    tokenized = tokenize_examples(tokenizer, examples, max_length)
    losses: list[float] = []
    for begin in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[begin : begin + batch_size], pad_id=tokenizer.pad_token_id or 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, T, V]
        labels = batch["labels"][:, 1:]  # [b, T-1]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [b, T-1]
        counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
        losses += (nll.sum(1) / counts).tolist()
    return losses


def exposure_stats(canary_ll: float, candidate_ll: np.ndarray, space: int) -> dict:
    """Exposure of a canary among its format's ``space`` secrets, from sampled alternatives' log-likelihoods."""
    from scipy import stats

    n = len(candidate_ll)
    above = int((candidate_ll > canary_ll).sum()) + 0.5 * int((candidate_ll == canary_ll).sum())
    top = math.log2(space)
    exact = n >= space - 1
    rank = 1 + above if exact else 1 + (space - 1) * above / n
    hits = math.ceil(above)
    share_hi = 1.0 if hits >= n else stats.beta.ppf(0.95, hits + 1, n - hits)  # one-sided Clopper-Pearson
    low = top - math.log2(rank) if exact else top - math.log2(1 + (space - 1) * share_hi)
    try:
        nll = -np.asarray(candidate_ll)
        with np.errstate(all="ignore"):
            params = stats.skewnorm.fit(nll)
            p = float(stats.skewnorm.cdf(-canary_ll, *params))
        skew = min(top, -math.log2(max(p, 2.0**-top)))
    except Exception:  # a degenerate fit must not sink the run  # noqa: BLE001
        skew = float("nan")
    return {"exact": exact, "candidates": n, "more_likely": above, "rank": rank, "exposure": top - math.log2(rank),
            "exposure_lo95": low, "exposure_skewnorm": skew, "canary_bits": -canary_ll / math.log(2)}


def score_canaries(model, tokenizer, task: str, canaries: list[Canary], candidates: dict[int, list[str]],
                   limit: int | None, batch_size: int) -> list[CanaryScore]:
    """Each canary's and its alternatives' log-likelihood (all alternatives, or the first ``limit``)."""
    out = []
    for c in canaries:
        alts = candidates[c.index][:limit] if limit else candidates[c.index]
        answers = [c.text(), *[c.text(s) for s in alts]]
        lls = answer_logprobs(model, tokenizer, c.prompt(task), answers, batch_size)
        out.append(CanaryScore(float(lls[0]), lls[1:]))
    return out


def margin(score: CanaryScore, n: int) -> dict:
    median = float(np.median(score.candidate_ll[:n]))
    return {"ll": score.canary_ll, "margin_bits": (score.canary_ll - median) / math.log(2)}


# ---- data --------------------------------------------------------------------------------------------------
def make_canaries(rng: random.Random, n: int, repeats: list[int], digits: int) -> list[Canary]:
    secrets = rng.sample(range(10**digits), n)
    formats = [CANARY_FORMATS[i % len(CANARY_FORMATS)] for i in range(n)]
    return [Canary(i, *formats[i], f"{secrets[i]:0{digits}d}", repeats[i % len(repeats)]) for i in range(n)]


def sample_alternatives(rng: random.Random, canary: Canary, digits: int, n: int) -> list[str]:
    """``n`` distinct secrets of the canary's format other than its own (all of them when ``n`` covers R)."""
    space = 10**digits
    n = min(n, space - 1)
    drawn = [v for v in rng.sample(range(space), min(space, n + 1)) if f"{v:0{digits}d}" != canary.secret][:n]
    return [f"{v:0{digits}d}" for v in drawn]


def canary_history(task: str, profile, canaries: list[Canary], k: int) -> tuple[ProfileItem, ...]:
    """User A: a real user's most recent items with every canary copy interleaved, k items in all (file order)."""
    planted = [c.item(task, j) for c in canaries for j in range(c.repeats)]
    if len(planted) >= k:
        raise SystemExit(f"{len(planted)} canary copies do not fit among k = {k} items with a real one left; "
                         "lower --canaries or --repeats")
    real = [replace(item, date=None) for item in recent_items(profile, k - len(planted))]
    random.Random(0).shuffle(planted)
    step = len(real) / (len(planted) + 1)
    history = list(real)
    for n, item in enumerate(planted):  # spread evenly, in order
        history.insert(round((n + 1) * step) + n, item)
    return tuple(history)


def mia_user(task: str, user: str, profile, k: int, heldout: int, labels) -> MiaUser:
    ordered = recent_items(profile, len(profile))  # oldest first, as personalization orders them
    members, older = ordered[-k:], ordered[:-k][-heldout:]
    return MiaUser(
        user,
        tuple(profile),
        [item_example(task, i, labels) for i in members],
        [item_example(task, i, labels) for i in older],
    )
