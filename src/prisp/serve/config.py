"""Typed, validated configuration of the serving process."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from prisp.data.tasks import get_task, normalize_task_name
from prisp.errors import PrispError
from prisp.hypernet.checkpoint import shipped_checkpoint
from prisp.models import DEFAULT_MODEL
from prisp.personalize import PersonalizeConfig


@dataclass(frozen=True)
class ServeLimits:
    """Request limits; anything above them is refused with 413 or 422 and a message naming the limit.

    Attributes:
        max_body_bytes: Largest request body (413 above it).
        max_items: Most history items per personalize/update request.
        max_text_chars: Longest string anywhere in an item (ids and fields).
        max_input_chars: Longest ``input`` of a generate request.
        max_new_tokens: Cap on the answer length (the task's own budget is used below it).
        max_pending_jobs: Most queued or running jobs in the whole process (429 above it).
        max_jobs_per_hour: Most personalize/update jobs one user may start in any hour (429 + Retry-After).
        max_adapters: Most tasks one user may hold an adapter for (429 for a new task above it).
    """

    max_body_bytes: int = 1_000_000
    max_items: int = 200
    max_text_chars: int = 20_000
    max_input_chars: int = 20_000
    max_new_tokens: int = 64
    max_pending_jobs: int = 32
    max_jobs_per_hour: int = 30
    max_adapters: int = 16

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrispError(f"serve limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``prisp serve`` needs besides the store key.

    Anchors (Stage 1 adapters, one per task) come from three places, merged in this order, later wins:
    ``random_anchors`` (a seeded random-init LoRA for every task: B = 0, so it serves the base model
    itself; for trials and tests), ``anchors_dir`` (one peft sub-directory per task, named like
    ``LaMP-4``), and ``anchors`` (explicit ``task -> directory``). Only tasks with an anchor are served.
    With none of them, every task (the LaMP tasks and ``task_files``) gets its anchor *from text*: the
    hypernetwork (``hypernet``, default: the one shipped for the model) turns the task's description into
    a LoRA, once; the result is cached under ``$PRISP_HOME/anchors``.

    Attributes:
        store: Store directory (created on first start).
        model: Base model name or directory (see ``prisp models``).
        host, port: Where uvicorn listens; keep 127.0.0.1 unless a TLS proxy sits in front.
        anchors: ``task -> peft adapter directory``.
        task_files: custom task spec files (``docs/tasks.md``) served besides the LaMP tasks; each needs an
            anchor like any task (``--anchor NAME=DIR``).
        anchors_dir: Directory holding one anchor per task.
        random_anchors: Serve every task from a random-init anchor when no other anchor names it.
        hypernet: The hypernetwork checkpoint for anchors from text (default: the one shipped for ``model``).
        admin_token_hash: SHA-256 (hex) of the admin token, which alone creates, lists and deletes any user.
        open_registration: Let anyone who reaches the port create users (no admin token needed).
        job_timeout_s: A personalization job running longer is reported failed and the queue moves on.
        personalize: Stage 2 options used by jobs (strategy, k, lr ...); ``progress`` is forced off.
        cache_size: Decrypted adapters kept in memory (LRU, keyed by user and version).
        threads: torch CPU threads (None: leave torch's default).
        limits: Request limits.
        batch_window_ms: How long a generate request waits for others to share its batched forward
            (0: batch only what is already queued).
        max_batch: Most generate requests in one batched forward.
        adapter_slots: User adapters kept loaded in the serving model (LRU); at least ``max_batch``,
            since every distinct adapter of a batch needs its own slot.
    """

    store: Path
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    anchors: dict[str, Path] = field(default_factory=dict)
    task_files: tuple[Path, ...] = ()
    anchors_dir: Path | None = None
    random_anchors: bool = False
    hypernet: Path | None = None
    admin_token_hash: str | None = None
    open_registration: bool = False
    job_timeout_s: float = 1800.0
    personalize: PersonalizeConfig = field(default_factory=lambda: PersonalizeConfig(progress=False))
    cache_size: int = 64
    threads: int | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    batch_window_ms: float = 10.0
    max_batch: int = 8
    adapter_slots: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        for path in self.task_files:  # registered first: the anchors may name these tasks
            get_task(str(path))
        canonical = {normalize_task_name(task): Path(path) for task, path in self.anchors.items()}
        object.__setattr__(self, "anchors", canonical)
        if not 0 < self.port < 65536:
            raise PrispError(f"--port must be in 1..65535, got {self.port}")
        if self.cache_size < 1:
            raise PrispError(f"--cache-size must be at least 1, got {self.cache_size}")
        if self.threads is not None and self.threads < 1:
            raise PrispError(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise PrispError(f"--batch-window-ms must be in 0..1000, got {self.batch_window_ms}")
        if not 1 <= self.max_batch <= 256:
            raise PrispError(f"--max-batch must be in 1..256, got {self.max_batch}")
        if self.adapter_slots > 1024:
            raise PrispError(f"--adapter-slots must be at most 1024, got {self.adapter_slots}")
        if self.adapter_slots < self.max_batch:
            raise PrispError(f"--adapter-slots must be at least --max-batch ({self.max_batch}): each adapter "
                             f"of a batch needs its own slot; got {self.adapter_slots}")
        if self.anchors_dir is not None and not Path(self.anchors_dir).is_dir():
            raise PrispError(f"--anchors-dir {self.anchors_dir} is not a directory")
        if self.hypernet is not None and not self.text_anchors:
            raise PrispError("--hypernet generates anchors from text, which applies only without --anchor, "
                             "--anchors-dir and --random-anchors")
        if self.text_anchors and self.hypernet is None and shipped_checkpoint(self.model) is None:
            raise PrispError(f"no anchors given and no hypernetwork is shipped for model {self.model!r} to make "
                             "them from text: pass --hypernet PATH, --anchor TASK=DIR, --anchors-dir DIR or "
                             "--random-anchors")
        if not 1 <= self.job_timeout_s <= 86400:
            raise PrispError(f"--job-timeout-s must be in 1..86400, got {self.job_timeout_s}")
        if self.admin_token_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", self.admin_token_hash):
            raise PrispError("admin_token_hash must be 64 lowercase hex digits (SHA-256)")
        if self.admin_token_hash is None and not self.open_registration:
            raise PrispError("no admin credentials, so nobody could create users: set PRISP_ADMIN_TOKEN or "
                             "--admin-token-file FILE (`prisp serve admin-token --out FILE`), or pass "
                             "--open-registration to let anyone who reaches the port create users")
        if self.personalize.progress:
            # Jobs run in a background thread of a server: a progress bar there would only garble the log.
            object.__setattr__(self, "personalize", replace(self.personalize, progress=False))

    @property
    def text_anchors(self) -> bool:
        """No anchor option given: every task's anchor comes from its description (see the class docstring)."""
        return not (self.anchors or self.anchors_dir or self.random_anchors)


def parse_anchor_option(text: str) -> tuple[str, Path]:
    """Parse one ``--anchor TASK=DIR`` value.

    Raises:
        PrispError: No ``=``, an unknown task, or an empty directory part.
    """
    task, sep, path = text.partition("=")
    if not sep or not task.strip() or not path.strip():
        raise PrispError(f"--anchor expects TASK=DIR (e.g. LaMP-4=anchors/lamp4), got {text!r}")
    return normalize_task_name(task.strip()), Path(path.strip())
