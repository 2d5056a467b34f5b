"""Export a batch store for vLLM multi-LoRA serving.

Layout written to ``OUT``::

    OUT/<user_id>/adapter_config.json         plain peft LoRA (bridge already folded: B' = B C)
    OUT/<user_id>/adapter_model.safetensors
    OUT/lora_modules.txt                      one "name=path" per line, for ``vllm serve --lora-modules``
    OUT/lora_modules.json                     the same as vLLM's JSON form ({"name", "path", "base_model_name"})

``OUT`` itself is a LoRA resolver directory: vLLM's filesystem resolver looks for ``OUT/<name>/``
and accepts it only when ``base_model_name_or_path`` equals the served model name, which is why the
exporter rewrites that field to ``base_model_name``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from prisp.adapters import load_adapter, save_adapter
from prisp.batch.sink import AdapterSource
from prisp.errors import DataError
from prisp.files import write_atomic

MODULES_TXT = "lora_modules.txt"
MODULES_JSON = "lora_modules.json"


@dataclass
class ExportResult:
    """What :func:`export_vllm` wrote.

    Attributes:
        out: the export directory (also a LoRA resolver directory).
        names: the adapter names, i.e. what a request passes as ``model``.
        base_model_name: the served model name written into every adapter config.
        max_rank: the largest LoRA rank (vLLM's ``--max-lora-rank`` must be at least this).
    """

    out: Path
    names: list[str] = field(default_factory=list)
    base_model_name: str = ""
    max_rank: int = 0


def export_vllm(source: AdapterSource, out: str | os.PathLike, base_model_name: str | None = None,
                users: list[str] | None = None) -> ExportResult:
    """Write every finished user of ``source`` as a vLLM-loadable adapter under ``out``.

    Args:
        source: a store (e.g. :class:`prisp.batch.DirectoryStore`).
        out: export directory; existing adapters of the same users are replaced atomically.
        base_model_name: the name vLLM serves the base model under (``--served-model-name``);
            default: the model name recorded when the adapters were made.
        users: export only these users (default: all finished users).

    Raises:
        DataError: the store holds no finished adapter (or lacks a requested user).
    """
    names = users if users is not None else source.user_ids()
    if not names:
        raise DataError("the adapter store holds no finished users to export")
    out = Path(out).resolve()
    result = ExportResult(out)
    for user_id in names:
        stored = source.get(user_id)
        result.base_model_name = base_model_name or stored.base_model_name
        target = save_adapter(stored.weights, out / user_id, result.base_model_name)
        load_adapter(target)  # read back: never hand vLLM an adapter prisp itself cannot parse
        result.names.append(user_id)
        result.max_rank = max(result.max_rank, stored.weights.spec.r)
    _write_manifests(result)
    return result


def _write_manifests(result: ExportResult) -> None:
    """``lora_modules.txt`` and ``lora_modules.json`` listing every exported adapter."""
    entries = [{"name": name, "path": str(result.out / name), "base_model_name": result.base_model_name}
               for name in result.names]
    write_atomic(result.out / MODULES_TXT, "".join(f"{e['name']}={e['path']}\n" for e in entries))
    write_atomic(result.out / MODULES_JSON, json.dumps(entries, indent=1) + "\n")
