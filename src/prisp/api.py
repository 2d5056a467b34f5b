"""The public Python API: a few verbs, plain data in and out, peft-compatible artifacts.

>>> import prisp
>>> base = prisp.load_base()                                  # doctest: +SKIP
>>> task = prisp.load_task("LaMP-4")
>>> task.name, task.kind
('LaMP-4', 'generation')
>>> anchor = prisp.make_anchor(base, task)                    # doctest: +SKIP
>>> history = [{"id": "1", "text": "The council voted on the park.", "title": "Park wins vote"}]
>>> result = prisp.personalize_user(base, anchor, task, history)  # doctest: +SKIP
>>> result.save("users/u0")                                   # doctest: +SKIP
>>> prisp.generate(base, "users/u0", task, ["Generate a headline for the following article: ..."])  # doctest: +SKIP

Every function works on CPU with the default model; ``docs/python-api.md`` has a complete example, and
``tests/test_api.py`` runs it end to end. History items are dicts with the task's profile fields (as in
LaMP's ``profile`` lists) or :class:`prisp.data.lamp.ProfileItem`; inputs are the task's input texts (LaMP
``input`` strings). Adapters are plain peft LoRA directories (or :class:`prisp.adapters.LoraWeights`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prisp.adapters import LoraWeights, attach_lora, load_adapter, shared_copy
from prisp.data.lamp import ProfileItem, parse_profile
from prisp.data.tasks import TaskSpec, get_task, label_set, snap_to_label
from prisp.errors import DataError
from prisp.models import DEFAULT_MODEL, LoadedModel

# ``personalize_user``, not ``personalize``: ``prisp.personalize`` is the Stage-2 subpackage, and importing it
# anywhere would shadow a package-level function of the same name.
__all__ = ["Personalized", "generate", "load_base", "load_task", "make_anchor", "personalize_user"]


def load_base(name: str = DEFAULT_MODEL, threads: int | str | None = None) -> LoadedModel:
    """The base model and its tokenizer (``.model``, ``.tokenizer``, ``.name``), on CPU in float32.

    Args:
        name: a registered name (``prisp models`` lists them), a local model directory or a model id in the
            local Hugging Face cache.
        threads: torch CPU threads for this process (None: ``$PRISP_THREADS``, else every core it may use).

    Raises:
        ModelNotFoundError: one line saying what to install or where to put the model.
    """
    from prisp.console import quiet_transformers, set_threads
    from prisp.models import load_model

    quiet_transformers()
    set_threads(None if threads is None else str(threads))
    return load_model(name)


def load_task(task: str | TaskSpec) -> TaskSpec:
    """A task's spec (name, kind, fields, labels, decoding budget and the description the hypernetwork reads),
    from any accepted spelling of its name (``"LaMP-4"``, ``"lamp_4"``).

    Raises:
        DataError: an unknown task (the message lists the known ones).
    """
    return task if isinstance(task, TaskSpec) else get_task(task)


def make_anchor(base: LoadedModel, task: str | TaskSpec, description: str | None = None,
                hypernet: str | os.PathLike | None = None) -> LoraWeights:
    """Stage 1: the task's anchor LoRA from its natural-language description, in one hypernetwork forward.

    Args:
        base: the loaded base model (its shapes must match the hypernetwork's).
        task: the task; its ``description`` is used unless ``description`` is given.
        description: another description of the same task (a sentence or two).
        hypernet: a hypernetwork checkpoint (default: the one shipped for ``base``).

    Raises:
        AdapterError: no hypernetwork for this model, or one that does not fit it.
    """
    from prisp.hypernet.anchor import Anchorer

    spec = load_task(task)
    anchorer = Anchorer.load(hypernet, base.name, base=base.model, tokenizer=base.tokenizer)
    return anchorer.generate(description if description is not None else spec.description).weights


@dataclass
class Personalized:
    """One user's personalized adapter (PRISP's bridge folded: a plain LoRA) and what training it cost."""

    weights: LoraWeights
    task: str
    model_name: str
    report: dict = field(default_factory=dict)

    def save(self, out: str | os.PathLike) -> Path:
        """Write a plain peft LoRA directory plus ``personalization.json`` (atomically); returns the directory."""
        from prisp.personalize.cache import save_personalized

        return save_personalized(self.weights, out, self.model_name, self.report)


def personalize_user(base: LoadedModel, anchor: LoraWeights | str | os.PathLike, task: str | TaskSpec,
                history: Sequence[dict | ProfileItem], strategy: str = "prisp", schedule: str = "paper",
                labels: Sequence[str] | None = None, **options) -> Personalized:
    """Stage 2: personalize ``anchor`` on one user's history (their ``k`` most recent items, default 10).

    Args:
        base: the loaded base model (never modified).
        anchor: the anchor's weights or a peft adapter directory.
        task: the task the history belongs to.
        history: the user's items, dicts with the task's profile fields (``id``, optional ``date``) or
            ``ProfileItem``.
        strategy: ``prisp`` (B and the bridge C), ``oppu``, ``no-bridge``, ``bridge-only``, ``full-lora``,
            ``pissa``, ``lora-ga`` (Table 4: SVD-based starts on the base model).
        schedule: ``paper`` (Table 7) or ``tuned`` (the searched schedule, LaMP-1/2N/4/5).
        labels: the label list for classification tasks whose labels come with the data (LaMP-2N);
            default: the task's own.
        **options: any other :class:`prisp.personalize.PersonalizeConfig` field (``k``, ``epochs``, ``lr``,
            ``seed``, ``progress`` ...).

    Raises:
        DataError: an empty or malformed history (the message names the item and field).
        PrispError: an unknown strategy or schedule, or ``tuned`` for a task it does not cover.
    """
    from prisp.personalize import PersonalizeConfig
    from prisp.personalize import personalize as run_personalize

    spec = load_task(task)
    config = PersonalizeConfig(strategy=strategy, schedule=schedule, **{"progress": False, **options})
    config.train_config(spec.name)  # an uncovered schedule is refused before any work
    items = _history(history, spec.name)
    weights = anchor if isinstance(anchor, LoraWeights) else load_adapter(anchor)
    chosen = tuple(labels) if labels is not None else label_set(spec.name)
    result = run_personalize(base.model, base.tokenizer, weights, spec.name, items, config, chosen)
    report = {**result.report(), "task": spec.name, "model": base.name}
    return Personalized(result.weights, spec.name, base.name, report)


def generate(base: LoadedModel, adapter: LoraWeights | Personalized | str | os.PathLike | None,
             task: str | TaskSpec, inputs: Sequence[str], decode: str = "auto",
             max_new_tokens: int | None = None) -> list[str]:
    """Answer ``inputs`` with the task's prompt, through ``adapter`` (None: the base model alone).

    Args:
        base: the loaded base model (never modified: the adapter goes on a shallow copy).
        adapter: a personalized or anchor adapter (weights, a :class:`Personalized`, or a peft directory).
        task: the task; each input is wrapped in its prompt.
        inputs: the task's input texts.
        decode: ``auto`` (label tasks rank their labels, others generate), ``labels`` or ``free``.
        max_new_tokens: answer budget (default: the task's).

    Returns:
        One answer per input; for label decoding always a member of the task's label set.
    """
    from prisp.data.prompts import query_prompt
    from prisp.generation import GenerationConfig
    from prisp.generation import generate as run_generate
    from prisp.predict import DECODE_MODES, decode_mode
    from prisp.scoring import score_labels

    spec = load_task(task)
    if isinstance(inputs, str) or not inputs or not all(isinstance(t, str) and t.strip() for t in inputs):
        raise DataError("inputs must be a non-empty list of non-empty strings")
    if decode not in DECODE_MODES:
        raise DataError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    model = base.model
    if adapter is not None:
        weights = adapter.weights if isinstance(adapter, Personalized) else (
            adapter if isinstance(adapter, LoraWeights) else load_adapter(adapter))
        model = attach_lora(shared_copy(base.model), weights).eval()
    labels = label_set(spec.name, list(inputs))
    prompts = [query_prompt(spec.name, text, labels) for text in inputs]
    if decode_mode(spec.name, decode) == "labels":
        return list(score_labels(model, base.tokenizer, prompts, labels).choices)
    budget = max_new_tokens or spec.max_new_tokens
    config = GenerationConfig(max_new_tokens=budget, first_line=spec.first_line)
    texts = run_generate(model, base.tokenizer, prompts, config).texts
    return [snap_to_label(text, labels) for text in texts]  # a no-op without labels


def _history(history: Sequence[dict | ProfileItem], task: str) -> tuple[ProfileItem, ...]:
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise DataError("history must be a list of items (dicts with the task's profile fields)")
    if all(isinstance(item, ProfileItem) for item in history):
        return tuple(history)
    raw = [item.to_json() if isinstance(item, ProfileItem) else item for item in history]
    return parse_profile(raw, task, "history")
