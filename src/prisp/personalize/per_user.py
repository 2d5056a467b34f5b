"""Per-user prediction: personalize each target user from their own profile, then answer their queries.

Adapters are cached under one content key (prisp.personalize.cache), so re-running a
benchmark or a prediction reuses every user that is already done.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from prisp.adapters import LoraWeights, attach_lora, shared_copy
from prisp.data.lamp import LampSplit, Query
from prisp.data.protocol import recent_items
from prisp.data.tasks import label_set
from prisp.generation import GenerationResult
from prisp.personalize.cache import AdapterCache, personalization_key
from prisp.personalize.personalizer import PersonalizeConfig, personalize
from prisp.predict import PredictConfig, PredictionRun, predict_split


@dataclass
class UserCost:
    """What one user's personalization cost (from the run that trained it, also when cached)."""

    user: str
    cached: bool
    seconds: float
    peak_memory_mb: float | None
    trainable_params: int


@dataclass
class PersonalizedRun:
    """Predictions over all users plus the per-user training costs."""

    run: PredictionRun
    users: list[UserCost] = field(default_factory=list)


@dataclass(frozen=True)
class UserRequest:
    """One target user's work: personalize from their profile, then answer their queries.

    Self-contained and picklable, so a pool worker (``prisp bench --workers``) runs exactly what the
    sequential loop runs.

    Attributes:
        user: the user's id (their first query id).
        task, split: where the queries come from.
        queries: the user's queries to answer; the first one's profile is the history trained on.
        config: personalization options.
        predict: prediction options (``limit`` already applied by choosing ``queries``).
        labels: the label set training prompts list (from the whole split, as the sequential run).
        cache_dir: the adapter cache (None: no caching).
    """

    user: str
    task: str
    split: str
    queries: tuple[Query, ...]
    config: PersonalizeConfig
    predict: PredictConfig
    labels: tuple[str, ...]
    cache_dir: Path | None


@dataclass
class UserPrediction:
    """One user's predictions and what their personalization cost."""

    run: PredictionRun
    cost: UserCost


def user_requests(split: LampSplit, config: PersonalizeConfig, predict_config: PredictConfig,
                  cache_dir: Path | None) -> list[UserRequest]:
    """The users of ``split`` asking one of its first ``predict_config.limit`` queries, in split order.

    Each request keeps only its own queries' PAG profile texts: all a prediction reads, and all a pool
    worker needs to be sent.
    """
    labels = label_set(split.task, split.inputs)
    requests = []
    for user, queries in split.users_asking(predict_config.limit).items():
        profiles = {q.id: predict_config.profiles[q.id] for q in queries if q.id in predict_config.profiles}
        options = replace(predict_config, limit=None, profiles=profiles)
        requests.append(UserRequest(user, split.task, split.split, tuple(queries), config, options, labels,
                                    cache_dir))
    return requests


def predict_user(base, tokenizer, model_name: str, anchor: LoraWeights,
                 request: UserRequest) -> UserPrediction:
    """Personalize one user (or read their cached adapter) and answer their queries."""
    queries = list(request.queries)
    model, cost = _user_model(base, tokenizer, model_name, request.task, request.user, queries[0].profile,
                              anchor, request.config, request.labels, request.cache_dir)
    user_split = LampSplit(request.task, request.split, queries, users={request.user: queries})
    return UserPrediction(predict_split(model, tokenizer, user_split, request.predict), cost)


def predict_personalized(base, tokenizer, model_name: str, split: LampSplit, anchor: LoraWeights,
                         config: PersonalizeConfig, predict_config: PredictConfig, cache_dir: Path | None,
                         on_user: Callable[[str], None] | None = None) -> PersonalizedRun:
    """Answer ``split`` user by user, each with their own personalized adapter."""
    done = []
    for request in user_requests(split, config, predict_config, cache_dir):
        done.append(predict_user(base, tokenizer, model_name, anchor, request))
        if on_user:
            on_user(request.user)
    return merge_users(split, predict_config, done)


def merge_users(split: LampSplit, predict_config: PredictConfig,
                done: list[UserPrediction]) -> PersonalizedRun:
    """The per-user results (in :func:`user_requests` order) as one run in the split's query order."""
    asking = split.users_asking(predict_config.limit)
    wanted = {q.id for queries in asking.values() for q in queries}
    return PersonalizedRun(_merge(split, {d.cost.user: d.run for d in done}, wanted), [d.cost for d in done])


def _user_model(base, tokenizer, model_name, task, user, profile, anchor, config, labels, cache_dir):
    items = recent_items(profile, config.k) if profile else []
    cache = AdapterCache(cache_dir) if cache_dir else None
    key = personalization_key(model_name, anchor, config, task, items, labels)
    hit = cache.get(key) if cache else None
    if hit is not None:
        weights, report = hit
        model = attach_lora(shared_copy(base), weights).eval()
        return model, UserCost(user, True, report["seconds"], report["peak_memory_mb"], report["trainable_params"])
    result = personalize(base, tokenizer, anchor, task, profile, config, labels)
    report = {**result.report(), "user": user}
    if cache:
        cache.put(key, result.weights, model_name, report)
    return result.model, UserCost(user, False, result.train.seconds, report["peak_memory_mb"],
                                  result.train.trainable_params)


def _merge(split: LampSplit, runs: dict[str, PredictionRun], wanted: set[str]) -> PredictionRun:
    """One PredictionRun in the split's query order from the per-user runs."""
    by_id = {}
    seconds = tokens = truncated = 0
    for run in runs.values():
        seconds += run.generation.seconds
        tokens += run.generation.new_tokens
        truncated += run.generation.truncated_prompts
        for i, qid in enumerate(run.ids):
            by_id[qid] = (run.prompts[i], run.outputs[i], run.raw_outputs[i], run.golds[i])
    ids = [q.id for q in split.queries if q.id in wanted]
    rows = [by_id[i] for i in ids]
    return PredictionRun(split.task, ids, [r[0] for r in rows], [r[1] for r in rows],
                         GenerationResult([r[2] for r in rows], tokens, seconds, truncated),
                         [r[3] for r in rows], [r[2] for r in rows])
