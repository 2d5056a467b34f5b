"""Anchor generation: task description -> one hypernetwork forward pass -> a standard peft LoRA.

:class:`Anchorer` loads the checkpoint and its description encoder once and then generates adapters in
milliseconds; :func:`generate_anchor` is the one-shot path behind ``prisp anchor``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prisp.adapters import LoraWeights, save_adapter, shapes_for_config, shapes_for_model
from prisp.errors import AdapterError, DataError
from prisp.hypernet.checkpoint import HyperNetCheckpoint, load_checkpoint, read_meta, shipped_checkpoint
from prisp.hypernet.encoders import DescriptionEncoder, make_encoder
from prisp.models import DEFAULT_MODEL


@dataclass
class AnchorResult:
    """A generated anchor and what it cost.

    Attributes:
        weights: The LoRA (A [r, in], B [out, r] per layer and module).
        encode_ms: Description embedding time.
        hypernet_ms: Hypernetwork forward (and unpacking) time.
        out_dir: Where it was written, if it was.
    """

    weights: LoraWeights
    encode_ms: float
    hypernet_ms: float
    out_dir: Path | None = None

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.hypernet_ms


def timed_generation(encoder: DescriptionEncoder, hypernet, text: str) -> AnchorResult:
    """Embed ``text`` and run ``hypernet.to_lora_weights`` on it, timing the two halves separately."""
    start = time.perf_counter()
    emb = encoder.encode([text], batch_size=1)  # [1, d]
    mid = time.perf_counter()
    weights = hypernet.to_lora_weights(emb[0])
    end = time.perf_counter()
    return AnchorResult(weights=weights, encode_ms=(mid - start) * 1e3, hypernet_ms=(end - mid) * 1e3)


def default_hypernet_path(model_name: str) -> Path:
    """The shipped checkpoint for ``model_name``.

    Raises:
        AdapterError: None is shipped for that model.
    """
    path = shipped_checkpoint(model_name)
    if path is None:
        raise AdapterError(f"no hypernetwork is shipped for model {model_name!r}; pass --hypernet PATH "
                           "(train one with `prisp hypernet train --model ...`)")
    return path


def model_shapes(model_name: str, targets: tuple[str, ...]) -> dict:
    """Target-module shapes from the model's config alone (no weights loaded)."""
    from transformers import AutoConfig

    from prisp.models import resolve_model

    source, _ = resolve_model(model_name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise AdapterError(f"cannot read the config of model {model_name!r}: {str(exc).splitlines()[0]}") from None
    config = getattr(config, "text_config", None) or config
    return shapes_for_config(config, targets)


class Anchorer:
    """A loaded hypernetwork and its description encoder, ready to generate anchors.

    Args:
        checkpoint: The hypernetwork (already checked against the base model).
        encoder: Its description encoder (the one named in the checkpoint).
        model_name: Recorded as ``base_model_name_or_path`` in written adapters.
    """

    def __init__(self, checkpoint: HyperNetCheckpoint, encoder: DescriptionEncoder, model_name: str):
        if encoder.name != checkpoint.encoder:
            raise AdapterError(f"hypernet expects the {checkpoint.encoder!r} description encoder, got {encoder.name!r}")
        if encoder.dim != checkpoint.config.embed_dim:
            raise AdapterError(f"hypernet reads {checkpoint.config.embed_dim}-d descriptions but the "
                               f"{encoder.name} encoder gives {encoder.dim}-d")
        self.checkpoint = checkpoint
        self.encoder = encoder
        self.model_name = model_name
        checkpoint.hypernet.eval()

    @classmethod
    def load(cls, hypernet: str | os.PathLike | None = None, model_name: str = DEFAULT_MODEL,
             base=None, tokenizer=None) -> Anchorer:
        """Load a checkpoint (default: the shipped one for ``model_name``) and check it fits the model.

        Args:
            hypernet: Checkpoint or run directory.
            model_name: Base model name or path (its config gives the expected shapes).
            base, tokenizer: The loaded base model, when available (needed by the ``base`` encoder).

        Raises:
            AdapterError: No checkpoint, or one that does not fit the model (one line).
        """
        path = Path(hypernet) if hypernet is not None else default_hypernet_path(model_name)
        meta = read_meta(path)
        targets = tuple(meta["config"].get("modules", {})) or ("q_proj", "v_proj")
        shapes = shapes_for_model(base, targets) if base is not None else model_shapes(model_name, targets)
        checkpoint = load_checkpoint(path, shapes=shapes)
        if checkpoint.encoder == "base" and base is None:
            from prisp.models import load_model

            loaded = load_model(model_name)
            base, tokenizer = loaded.model, loaded.tokenizer
        return cls(checkpoint, make_encoder(checkpoint.encoder, base, tokenizer), model_name)

    @torch.no_grad()
    def generate(self, description: str) -> AnchorResult:
        """The anchor LoRA for ``description`` (deterministic: same text, same bits).

        Raises:
            DataError: Empty description.
        """
        if not isinstance(description, str) or not description.strip():
            raise DataError("the task description is empty; describe the task in a sentence or two")
        return timed_generation(self.encoder, self.checkpoint.hypernet, description.strip())

    def write(self, description: str, out_dir: str | os.PathLike) -> AnchorResult:
        """Generate and write the anchor as a peft adapter directory."""
        result = self.generate(description)
        result.out_dir = save_adapter(result.weights, out_dir, base_model_name=self.model_name)
        return result


def generate_anchor(description: str, out_dir: str | os.PathLike, hypernet: str | os.PathLike | None = None,
                    model_name: str = DEFAULT_MODEL) -> AnchorResult:
    """One-shot: load, generate, write. The description is checked before anything is loaded.

    Raises:
        DataError: Empty description.
        AdapterError: Missing or mismatched hypernetwork.
    """
    if not description or not description.strip():
        raise DataError("the task description is empty; describe the task in a sentence or two")
    anchorer = Anchorer.load(hypernet, model_name)
    anchorer.generate(description)  # warm-up: first calls pay one-time allocation costs
    return anchorer.write(description, out_dir)
