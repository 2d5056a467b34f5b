"""Per-task anchors held by the server, and the LRU cache of decrypted user adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from prisp.adapters import CONFIG_NAME, LoraSpec, LoraWeights, load_adapter, random_init, save_adapter
from prisp.data.tasks import TASKS, get_task, normalize_task_name
from prisp.errors import AdapterError, DataError
from prisp.serve.config import ServeConfig

logger = logging.getLogger(__name__)
CacheKey = tuple[str, str, int]  # (user id, task, adapter version)


def load_anchors(config: ServeConfig, model: nn.Module, tokenizer=None,
                 model_name: str | None = None) -> dict[str, LoraWeights]:
    """``task -> anchor`` from the config's sources (random, then ``anchors_dir``, then ``anchors``), or, when
    it names none, from every task's description (:func:`text_anchors`).

    Raises:
        AdapterError: An anchor directory is unreadable or does not fit ``model`` (names the task), or no
            hypernetwork for anchors from text.
        DataError: A sub-directory of ``anchors_dir`` holding an adapter is not named after a task.
    """
    if config.text_anchors:
        return text_anchors(config, model, tokenizer, model_name or config.model)
    sources: dict[str, Path | None] = {}
    if config.random_anchors:
        sources.update({task: None for task in TASKS})
    if config.anchors_dir is not None:
        sources.update(_anchors_in_dir(Path(config.anchors_dir)))
    sources.update(config.anchors)
    anchors: dict[str, LoraWeights] = {}
    random = random_init(model, LoraSpec(), seed=0) if None in sources.values() else None
    for task, path in sorted(sources.items()):
        weights = random if path is None else _read_anchor(task, path)
        try:
            weights.check_fits(model)
        except AdapterError as exc:
            raise AdapterError(f"anchor for {task} ({path or 'random'}): {exc}") from None
        anchors[task] = weights
    return anchors


def text_anchors(config: ServeConfig, model: nn.Module, tokenizer, model_name: str) -> dict[str, LoraWeights]:
    """Every task's anchor generated from its description by the hypernetwork, once: each is cached as a peft
    directory under ``$PRISP_HOME/anchors/<key>``, the key naming the checkpoint's bytes and the description."""
    from prisp.hypernet.anchor import Anchorer, default_hypernet_path
    from prisp.hypernet.checkpoint import resolve_checkpoint_dir
    from prisp.models import prisp_home

    checkpoint = Path(config.hypernet) if config.hypernet is not None else default_hypernet_path(model_name)
    specs = [*TASKS.values(), *(get_task(str(path)) for path in config.task_files)]
    digest = _checkpoint_digest(resolve_checkpoint_dir(checkpoint))
    anchors, anchorer, made = {}, None, []
    for spec in specs:
        key = hashlib.sha256(json.dumps([digest, spec.description]).encode()).hexdigest()[:24]
        cached = prisp_home() / "anchors" / key
        if (cached / CONFIG_NAME).is_file():
            weights = _read_anchor(spec.name, cached)
        else:
            anchorer = anchorer or Anchorer.load(checkpoint, model_name, base=model, tokenizer=tokenizer)
            weights = anchorer.generate(spec.description).weights
            save_adapter(weights, cached, base_model_name=model_name)
            made.append(spec.name)
        try:
            weights.check_fits(model)
        except AdapterError as exc:
            raise AdapterError(f"anchor for {spec.name} (from text, {checkpoint}): {exc}") from None
        anchors[spec.name] = weights
    logger.info("anchors from text: every task's description through the hypernetwork %s (%d generated now, "
                "%d from the cache under %s)", checkpoint, len(made), len(specs) - len(made),
                prisp_home() / "anchors")
    return anchors


def _checkpoint_digest(checkpoint: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(checkpoint).iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _anchors_in_dir(root: Path) -> dict[str, Path]:
    found = {}
    for sub in sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file()):
        try:
            found[normalize_task_name(sub.name)] = sub
        except DataError:
            raise DataError(f"anchors dir {root}: sub-directory {sub.name!r} holds an adapter but is not "
                            "named after a task (e.g. LaMP-4)") from None
    return found


def _read_anchor(task: str, path: Path) -> LoraWeights:
    try:
        return load_adapter(path)
    except AdapterError as exc:
        raise AdapterError(f"anchor for {task}: {exc}") from None


class AdapterCache:
    """Decrypted adapters by (user, task, version), least recently used evicted first. Thread-safe.

    Keying by version means an update can never serve a stale adapter: the new version is a new key,
    and the old one is dropped explicitly (and would age out anyway).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[CacheKey, LoraWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> LoraWeights | None:
        """The cached adapter (now most recently used), or None."""
        with self._lock:
            weights = self._items.get(key)
            if weights is not None:
                self._items.move_to_end(key)
            return weights

    def put(self, key: CacheKey, weights: LoraWeights) -> None:
        """Insert, evicting the least recently used entries above capacity."""
        with self._lock:
            self._items[key] = weights
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop_user(self, user_id: str, task: str | None = None) -> int:
        """Remove a user's entries (of one task, or all); returns how many."""
        with self._lock:
            doomed = [k for k in self._items if k[0] == user_id and (task is None or k[1] == task)]
            for key in doomed:
                del self._items[key]
            return len(doomed)

    def keys(self) -> list[CacheKey]:
        """Current keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
