"""Hypernetwork checkpoints: ``hypernet.safetensors`` (weights) + ``hypernet.json`` (everything else).

The JSON holds the network config, the base model it was trained for, the description encoder, the
exact training command, the training data's sha256, metrics and, for runs in progress, the resume state.
A run in progress also writes the training loop's state (:class:`prisp.training.TrainState`) so a resume
is exact: AdamW's moments per parameter and the dropout RNG in ``train_state.safetensors``, the step
positions (the loop's step, AdamW's step count per parameter) in the JSON under ``train_state``.
Checkpoints without it (older runs, exported or shipped hypernets) load as before.
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

from prisp.errors import AdapterError
from prisp.files import fsync_tree, swap_into_place
from prisp.hypernet.encoders import ENCODER_NAMES
from prisp.hypernet.model import HyperNet, HyperNetConfig
from prisp.training import TrainState

WEIGHTS_FILE = "hypernet.safetensors"
META_FILE = "hypernet.json"
TRAIN_STATE_FILE = "train_state.safetensors"
_OWN_KEYS = ("format", "base_model", "encoder", "config", "train_state")  # written from the fields, not meta
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
        train_state: The training loop's state over ``hypernet.parameters()`` (runs in progress), or
            None (not saved, or not asked for when loading).
    """

    hypernet: HyperNet
    base_model: str
    encoder: str
    meta: dict = field(default_factory=dict)
    train_state: TrainState | None = None

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
        **{k: v for k, v in checkpoint.meta.items() if k not in _OWN_KEYS},
    }
    state = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint.hypernet.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "prisp": FORMAT})
        files = [tmp / WEIGHTS_FILE, tmp / META_FILE]
        if checkpoint.train_state is not None:
            tensors, meta["train_state"] = _train_state_parts(checkpoint.train_state, _param_names(checkpoint.hypernet))
            save_file(tensors, str(tmp / TRAIN_STATE_FILE), metadata={"format": "pt", "prisp": FORMAT})
            files.append(tmp / TRAIN_STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        # mkdtemp makes a private directory; a checkpoint (possibly shipped in a package) should be readable.
        for file in files:
            file.chmod(0o644)
        tmp.chmod(0o755)
        fsync_tree(tmp)
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


def load_checkpoint(path: str | os.PathLike, shapes: dict | None = None, *,
                    with_train_state: bool = False) -> HyperNetCheckpoint:
    """Load a checkpoint (eval mode), optionally checking it fits a base model.

    Args:
        path: Checkpoint directory (or a run directory holding ``checkpoint/``).
        shapes: The base model's ``(layer, module) -> (in, out)`` (``shapes_for_model``/``shapes_for_config``).
        with_train_state: Also read the training loop's state, when the checkpoint has one (to resume).

    Raises:
        AdapterError: Unreadable files, or a config that does not match ``shapes`` (one line).
    """
    path = resolve_checkpoint_dir(path)
    meta = read_meta(path)
    config = HyperNetConfig.from_dict(meta["config"])
    if shapes is not None:
        check_fits(config, shapes, where=str(path))
    weights_file = path / WEIGHTS_FILE
    state = _read_tensors(weights_file, f"hypernet checkpoint {path} has no {WEIGHTS_FILE}", "hypernet weights")
    hypernet = HyperNet(config)
    expected = hypernet.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise AdapterError(f"hypernet weights {weights_file} do not match its config (first: {bad[0]})")
    with torch.no_grad():
        hypernet.load_state_dict(state, strict=True)
    hypernet.eval()
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    train_state = None
    if with_train_state and "train_state" in meta:
        train_state = _read_train_state(path / TRAIN_STATE_FILE, meta["train_state"], hypernet)
    return HyperNetCheckpoint(hypernet=hypernet, base_model=meta["base_model"], encoder=meta["encoder"], meta=extra,
                              train_state=train_state)


def _param_names(hypernet: HyperNet) -> list[str]:
    """Names of ``hypernet.parameters()``, in that order (the order ``TrainState.optimizer`` follows)."""
    return [name for name, _ in hypernet.named_parameters()]


def _train_state_parts(state: TrainState, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors for safetensors, JSON scalars)``: moments as ``optimizer/<key>/<param>``, RNG as ``rng/<device>``."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for name, moments in zip(names, state.optimizer or [], strict=state.optimizer is not None):
        for key, value in moments.items():
            if key == "step":
                steps[name] = float(value)  # AdamW's count: an integer-valued scalar, exact in JSON
            else:
                tensors[f"optimizer/{key}/{name}"] = value
    for device, value in (("cpu", state.rng), ("cuda", state.cuda_rng)):
        if value is not None:
            tensors[f"rng/{device}"] = value
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    scalars = {"step": state.step, "optimizer": None if state.optimizer is None else "AdamW", "param_steps": steps}
    return tensors, scalars


def _read_tensors(file: Path, missing: str, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; one-line ``AdapterError`` (``missing``, or ``what`` is corrupt) otherwise."""
    if not file.is_file():
        raise AdapterError(missing)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{what} {file} is corrupt: {exc}") from None


def _read_train_state(file: Path, scalars: dict, hypernet: HyperNet) -> TrainState:
    """Inverse of :func:`_train_state_parts`, checked against the hypernet's parameters."""
    tensors = _read_tensors(file, f"hypernet checkpoint {file.parent} lists a training state but has no "
                            f"{file.name}", "training state")
    params = dict(hypernet.named_parameters())
    moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind != "optimizer":
            continue
        slot, _, name = rest.partition("/")
        if name not in params or value.shape != params[name].shape:
            raise AdapterError(f"training state {file}: {key} does not match the hypernet's parameters")
        moments[name][slot] = value
    for name, step in scalars.get("param_steps", {}).items():
        if name not in params:
            raise AdapterError(f"training state {file}: step count for unknown parameter {name!r}")
        moments[name]["step"] = torch.tensor(float(step), dtype=torch.float32)
    optimizer = [moments[name] for name in params] if scalars.get("optimizer") else None
    return TrainState(step=int(scalars.get("step", 0)), optimizer=optimizer, rng=tensors.get("rng/cpu"),
                      cuda_rng=tensors.get("rng/cuda"))


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
