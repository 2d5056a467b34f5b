"""Answer a LaMP split with a (possibly adapted) base model under a prompt method.

Methods are a small table of prompt builders (NP, RAG, PAG, RAG+PAG), so a new prompt composition is a row,
not a flag threaded through the pipeline. PAG profile texts are generated elsewhere (``prisp.profiles``) and
handed in through :class:`PredictConfig` ``profiles``, keyed by query id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prisp.data.lamp import LampSplit, Query
from prisp.data.prompts import query_prompt, retrieval_query, with_context
from prisp.data.protocol import DEFAULT_K, recent_items
from prisp.data.tasks import get_task, label_set, snap_to_label
from prisp.errors import DataError
from prisp.generation import GenerationConfig, GenerationResult, generate
from prisp.retrieval import Bm25Retriever
from prisp.scoring import RATING_RULES, score_labels


@dataclass(frozen=True)
class PromptMethod:
    """How a query becomes a prompt: the Table 16 prompt plus optional retrieved history and profile text."""

    name: str
    description: str
    retrieve: bool
    profile: bool = False


METHODS: dict[str, PromptMethod] = {
    "np": PromptMethod("np", "no personalization: the task prompt alone", retrieve=False),
    "rag": PromptMethod("rag", "BM25 top-k of the user's recent history prepended", retrieve=True),
    "pag": PromptMethod("pag", "the user's LLM-written profile (PAG) prepended", False, profile=True),
    "rag+pag": PromptMethod("rag+pag", "profile text, then the BM25 top-k history, prepended", retrieve=True,
                            profile=True),
}


def variant_method(rag: bool, pag: bool) -> str:
    """The prompt method for a personalized run: Base (np), +RAG, +PAG or RAG+PAG."""
    table = {(False, False): "np", (True, False): "rag", (False, True): "pag", (True, True): "rag+pag"}
    return table[(rag, pag)]


DECODE_MODES = ("auto", "labels", "free")


def decode_mode(task: str, decode: str) -> str:
    """``labels`` or ``free`` for ``task`` under ``--decode`` (``auto``: labels wherever the task has a label set).

    Raises:
        DataError: ``labels`` asked of a generation task.
    """
    spec = get_task(task)
    if decode == "auto":
        return "free" if spec.kind == "generation" else "labels"
    if decode == "labels" and spec.kind == "generation":
        raise DataError(f"--decode labels needs a task with a label set; {spec.name} is a generation task")
    return decode


@dataclass(frozen=True)
class PredictConfig:
    """Options for one prediction run.

    Attributes:
        method: a key of :data:`METHODS`.
        k: items retrieved per query (RAG).
        history: how many of the user's most recent items retrieval sees (few-shot protocol: 10; 0 = all).
        limit: answer only the first ``limit`` queries (None = all).
        generation: decoding options (default: greedy with the task's ``max_new_tokens``).
        snap_labels: map label-task answers that start with a label onto it (see ``snap_to_label``).
        profiles: ``{query id: profile text}`` for the PAG methods (see ``prisp.profiles.query_profiles``).
        decode: ``free`` (greedy generation, then ``snap_labels``), ``labels`` (rank the task's label set by
            log-likelihood, ``prisp.scoring``; the answer is always a label) or ``auto``: labels for
            classification and rating tasks, free for generation tasks.
        label_normalise: ``mean`` or ``sum`` of the label's token log-probabilities (``prisp.scoring``).
        rating_rule: rating tasks under label decoding: ``likeliest`` rating, or the ``expected-error`` one (the
            weighted median of the model's distribution over ratings; ``prisp.scoring``).
    """

    method: str = "np"
    k: int = 1
    history: int = DEFAULT_K
    limit: int | None = None
    generation: GenerationConfig | None = None
    snap_labels: bool = True
    profiles: Mapping[str, str] = field(default_factory=dict)
    decode: str = "auto"
    label_normalise: str = "mean"
    rating_rule: str = "likeliest"

    def __post_init__(self) -> None:
        if self.rating_rule not in RATING_RULES:
            raise DataError(f"--rating-rule must be one of {', '.join(RATING_RULES)}, got {self.rating_rule!r}")
        if self.decode not in DECODE_MODES:
            raise DataError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.method not in METHODS:
            raise DataError(f"unknown method {self.method!r}; expected one of: {', '.join(METHODS)}")
        if self.k < 1:
            raise DataError(f"--k must be at least 1, got {self.k}")
        if self.history < 0:
            raise DataError(f"--history must be >= 0, got {self.history}")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class PredictionRun:
    """Predictions in query order, with the prompts used and the decoding cost."""

    task: str
    ids: list[str]
    prompts: list[str]
    outputs: list[str]
    generation: GenerationResult
    golds: list[str | None] = field(default_factory=list)
    raw_outputs: list[str] = field(default_factory=list)

    def as_lamp_outputs(self) -> dict:
        return {"task": self.task, "golds": [{"id": i, "output": o} for i, o in zip(self.ids, self.outputs)]}


def build_prompt(task: str, query: Query, method: PromptMethod, config: PredictConfig,
                 labels: Sequence[str]) -> str:
    """The prompt for one query under ``method``."""
    prompt = query_prompt(task, query.input, labels)
    profile_text = config.profiles.get(query.id, "") if method.profile else ""
    if not method.retrieve:
        return with_context(prompt, task, profile_text=profile_text)
    history = recent_items(query.profile, config.history) if config.history else list(query.profile)
    retrieved = Bm25Retriever(task, history).top_k(retrieval_query(task, query.input), config.k)
    return with_context(prompt, task, retrieved, profile_text)


def predict_split(model, tokenizer, split: LampSplit, config: PredictConfig,
                  on_batch: Callable[[int], None] | None = None) -> PredictionRun:
    """Answer the queries of ``split`` (the first ``config.limit`` of them)."""
    queries = split.queries[: config.limit] if config.limit else split.queries
    if not queries:
        raise DataError(f"{split.task} {split.split}: no queries to answer")
    spec = get_task(split.task)
    labels = label_set(spec.name, split.inputs)
    method = METHODS[config.method]
    missing = [q.id for q in queries if method.profile and q.id not in config.profiles]
    if missing:
        raise DataError(f"method {method.name} needs a profile text for every query; query {missing[0]!r} "
                        "has none (generate them with prisp.profiles.split_profiles)")
    prompts = [build_prompt(spec.name, q, method, config, labels) for q in queries]
    gen_config = config.generation or GenerationConfig(max_new_tokens=spec.max_new_tokens, first_line=spec.first_line)
    if decode_mode(spec.name, config.decode) == "labels":
        result = _scored(model, tokenizer, prompts, labels, config, gen_config, on_batch, spec.kind == "regression")
        outputs = list(result.texts)
    else:
        result = generate(model, tokenizer, prompts, gen_config, on_batch=on_batch)
        outputs = [snap_to_label(t, labels) for t in result.texts] if config.snap_labels else list(result.texts)
    return PredictionRun(spec.name, [q.id for q in queries], prompts, outputs, result,
                         [q.gold for q in queries], list(result.texts))


def _scored(model, tokenizer, prompts, labels, config: PredictConfig, gen_config: GenerationConfig,
            on_batch, rating: bool = False) -> GenerationResult:
    """Label answers by scoring, reported in generation's result type (no tokens are generated)."""
    start = time.perf_counter()
    texts: list[str] = []
    truncated = 0
    for begin in range(0, len(prompts), gen_config.batch_size):
        chunk = prompts[begin:begin + gen_config.batch_size]
        scored = score_labels(model, tokenizer, chunk, labels, config.label_normalise, gen_config.max_input_tokens)
        texts += scored.min_expected_error() if rating and config.rating_rule == "expected-error" else scored.choices
        truncated += scored.truncated_prompts
        if on_batch:
            on_batch(len(chunk))
    return GenerationResult(texts, 0, time.perf_counter() - start, truncated)
