"""One task's shared resources for a benchmark run, each built on first use and cached on disk where costly.

Target users, labels, the task-adapted anchor(s), the PRISP anchor, PAG profiles and the sharer pool are
computed only if a pending grid cell needs them, so a resumed run whose rows are done loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import cached_property
from pathlib import Path

from tqdm.auto import tqdm

from prisp.adapters import attach_lora, shared_copy
from prisp.bench.anchors import ANCHOR_PROVIDERS, Anchor, AnchorProvider, AnchorRequest, task_adapted_anchor
from prisp.bench.config import BenchConfig
from prisp.bench.descriptions import Description, description
from prisp.bench.pool import UserPool
from prisp.data.lamp import LampSplit, load_task_split
from prisp.data.tasks import get_task, label_set
from prisp.profiles import ProfileStore, UserProfile, query_profiles, split_profiles
from prisp.sharers import HistoryEmbedder, SharerPool, build_pool


class TaskContext:
    """Lazily built inputs of one task of a benchmark run."""

    def __init__(
        self,
        config: BenchConfig,
        task: str,
        loaded,
        embedder: HistoryEmbedder,
        prisp_anchor: AnchorProvider | None = None,
        contexts: dict[str, TaskContext] | None = None,
    ):
        self.config = config
        self.task = task
        self.loaded = loaded
        self.embedder = embedder
        self.provider = prisp_anchor or ANCHOR_PROVIDERS[config.prisp_anchor]
        self.cache = Path(config.out) / "cache" / task
        self._targets: dict[int | None, LampSplit] = {}
        self._profiles: dict[str, UserProfile] = {}
        self._anchors: dict[bool, Anchor] = {}
        self._described: dict[str, tuple[Description, Anchor]] = {}
        # The run's contexts by task, shared, so a task's pool is built once however many cells reuse it; a
        # context registers itself here.
        self.contexts = contexts if contexts is not None else {}
        self.contexts.setdefault(task, self)
        # The worker pool personal cells run their users on (``--workers`` > 1), started and stopped by
        # the runner around the task's cells; None: in this process.
        self.user_pool: UserPool | None = None

    def progress_bar(self, total: int, desc: str):
        """A per-user progress bar (stderr; off with ``progress=False``)."""
        return tqdm(
            total=total,
            desc=desc,
            unit="user",
            leave=False,
            file=sys.stderr,
            disable=not self.config.progress,
        )

    @cached_property
    def split(self) -> LampSplit:
        return load_task_split(self.config.data, self.task, self.config.split)

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return label_set(self.task, self.split.inputs)

    def targets(self, users: int | None) -> LampSplit:
        """The first ``users`` target users of the split (file order, so every method sees the same users)."""
        if users not in self._targets:
            chosen = list(self.split.users.items())[:users] if users else list(self.split.users.items())
            queries = [q for _, qs in chosen for q in qs]
            self._targets[users] = LampSplit(self.split.task, self.split.split, queries, users=dict(chosen))
        return self._targets[users]

    def source(self, task: str) -> TaskContext:
        """Another task's context of the same run (built on first use): Figure 7 reuses its sharer pool."""
        return self.contexts.get(task) or TaskContext(self.config, task, self.loaded, self.embedder, self.provider,
                                                      self.contexts)

    def task_anchor(self, with_sharer_data: bool = False) -> Anchor:
        """The task-adapted anchor; under the full protocol non-sharer methods also see the sharers' data."""
        pooled = with_sharer_data and self.config.protocol_spec.pool_sharer_data
        if pooled not in self._anchors:
            queries = list(load_task_split(self.config.data, self.task, self.config.train_split).queries)
            if pooled:
                queries += load_task_split(self.config.data, self.task, self.config.sharer_split).queries
            # The cache name covers everything the anchor depends on, so another model or schedule retrains.
            c = self.config
            payload = [c.model, c.samples, c.task_epochs, c.max_length, c.seed, sorted(q.id for q in queries)]
            digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]
            name = f"{c.protocol}-{'pooled' if pooled else 'task'}-{digest}"
            self._anchors[pooled] = task_adapted_anchor(
                self.loaded.model,
                self.loaded.tokenizer,
                self.config.model,
                self.task,
                queries,
                self.config.samples,
                self.config.task_epochs,
                self.config.max_length,
                self.config.seed,
                self.labels,
                self.cache / "anchors" / name,
            )
        return self._anchors[pooled]

    @cached_property
    def prisp_anchor(self) -> Anchor:
        request = AnchorRequest(
            self.loaded.model,
            self.loaded.tokenizer,
            self.config.model,
            self.task,
            self.config.hypernet,
            lambda: self.task_anchor(with_sharer_data=False),
        )
        return self.provider(request)

    def described_anchor(self, kind: str) -> tuple[Description, Anchor]:
        """Figure 8: the ``kind`` wording of the task's description and the PRISP anchor generated from it."""
        if kind not in self._described:
            sni_tasks = encoder = None
            if kind == "imprecise" and "imprecise" not in dict(get_task(self.task).alt_descriptions):
                from prisp.data.locations import default_sni_file
                from prisp.hypernet.anchor import Anchorer
                from prisp.hypernet.data import load_sni

                sni_tasks = load_sni(self.config.sni or default_sni_file()).tasks
                encoder = Anchorer.load(self.config.hypernet, self.config.model, self.loaded.model,
                                        self.loaded.tokenizer).encoder  # the hypernetwork's own encoder
            wording = description(self.task, kind, sni_tasks, encoder)
            request = AnchorRequest(self.loaded.model, self.loaded.tokenizer, self.config.model, self.task,
                                    self.config.hypernet, lambda: self.task_anchor(with_sharer_data=False),
                                    description=wording.text)
            self._described[kind] = (wording, self.provider(request))
        return self._described[kind]

    def anchor_for(self, kind: str) -> Anchor:
        """The PRISP anchor from the reference description (``""``) or another wording."""
        return self.described_anchor(kind)[1] if kind else self.prisp_anchor

    @cached_property
    def prompt_model(self):
        """The task-adapted model the prompt-only baselines answer with."""
        return attach_lora(
            shared_copy(self.loaded.model), self.task_anchor(with_sharer_data=True).weights
        ).eval()

    def release_prompt_model(self) -> None:
        """Drop the prompt baselines' model copy (rebuilt if asked for again)."""
        self.__dict__.pop("prompt_model", None)

    def profiles(self, split: LampSplit) -> tuple[dict[str, str], float]:
        """``{query id: profile text}`` for ``split`` and the mean generation seconds per user."""
        missing = {u: qs for u, qs in split.users.items() if u not in self._profiles}
        if missing:
            todo = LampSplit(
                split.task, split.split, [q for qs in missing.values() for q in qs], users=missing
            )
            with self.progress_bar(len(missing), f"{self.task} PAG profiles") as bar:
                self._profiles.update(
                    split_profiles(
                        self.loaded.model,
                        self.loaded.tokenizer,
                        self.config.model,
                        todo,
                        self.config.profiles,
                        ProfileStore.default(),
                        on_user=lambda _: bar.update(),
                    )
                )
        mine = {u: self._profiles[u] for u in split.users}
        seconds = sum(p.seconds for p in mine.values()) / max(1, len(mine))
        return query_profiles(split, mine), seconds

    @cached_property
    def pool(self) -> SharerPool:
        """The task's sharer pool, trained from the task-adapted anchor (without sharer data in it)."""
        sharers = load_task_split(self.config.data, self.task, self.config.sharer_split)
        candidates = {user: queries[0].profile for user, queries in sharers.users.items()}
        anchor = self.task_anchor(with_sharer_data=False)
        with self.progress_bar(
            min(self.config.sharer.pool_size, len(candidates)), f"{self.task} sharer pool"
        ) as bar:
            return build_pool(
                self.loaded.model,
                self.loaded.tokenizer,
                self.config.model,
                self.task,
                anchor.weights,
                candidates,
                self.labels,
                self.config.sharer,
                self.embedder,
                self.cache / "sharers",
                on_sharer=lambda _: bar.update(),
            )
