"""Reading and writing standard peft LoRA adapter directories.

An adapter directory is ``adapter_config.json`` + ``adapter_model.safetensors``, exactly
what ``PeftModel.save_pretrained`` writes, so peft, vLLM and LoRAX load it without prisp.
Writes are atomic and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prisp.adapters.config import LoraSpec
from prisp.adapters.weights import LoraWeights
from prisp.errors import AdapterError
from prisp.files import fsync_tree, swap_into_place

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Options whose non-default values change what the weights mean; we refuse rather than misread.
_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False}


def save_adapter(weights: LoraWeights, out_dir: str | os.PathLike, base_model_name: str,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write ``weights`` as a peft adapter directory, atomically.

    Everything is written into a temporary sibling directory which then takes ``out_dir``'s
    place, so a crash leaves either the old directory or the new one, never a mix.

    Args:
        weights: The adapter to write.
        out_dir: Target directory; an existing adapter directory there is replaced.
        base_model_name: Recorded as ``base_model_name_or_path``.
        extra_files: ``{file name: text}`` written beside the adapter inside the same atomic swap
            (e.g. ``personalization.json``), so readers never see an adapter without its report.

    Returns:
        The adapter directory.

    Raises:
        AdapterError: ``out_dir`` exists but is not an adapter directory.
    """
    out = Path(os.path.abspath(out_dir))  # "." or "x/" would have no usable name
    if out.exists() and not _replaceable(out):
        raise AdapterError(f"refusing to overwrite {out}: it exists and is not an empty or adapter directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weights.spec.to_peft_config(base_model_name).save_pretrained(str(tmp))
        # Contiguous copies: safetensors refuses views, and callers keep their tensors.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in weights.to_peft_state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        fsync_tree(tmp)
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replaceable(out: Path) -> bool:
    """Only an empty directory or a previous adapter may be replaced wholesale."""
    return out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_NAME).is_file())


def load_adapter(adapter_dir: str | os.PathLike) -> LoraWeights:
    """Read a peft LoRA adapter directory.

    Raises:
        AdapterError: Missing files, a non-LoRA or unsupported config, or corrupt weights.
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    spec = read_spec(path / CONFIG_NAME)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = [n for n in _PICKLE_NAMES if (path / n).exists()]
        hint = f" (found {pickled[0]}; pickled weights are never loaded)" if pickled else ""
        raise AdapterError(f"adapter {path} has no {WEIGHTS_NAME}{hint}")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter weights {weights_file} are corrupt: {exc}") from None
    weights = LoraWeights.from_peft_state_dict(state, spec)
    if not weights.pairs:
        raise AdapterError(f"adapter weights {weights_file} hold no LoRA tensors")
    return weights


def read_spec(config_file: Path) -> LoraSpec:
    """Build a LoraSpec from a peft ``adapter_config.json``."""
    if not config_file.is_file():
        raise AdapterError(f"adapter {config_file.parent} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{config_file} is not a LoRA adapter (peft_type {kind!r})")
    for option, default in _UNSUPPORTED.items():
        if config.get(option) not in (default, None):
            raise AdapterError(f"{config_file}: option {option}={config[option]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_file}: option bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise AdapterError(f"{config_file}: target_modules must be a list of module names, got {targets!r}")
    try:
        return LoraSpec(
            r=int(config["r"]),
            alpha=config["lora_alpha"],
            dropout=float(config.get("lora_dropout", 0.0)),
            # peft also accepts suffixes such as "self_attn.q_proj"; we key by the short name.
            target_modules=tuple(sorted({t.rsplit(".", 1)[-1] for t in targets})),
            use_rslora=bool(config.get("use_rslora", False)),
        )
    except KeyError as exc:
        raise AdapterError(f"{config_file} lacks {exc.args[0]}") from None
