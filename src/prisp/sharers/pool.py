"""The sharer pool: LoRAs trained on other users' histories, which Per-Pcs and PriME compose for a target
user.

Each sharer LoRA is trained with the Stage-2 loop (``prisp.personalize.personalize``, OPPU strategy: the task-
adapted anchor merged into the base, a fresh LoRA trained on the sharer's items with Table 7's "Sharer PEFT"
schedule) and saved as a standard peft adapter (anchor and sharer LoRA stacked, relative to the unmodified
base). Trained adapters are cached by content, so a resumed benchmark never retrains a sharer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prisp.adapters import LoraWeights
from prisp.data.lamp import ProfileItem
from prisp.data.protocol import recent_items
from prisp.errors import DataError
from prisp.personalize import PersonalizeConfig, personalize
from prisp.personalize.cache import AdapterCache, personalization_key
from prisp.personalize.hyperparams import SHARER_PEFT_TABLE7, table7_row
from prisp.personalize.per_user import UserCost
from prisp.sharers.merge import split_stack
from prisp.sharers.similarity import HistoryEmbedder, cluster_representatives, rank_by_similarity


@dataclass(frozen=True)
class SharerConfig:
    """How the sharer pool is chosen and trained (None: Table 7 "Sharer PEFT" for the task).

    Attributes:
        pool_size: sharers trained (chosen by clustering the candidates' mean history embeddings).
        candidates: sharer users considered for the pool (a seeded random subset when there are more).
        items: most recent history items each sharer trains on (0: the whole history).
        epochs, batch_size, lr: the sharer's training schedule.
        micro_batch_size, max_length: memory bounds of the training loop (same update).
        seed: seeds the candidate subset, the clustering and training.
    """

    pool_size: int = 8
    candidates: int | None = 200
    items: int = 10
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    micro_batch_size: int = 4
    max_length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise DataError(f"sharer pool_size must be at least 1, got {self.pool_size}")
        if self.candidates is not None and self.candidates < self.pool_size:
            raise DataError(
                f"sharer candidates ({self.candidates}) must be at least pool_size ({self.pool_size})"
            )
        if self.items < 0:
            raise DataError(f"sharer items must be >= 0, got {self.items}")

    def personalize_config(self, task: str, n_items: int) -> PersonalizeConfig:
        table = table7_row(SHARER_PEFT_TABLE7, task)
        return PersonalizeConfig(
            strategy="oppu",
            k=self.items or max(1, n_items),
            epochs=self.epochs or table.epochs,
            batch_size=self.batch_size or table.batch_size,
            lr=self.lr if self.lr is not None else table.lr,
            micro_batch_size=self.micro_batch_size,
            max_length=self.max_length,
            seed=self.seed,
            progress=False,
        )


@dataclass
class Sharer:
    """One trained sharer.

    Attributes:
        weights: the full adapter (anchor stacked with the sharer's LoRA), relative to the base model.
        delta: the sharer's own LoRA, which applies on top of the anchor.
        embedding: unit mean history embedding ``[d]``.
        cost: the sharer's training cost (as recorded when it was trained, also when read from the cache).
        gate: Per-Pcs gate features ``[L, d]``, filled in by Per-Pcs on first use.
        gate_seconds: time spent computing ``gate``.
    """

    user: str
    weights: LoraWeights
    delta: LoraWeights
    embedding: Tensor
    items: list[ProfileItem]
    cost: UserCost
    gate: Tensor | None = None
    gate_seconds: float = 0.0


@dataclass
class SharerPool:
    """The trained sharers of one task, all built on the same anchor."""

    task: str
    anchor: LoraWeights
    sharers: list[Sharer]
    key: str  # names the pool's content (anchor, config, sharer adapters) for caches built on it
    candidates: int = 0
    details: dict = field(default_factory=dict)
    labels: tuple[str, ...] = ()  # the pool task's label set its sharers were trained with

    def nearest(self, embedding: Tensor, n: int | None = None) -> list[tuple[Sharer, float]]:
        """The ``n`` sharers most similar to ``embedding`` (all when None), most similar first."""
        ranked = rank_by_similarity(embedding, [s.embedding for s in self.sharers])
        return [(self.sharers[i], sim) for i, sim in ranked[: n or len(ranked)]]

    @property
    def training_seconds(self) -> float:
        return sum(s.cost.seconds for s in self.sharers)


def choose_sharers(
    task: str,
    candidates: Mapping[str, Sequence[ProfileItem]],
    config: SharerConfig,
    embedder: HistoryEmbedder,
) -> list[tuple[str, list[ProfileItem], Tensor]]:
    """The pool: a seeded subset of candidates, embedded, then one representative per k-means cluster."""
    users = sorted(u for u, items in candidates.items() if items)
    if not users:
        raise DataError(f"{task}: no sharer candidates with a history")
    if config.candidates is not None and len(users) > config.candidates:
        users = sorted(random.Random(config.seed).sample(users, config.candidates))
    items = {u: recent_items(candidates[u], config.items or len(candidates[u])) for u in users}
    embeddings = [embedder.embed(task, items[u]) for u in users]
    chosen = cluster_representatives(torch.stack(embeddings), config.pool_size, config.seed)
    return [(users[i], items[users[i]], embeddings[i]) for i in chosen]


def train_sharer(
    base,
    tokenizer,
    model_name: str,
    task: str,
    user: str,
    history: Sequence[ProfileItem],
    anchor: LoraWeights,
    config: SharerConfig,
    labels: Sequence[str],
    cache_dir: Path | None,
) -> tuple[LoraWeights, UserCost]:
    """One sharer's full adapter (anchor + sharer LoRA) and its training cost; cached under ``cache_dir``."""
    p_config = config.personalize_config(task, len(history))
    items = recent_items(history, p_config.k)
    cache = AdapterCache(cache_dir, prefix="sharer-") if cache_dir else None
    key = personalization_key(model_name, anchor, p_config, task, items, labels)
    hit = cache.get(key) if cache else None
    if hit is not None:
        weights, report = hit
        return weights, UserCost(user, True, report["seconds"], report["peak_memory_mb"], report["trainable_params"])
    result = personalize(base, tokenizer, anchor, task, history, p_config, labels)
    report = {**result.report(), "user": user, "role": "sharer", "anchor_rank": anchor.spec.r}
    if cache:
        cache.put(key, result.weights, model_name, report)
    cost = UserCost(
        user, False, result.train.seconds, report["peak_memory_mb"], result.train.trainable_params
    )
    return result.weights, cost


def build_pool(
    base,
    tokenizer,
    model_name: str,
    task: str,
    anchor: LoraWeights,
    candidates: Mapping[str, Sequence[ProfileItem]],
    labels: Sequence[str] = (),
    config: SharerConfig = SharerConfig(),
    embedder: HistoryEmbedder | None = None,
    cache_dir: Path | None = None,
    on_sharer: Callable[[Sharer], None] | None = None,
) -> SharerPool:
    """Choose and train (or load) the sharer pool of ``task`` from the ``candidates``' histories.

    Raises:
        DataError: no candidate has a history.
    """
    embedder = embedder or HistoryEmbedder()
    start = time.perf_counter()
    chosen = choose_sharers(task, candidates, config, embedder)
    selection_seconds = time.perf_counter() - start
    sharers = []
    for user, items, embedding in chosen:
        weights, cost = train_sharer(
            base, tokenizer, model_name, task, user, candidates[user], anchor, config, labels, cache_dir
        )
        _, delta = split_stack(weights, anchor.spec.r)
        sharers.append(Sharer(user, weights, delta, embedding, items, cost))
        if on_sharer:
            on_sharer(sharers[-1])
    # The pool's name covers the anchor, the training schedule and every member's items.
    key = personalization_key(
        model_name, anchor, config.personalize_config(task, 1), task, [i for s in sharers for i in s.items]
    )
    details = {"pool_size": len(sharers), "encoder": embedder.name, "selection_seconds": selection_seconds}
    return SharerPool(task, anchor, sharers, key, len(candidates), details, tuple(labels))
