"""Adapters as in-memory safetensors bytes (the files they are sealed into are written by ``prisp.files``).

The plaintext of a sealed adapter is one safetensors document: peft-named LoRA tensors plus the LoRA
spec in its string metadata. It is built and parsed in memory only (never pickle, never a plaintext
temporary file), so decrypted weights touch the disk nowhere.
"""

from __future__ import annotations

import json
import struct

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prisp.adapters import LoraSpec, LoraWeights
from prisp.errors import AdapterError

_SPEC_KEY = "prisp.lora_spec"


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
