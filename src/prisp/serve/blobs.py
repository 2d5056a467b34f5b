"""Adapters as in-memory safetensors bytes, and crash-safe file writes.

The plaintext of a sealed adapter is one safetensors document: peft-named LoRA tensors plus the LoRA
spec in its string metadata. It is built and parsed in memory only (never pickle, never a plaintext
temporary file), so decrypted weights touch the disk nowhere.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prisp.adapters import LoraSpec, LoraWeights
from prisp.errors import AdapterError

_SPEC_KEY = "prisp.lora_spec"
TMP_PREFIX = ".tmp-"


def adapter_to_bytes(weights: LoraWeights) -> bytes:
    """Serialize ``weights`` (tensors and spec) as one safetensors document."""
    spec = weights.spec
    meta = {"r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout,
            "target_modules": list(spec.target_modules), "use_rslora": spec.use_rslora}
    # Contiguous CPU copies: safetensors refuses views and non-CPU tensors.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in weights.to_peft_state_dict().items()}
    return save_safetensors(state, metadata={"format": "pt", _SPEC_KEY: json.dumps(meta, sort_keys=True)})


def adapter_from_bytes(data: bytes, what: str) -> LoraWeights:
    """Parse bytes written by :func:`adapter_to_bytes`.

    Raises:
        AdapterError: Malformed safetensors, a missing or invalid spec, or non-LoRA tensors.
    """
    try:
        state = load_safetensors(data)
        meta = json.loads(_metadata(data)[_SPEC_KEY])
        spec = LoraSpec(r=int(meta["r"]), alpha=meta["alpha"], dropout=float(meta["dropout"]),
                        target_modules=tuple(meta["target_modules"]), use_rslora=bool(meta["use_rslora"]))
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{what} is not a valid adapter document: {type(exc).__name__}") from None
    return LoraWeights.from_peft_state_dict(state, spec)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors document (header: u64 little-endian length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix.

    The bytes go to a temporary sibling, are fsynced, renamed over ``path`` (atomic on POSIX), and the
    directory is fsynced so the rename itself survives a power cut. Folders it creates are private (0700).
    """
    make_private_dirs(path.parent)
    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}-{path.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents as 0700 folders (whatever the umask), each one's entry
    fsynced into its parent so a new user's folder survives a power cut with the adapter written into it."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
        fsync_dir(folder.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (renames, unlinks); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
