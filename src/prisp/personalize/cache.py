"""The one personalization cache key and the one cache-or-train path.

A key names every input of one user's Stage 2: the base model, the anchor (tensors *and* LoRA spec: alpha
and rsLoRA set the scale, not the tensors), the task, the resolved training schedule (a re-tuned table must
not return adapters of the old one), the user's history items and the label list (it enters the prompts).
The per-user predictor, the sharer pool and the batch runner all name adapters with it, so none of them
can return an adapter trained from other inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from prisp.adapters import LoraWeights, load_adapter, save_adapter
from prisp.data.lamp import ProfileItem
from prisp.errors import AdapterError
from prisp.personalize.personalizer import PersonalizeConfig

REPORT_NAME = "personalization.json"  # beside a stored adapter: what training it cost, and its key


def save_personalized(weights: LoraWeights, out: Path | str, model_name: str, report: dict) -> Path:
    """A user's adapter as a plain peft LoRA directory with its ``personalization.json`` report, written in one
    atomic swap (a reader never sees the adapter without its report)."""
    return save_adapter(weights, out, model_name, {REPORT_NAME: json.dumps(report, indent=1)})


def anchor_digest(anchor: LoraWeights) -> str:
    """A hash of the anchor's LoRA spec and tensors (compute once per run: it reads every tensor)."""
    digest = hashlib.sha256(json.dumps(asdict(anchor.spec), sort_keys=True).encode())
    for name, tensor in sorted(anchor.to_peft_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def personalization_key(model_name: str, anchor: LoraWeights | str, config: PersonalizeConfig, task: str,
                        items: Sequence[ProfileItem], labels: Sequence[str] = ()) -> str:
    """The content key of one user's adapter: any change of an input of training gives a new key.

    Args:
        model_name: the base model's name as the caller loads it.
        anchor: the anchor, or its :func:`anchor_digest` when many keys share one anchor.
        config: the user's Stage-2 options (``progress`` is not an input).
        task: canonical task name.
        items: the history items training uses (already cut to the most recent ``config.k``).
        labels: the task's label list as the prompts show it.
    """
    digest = anchor if isinstance(anchor, str) else anchor_digest(anchor)
    train = {**asdict(config.train_config(task)), "progress": None, **config.factor_lrs(task)}
    payload = {"model": model_name, "anchor": digest, "task": task, "config": {**asdict(config), "progress": None},
               "train": train, "items": [item.to_json() for item in items], "labels": list(labels)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class AdapterCache:
    """Trained adapters under their key: ``ROOT/<prefix><key>/`` is a plain peft LoRA + ``personalization.json``.

    A directory counts only once its report is there (``save_adapter`` swaps a finished directory in), so an
    interrupted write is simply trained again.
    """

    def __init__(self, root: Path | str, prefix: str = ""):
        self.root = Path(root)
        self.prefix = prefix

    def path(self, key: str) -> Path:
        return self.root / f"{self.prefix}{key}"

    def get(self, key: str) -> tuple[LoraWeights, dict] | None:
        """The cached adapter and its report, or None."""
        folder = self.path(key)
        report = folder / REPORT_NAME
        if not report.is_file():
            return None
        try:
            return load_adapter(folder), json.loads(report.read_text(encoding="utf-8"))
        except (AdapterError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # damaged: trained again and replaced

    def put(self, key: str, weights: LoraWeights, model_name: str, report: dict) -> None:
        """Store an adapter under its key.

        Two processes may train the same key at once (pool workers racing on a shared cache). The key names
        every input, so both adapters are the same: whichever lands first is kept, and the other's rename
        failing onto the finished directory is not an error.
        """
        folder = self.path(key)
        if (folder / REPORT_NAME).is_file():
            return
        try:
            save_personalized(weights, folder, model_name, {**report, "key": key})
        except (OSError, AdapterError):
            if not (folder / REPORT_NAME).is_file():
                raise
