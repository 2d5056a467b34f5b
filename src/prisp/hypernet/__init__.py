"""Stage 1: the Text-to-LoRA hypernetwork (task description -> anchor LoRA).

Exports are imported lazily so that ``prisp.hypernet.cli`` (imported by the CLI at start-up) stays free
of torch/transformers until a command runs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "HyperNet": "prisp.hypernet.model",
    "HyperNetConfig": "prisp.hypernet.model",
    "DescriptionEncoder": "prisp.hypernet.encoders",
    "MiniLMEncoder": "prisp.hypernet.encoders",
    "BaseModelEncoder": "prisp.hypernet.encoders",
    "make_encoder": "prisp.hypernet.encoders",
    "SniData": "prisp.hypernet.data",
    "SniTask": "prisp.hypernet.data",
    "load_sni": "prisp.hypernet.data",
    "BatchedLora": "prisp.hypernet.injection",
    "HyperNetCheckpoint": "prisp.hypernet.checkpoint",
    "load_checkpoint": "prisp.hypernet.checkpoint",
    "save_checkpoint": "prisp.hypernet.checkpoint",
    "shipped_checkpoint": "prisp.hypernet.checkpoint",
    "HyperTrainConfig": "prisp.hypernet.recipe",
    "train_hypernet": "prisp.hypernet.recipe",
    "Anchorer": "prisp.hypernet.anchor",
    "AnchorResult": "prisp.hypernet.anchor",
    "generate_anchor": "prisp.hypernet.anchor",
    "T2LAnchorer": "prisp.hypernet.t2l_import",
    "T2LCheckpoint": "prisp.hypernet.t2l_import",
    "load_t2l": "prisp.hypernet.t2l_import",
}

__all__ = [
    "AnchorResult",
    "Anchorer",
    "BaseModelEncoder",
    "BatchedLora",
    "DescriptionEncoder",
    "HyperNet",
    "HyperNetCheckpoint",
    "HyperNetConfig",
    "HyperTrainConfig",
    "MiniLMEncoder",
    "SniData",
    "SniTask",
    "T2LAnchorer",
    "T2LCheckpoint",
    "generate_anchor",
    "load_checkpoint",
    "load_sni",
    "load_t2l",
    "make_encoder",
    "save_checkpoint",
    "shipped_checkpoint",
    "train_hypernet",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prisp.hypernet' has no attribute {name!r}")
