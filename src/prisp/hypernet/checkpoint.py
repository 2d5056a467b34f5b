"""Hypernetwork checkpoints: ``hypernet.safetensors`` (weights) + ``hypernet.json`` (everything else).

The JSON holds the network config, the base model it was trained for, the description encoder, the
exact training command, the training data's sha256, metrics and, for runs in progress, the resume state.
Nothing is ever unpickled. Writes are atomic: a temporary sibling directory takes the target's place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prisp.adapters.io import swap_into_place
from prisp.errors import AdapterError
from prisp.hypernet.encoders import ENCODER_NAMES
from prisp.hypernet.model import HyperNet, HyperNetConfig

WEIGHTS_FILE = "hypernet.safetensors"
META_FILE = "hypernet.json"
FORMAT = "prisp-hypernet/1"
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


@dataclass
class HyperNetCheckpoint:
    """A loaded (or to-be-saved) hypernetwork with its metadata.

    Attributes:
        hypernet: The network (eval mode after loading).
        base_model: Name of the base model it emits LoRAs for (e.g. ``smollm2-135m``).
        encoder: Description encoder name (``minilm`` or ``base``).
        meta: Free-form JSON: training_command, data_sha256, metrics, state ...
    """

    hypernet: HyperNet
    base_model: str
    encoder: str
    meta: dict = field(default_factory=dict)

    @property
    def config(self) -> HyperNetConfig:
        return self.hypernet.config


def shipped_checkpoint(model_name: str) -> Path | None:
    """The checkpoint shipped in the package for ``model_name``, or None."""
    path = SHIPPED_DIR / model_name
    return path if (path / META_FILE).is_file() else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or a training run directory holding ``checkpoint/``."""
    path = Path(path)
    if not (path / META_FILE).is_file() and (path / "checkpoint" / META_FILE).is_file():
        return path / "checkpoint"
    return path


def save_checkpoint(checkpoint: HyperNetCheckpoint, out_dir: str | os.PathLike) -> Path:
    """Write the checkpoint atomically into ``out_dir`` (replacing a previous checkpoint there).

    Raises:
        AdapterError: ``out_dir`` exists and is neither empty nor a hypernet checkpoint.
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / META_FILE).is_file())):
        raise AdapterError(f"refusing to overwrite {out}: it exists and is not an empty or hypernet checkpoint dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "base_model": checkpoint.base_model,
        "encoder": checkpoint.encoder,
        "config": checkpoint.config.to_dict(),
        "num_parameters": checkpoint.hypernet.num_parameters(),
        **{k: v for k, v in checkpoint.meta.items() if k not in ("format", "base_model", "encoder", "config")},
    }
    state = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint.hypernet.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "prisp": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        # mkdtemp makes a private directory; a checkpoint (possibly shipped in a package) should be readable.
        for file in (tmp / WEIGHTS_FILE, tmp / META_FILE):
            file.chmod(0o644)
        tmp.chmod(0o755)
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint, validated.

    Raises:
        AdapterError: Missing, not JSON, or not a prisp hypernet checkpoint.
    """
    path = resolve_checkpoint_dir(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise AdapterError(f"{path} is not a hypernet checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{meta_file} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterError(f"{meta_file} is not a {FORMAT} checkpoint (format {found!r})")
    for key in ("base_model", "encoder", "config"):
        if key not in meta:
            raise AdapterError(f"{meta_file} lacks {key!r}")
    if meta["encoder"] not in ENCODER_NAMES:
        raise AdapterError(f"{meta_file}: unknown description encoder {meta['encoder']!r}")
    return meta


def load_checkpoint(path: str | os.PathLike, shapes: dict | None = None) -> HyperNetCheckpoint:
    """Load a checkpoint (eval mode), optionally checking it fits a base model.

    Args:
        path: Checkpoint directory (or a run directory holding ``checkpoint/``).
        shapes: The base model's ``(layer, module) -> (in, out)`` (``shapes_for_model``/``shapes_for_config``).

    Raises:
        AdapterError: Unreadable files, or a config that does not match ``shapes`` (one line).
    """
    path = resolve_checkpoint_dir(path)
    meta = read_meta(path)
    config = HyperNetConfig.from_dict(meta["config"])
    if shapes is not None:
        check_fits(config, shapes, where=str(path))
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterError(f"hypernet checkpoint {path} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"hypernet weights {weights_file} are corrupt: {exc}") from None
    hypernet = HyperNet(config)
    expected = hypernet.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise AdapterError(f"hypernet weights {weights_file} do not match its config (first: {bad[0]})")
    with torch.no_grad():
        hypernet.load_state_dict(state, strict=True)
    hypernet.eval()
    extra = {k: v for k, v in meta.items() if k not in ("format", "base_model", "encoder", "config")}
    return HyperNetCheckpoint(hypernet=hypernet, base_model=meta["base_model"], encoder=meta["encoder"], meta=extra)


def check_fits(config: HyperNetConfig, shapes: dict, where: str = "hypernet") -> None:
    """Refuse a hypernet whose layer count or module shapes differ from the base model's.

    Raises:
        AdapterError: One line naming the first difference.
    """
    wanted = {name for _, name in shapes}
    layers = len({layer for layer, _ in shapes})
    if layers != config.num_layers:
        raise AdapterError(f"{where} was made for {config.num_layers} layers but the base model has {layers}")
    for name, shape in config.modules.items():
        have = {tuple(s) for (_, n), s in shapes.items() if n == name}
        if not have:
            raise AdapterError(f"{where} emits {name} but the base model has no {name} (has {sorted(wanted)})")
        if have != {tuple(shape)}:
            raise AdapterError(f"{where} emits {name} as (in, out) {tuple(shape)} but the base model's is "
                               f"{min(have)}")
