"""Per-user prediction: personalize each target user from their own profile, then answer their queries.

Adapters are cached per (base model, anchor, strategy, options, history items), so re-running a
benchmark or a prediction reuses every user that is already done.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from prisp.adapters import LoraWeights, attach_lora, load_adapter, save_adapter
from prisp.data.lamp import LampSplit
from prisp.data.protocol import recent_items
from prisp.data.tasks import label_set
from prisp.generation import GenerationResult
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


def adapter_key(model_name: str, anchor: LoraWeights, config: PersonalizeConfig, task: str, items: list) -> str:
    """A content hash naming a user's adapter: any change of inputs gives a new key."""
    digest = hashlib.sha256()
    for tensor_key, tensor in sorted(anchor.to_peft_state_dict().items()):
        digest.update(tensor_key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    payload = {"model": model_name, "task": task, "config": {**asdict(config), "progress": None},
               "items": [item.to_json() for item in items]}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def predict_personalized(base, tokenizer, model_name: str, split: LampSplit, anchor: LoraWeights,
                         config: PersonalizeConfig, predict_config: PredictConfig, cache_dir: Path | None,
                         on_user: Callable[[str], None] | None = None) -> PersonalizedRun:
    """Answer ``split`` user by user, each with their own personalized adapter."""
    labels = label_set(split.task, split.inputs)
    asking = split.users_asking(predict_config.limit)
    wanted = {q.id for queries in asking.values() for q in queries}
    outputs: dict[str, PredictionRun] = {}
    costs: list[UserCost] = []
    for user, queries in asking.items():
        model, cost = _user_model(base, tokenizer, model_name, split.task, user, queries[0].profile, anchor,
                                  config, labels, cache_dir)
        costs.append(cost)
        user_split = LampSplit(split.task, split.split, queries, users={user: queries})
        outputs[user] = predict_split(model, tokenizer, user_split, replace(predict_config, limit=None))
        if on_user:
            on_user(user)
    return PersonalizedRun(_merge(split, outputs, wanted), costs)


def _user_model(base, tokenizer, model_name, task, user, profile, anchor, config, labels, cache_dir):
    items = recent_items(profile, config.k) if profile else []
    key = adapter_key(model_name, anchor, config, task, items)
    cached = cache_dir / key if cache_dir else None
    if cached and (cached / "personalization.json").is_file():
        report = json.loads((cached / "personalization.json").read_text())
        model = attach_lora(copy.deepcopy(base), load_adapter(cached)).eval()
        return model, UserCost(user, True, report["seconds"], report["peak_memory_mb"], report["trainable_params"])
    result = personalize(base, tokenizer, anchor, task, profile, config, labels)
    report = {**result.report(), "user": user}
    if cached:
        save_adapter(result.weights, cached, model_name, {"personalization.json": json.dumps(report, indent=1)})
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
