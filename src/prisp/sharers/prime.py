"""PriME: merge the target's most similar sharers' LoRAs with weights found by CMA-ES, trading fit for
privacy.

The merged adapter is ``anchor + sum_j w_j dW_j`` over the n most similar sharers (mean history embedding),
with one weight per sharer (or per sharer and layer) in ``[-1.5, 1.5]``. The objective, maximised gradient-
free under a small evaluation budget (Table 7), is the merged model's score on the target's own history items
minus ``privacy_weight`` x its agreement with the sharers' own predictions on those items (copying a sharer's
outputs would leak that sharer). One adapter of the final rank is attached once and its tensors overwritten
per candidate, so an evaluation costs only generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from prisp.adapters import LoraWeights, attach_lora, shared_copy
from prisp.data.examples import item_example
from prisp.data.lamp import ProfileItem
from prisp.data.tasks import get_task, snap_to_label
from prisp.errors import DataError
from prisp.generation import GenerationConfig, generate
from prisp.metrics import classification_metrics, generation_metrics, regression_metrics
from prisp.personalize.hyperparams import PRIME_TABLE7, table7_row
from prisp.sharers.merge import layer_sum, load_into, uniform_terms
from prisp.sharers.pool import SharerPool
from prisp.sharers.search import SearchConfig, SearchResult, cma_minimize
from prisp.sharers.similarity import HistoryEmbedder
from prisp.sharers.targets import AdapterBuild, measured

# How a weight vector maps onto per-layer coefficients: coefs[layer_index][sharer].
GRANULARITIES = {
    "sharer": lambda x, n_layers, n: np.tile(x, (n_layers, 1)),
    "layer": lambda x, n_layers, n: np.reshape(x, (n_layers, n)),
}


@dataclass(frozen=True)
class PrimeConfig:
    """PriME options (None: Table 7 "PRiME" for the task).

    Attributes:
        loras: sharers merged (the target's most similar).
        budget: objective evaluations (CMA-ES, start point included).
        batch_size: the target's most recent history items each evaluation scores.
        bound: merge weights live in ``[-bound, bound]``.
        privacy_weight: weight of the agreement-with-sharers penalty.
        granularity: ``sharer`` (one weight per sharer) or ``layer`` (one per sharer and layer).
        sigma0, seed: CMA-ES step size and seed.
        max_new_tokens: answer budget when history items are free text (label tasks use the task's budget).
    """

    loras: int | None = None
    budget: int | None = None
    batch_size: int | None = None
    bound: float = 1.5
    privacy_weight: float = 0.1
    granularity: str = "sharer"
    sigma0: float = 0.5
    seed: int = 0
    max_new_tokens: int = 32
    gen_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise DataError(
                f"prime granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        for name in ("loras", "budget", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DataError(f"prime {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class HistoryProbe:
    """A target's own history items as prompts with known answers, and how answers are compared."""

    prompts: list[str]
    golds: list[str]
    labels: tuple[str, ...]
    kind: str  # "label", "rating" or "text"


def history_probe(task: str, items: Sequence[ProfileItem], labels: Sequence[str] = ()) -> HistoryProbe:
    """Prompts/answers from history items (Table 16 wording); LaMP-1 and LaMP-7 items are free text."""
    spec = get_task(task)
    examples = [item_example(spec.name, item, labels) for item in items]
    kind = {"classification": "label", "regression": "rating"}.get(spec.kind, "text")
    if spec.history_prompt:
        kind = "text"  # items teach something else than the query (LaMP-1: title -> abstract)
    return HistoryProbe(
        [e.prompt for e in examples], [e.answer for e in examples], tuple(labels or spec.labels), kind
    )


def probe_score(probe: HistoryProbe, preds: Sequence[str]) -> float:
    """The task-style score of ``preds`` against the items' answers (higher is better)."""
    golds, preds = list(probe.golds), list(preds)
    if probe.kind == "label":
        m = classification_metrics(golds, preds, probe.labels)
        return (m["accuracy"] + m["f1"]) / 2
    if probe.kind == "rating":
        m = regression_metrics(golds, preds)
        return 1.0 - (m["MAE"] + m["RMSE"]) / 2
    m = generation_metrics(golds, preds)
    return (m["rouge-1"] + m["rouge-L"]) / 2


def agreement(probe: HistoryProbe, preds: Sequence[str], others: Sequence[str]) -> float:
    """How much ``preds`` repeat another model's answers: exact-match rate for labels, ROUGE for text."""
    if probe.kind == "text":
        m = generation_metrics([o or " " for o in others], list(preds))
        return (m["rouge-1"] + m["rouge-L"]) / 2
    return sum(p.strip() == o.strip() for p, o in zip(preds, others)) / max(1, len(preds))


class Prime:
    """PriME over a trained pool (a :class:`prisp.sharers.targets.SharerMethod`)."""

    name = "prime"

    def __init__(
        self, pool: SharerPool, config: PrimeConfig = PrimeConfig(), embedder: HistoryEmbedder | None = None,
        task: str | None = None,
    ):
        """``task``: the target task when it is not the pool's (Figure 7); its Table 7 row and answer budget
        apply."""
        self.task = task or pool.task
        table = table7_row(PRIME_TABLE7, self.task)
        self.pool = pool
        self.config = config
        self.embedder = embedder or HistoryEmbedder()
        self.loras = min(config.loras or table.loras, len(pool.sharers))
        self.search = SearchConfig(
            budget=config.budget or table.budget, bound=config.bound, sigma0=config.sigma0, seed=config.seed
        )
        self.batch_size = config.batch_size or table.batch_size

    def key_payload(self) -> dict:
        return {
            "pool": self.pool.key,
            "config": asdict(self.config),
            "loras": self.loras,
            "search": asdict(self.search),
            "batch_size": self.batch_size,
        }

    def merged(self, deltas: Sequence[LoraWeights], x: np.ndarray) -> LoraWeights:
        """The adapter for weight vector ``x``."""
        anchor = self.pool.anchor
        n_layers = len({layer for layer, _ in anchor.pairs})
        coefs = GRANULARITIES[self.config.granularity](np.asarray(x), n_layers, len(deltas))
        return layer_sum(anchor, uniform_terms(anchor, deltas, coefs))

    def _answers(self, model, tokenizer, probe: HistoryProbe, max_new_tokens: int) -> list[str]:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=self.config.gen_batch_size)
        texts = generate(model, tokenizer, probe.prompts, gen).texts
        return [snap_to_label(t, probe.labels) for t in texts] if probe.kind != "text" else texts

    def build(
        self, base, tokenizer, task: str, items: Sequence[ProfileItem], labels: Sequence[str]
    ) -> AdapterBuild:
        with measured(next(base.parameters()).device) as cost:
            chosen = self.pool.nearest(self.embedder.embed(task, items), self.loras)
            deltas = [s.delta for s, _ in chosen]
            probe = history_probe(task, list(items)[-self.batch_size :], labels)
            result = self._search(base, tokenizer, deltas, probe)
            weights = self.merged(deltas, result.best)
        details = {
            "sharers": [s.user for s, _ in chosen],
            "similarity": [round(sim, 4) for _, sim in chosen],
            "weights": [round(float(w), 4) for w in result.best],
            "objective": -result.best_loss,
            "evaluations": len(result.losses),
        }
        return AdapterBuild(
            weights, cost.seconds, cost.peak_memory_mb, result.best.size, [s for s, _ in chosen], details
        )

    def _search(self, base, tokenizer, deltas: Sequence[LoraWeights], probe: HistoryProbe) -> SearchResult:
        """CMA-ES over the merge weights, scoring each candidate on the target's history."""
        budget = (
            get_task(self.task).max_new_tokens if probe.kind != "text" else self.config.max_new_tokens
        )
        n_layers = len({layer for layer, _ in self.pool.anchor.pairs})
        dim = len(deltas) * (n_layers if self.config.granularity == "layer" else 1)
        x0 = np.full(dim, 1.0 / len(deltas))  # start from the plain average of the sharers
        model = attach_lora(shared_copy(base), self.merged(deltas, x0)).eval()
        sharer_answers = []
        for j in range(len(deltas)):  # a sharer's own model is the merge with weight 1 on it alone
            load_into(model, self.merged(deltas, self._one_hot(j, len(deltas), n_layers)))
            sharer_answers.append(self._answers(model, tokenizer, probe, budget))

        def loss(x: np.ndarray) -> float:
            load_into(model, self.merged(deltas, x))
            answers = self._answers(model, tokenizer, probe, budget)
            leak = sum(agreement(probe, answers, other) for other in sharer_answers) / len(sharer_answers)
            return -(probe_score(probe, answers) - self.config.privacy_weight * leak)

        return cma_minimize(loss, x0, self.search)

    def _one_hot(self, j: int, n: int, n_layers: int) -> np.ndarray:
        x = np.eye(n)[j]
        return np.tile(x, n_layers) if self.config.granularity == "layer" else x
