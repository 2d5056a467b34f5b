"""What the HTTP API does, without HTTP: users, authorization, jobs, generation, deletion.

Every method that touches a user's data first checks the bearer token against *that* user's stored
hash, so one user's token can never reach another user's adapter, job or account.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from prisp.adapters import LoraWeights
from prisp.data.lamp import ProfileItem, parse_profile
from prisp.data.prompts import query_prompt
from prisp.data.tasks import get_task, label_set, normalize_task_name
from prisp.errors import PrispError
from prisp.faults import crash_point
from prisp.models import LoadedModel, load_model
from prisp.personalize import get_strategy, personalize
from prisp.predict import decode_mode
from prisp.serve.auth import IssuedToken, hash_token, issue_token, token_matches, valid_user_id
from prisp.serve.config import ServeConfig
from prisp.serve.engine import ServingModel
from prisp.serve.jobs import Job, JobQueue
from prisp.serve.keys import SealError, StoreKey
from prisp.serve.registry import AdapterCache, load_anchors
from prisp.serve.store import AdapterRecord, AdapterStore, SaveRequest

logger = logging.getLogger(__name__)
JOB_RECORD_DAYS = 7  # finished jobs' records are kept this long (GET /v1/jobs/{id} answers until then)
INTERRUPTED = "interrupted: the server stopped while this job was queued or running; start it again"


class ServeError(PrispError):
    """A request the server refuses; ``status`` is the HTTP status it maps to."""

    status = 422


class Unauthorized(ServeError):
    status = 401


class Forbidden(ServeError):
    status = 403


class NotFound(ServeError):
    status = 404


class Conflict(ServeError):
    status = 409


class PayloadTooLarge(ServeError):
    status = 413


class TooManyRequests(ServeError):
    """Over a quota; ``retry_after`` (seconds) when waiting helps, sent as the Retry-After header."""

    status = 429

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PrispService:
    """The serving process's state: store, anchors, cache, model and job queue."""

    def __init__(self, config: ServeConfig, key: StoreKey, loaded: LoadedModel | None = None):
        """Open the store, load the base model (unless given) and the anchors.

        Raises:
            PrispError: Wrong key, store in use, unloadable model or anchors (one line each).
        """
        self.config = config
        self.limits = config.limits
        self.store = AdapterStore(config.store, key)
        try:
            loaded = loaded or load_model(config.model)
            self.model_name = loaded.name
            self.anchors = load_anchors(config, loaded.model, loaded.tokenizer, loaded.name)
        except BaseException:
            self.store.close()
            raise
        self.engine = ServingModel(loaded.model, loaded.tokenizer, batch_window_ms=config.batch_window_ms,
                                   max_batch=config.max_batch, adapter_slots=config.adapter_slots)
        self.cache = AdapterCache(config.cache_size)
        uncovered = [task for task in self.anchors if not _has_schedule(config, task)]
        if uncovered:
            logger.warning("--schedule %s has no Stage-2 row for %s: personalize/update requests for them will "
                           "be refused", config.personalize.schedule, ", ".join(uncovered))
        interrupted = self.store.fail_unfinished_jobs(INTERRUPTED)
        if interrupted:
            logger.warning("%d job(s) were queued or running when the server last stopped: now failed", interrupted)
        self.store.prune_jobs(time.time() - JOB_RECORD_DAYS * 86400)
        history = [Job(**record) for record in self.store.job_records()]
        self.jobs = JobQueue(config.limits.max_pending_jobs, journal=self.store.save_job,
                             timeout_s=config.job_timeout_s, history=history)
        # Guards "which version is current" together with the cache, so a deletion or a new version can
        # never race a request into caching a stale or deleted adapter.
        self._adapters_lock = threading.RLock()
        # Bumped by every deletion; a job started before one discards its result instead of resurrecting data.
        self._erasures: dict[str, int] = {}
        # Start times of each user's jobs within the last hour (the hourly quota; in memory, reset by a restart).
        self._job_times: dict[str, deque[float]] = {}
        self._quota_lock = threading.Lock()

    def close(self) -> None:
        """Stop the job worker (waits for a running job) and the batcher, then close the store."""
        self.jobs.shutdown()
        self.engine.close()
        self.store.close()

    # ---- users and tokens ----------------------------------------------------------------------

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and self.config.admin_token_hash is not None and \
            token_matches(self.config.admin_token_hash, token)

    def require_admin(self, token: str | None, action: str) -> None:
        """Raises Unauthorized (no token, unknown token) or Forbidden (a user's token) unless ``token`` is the
        admin's."""
        if self.is_admin(token):
            return
        if not token:
            raise Unauthorized(f"{action} needs the admin token (send 'Authorization: Bearer <admin token>')")
        if self.store.user_for_token_hash(hash_token(token)) is not None:
            raise Forbidden(f"{action} needs the admin token; a user's token cannot")
        raise Unauthorized("invalid bearer token")

    def create_user(self, token: str | None = None) -> IssuedToken:
        """A new user with a fresh token (the token itself is never stored); admin only unless the server runs
        with open registration."""
        if not self.config.open_registration:
            self.require_admin(token, "creating users")
        issued = issue_token()
        self.store.create_user(issued.user_id, issued.token_hash)
        return issued

    def whoami(self, token: str | None) -> tuple[str | None, bool]:
        """``(user_id, False)`` for a user's token, ``(None, True)`` for the admin token."""
        if self.is_admin(token):
            return None, True
        return self.authenticate(token), False

    def list_users(self, token: str | None) -> list[dict]:
        """Every user with their adapters' tasks, versions and sizes (admin only; never tokens or user data)."""
        self.require_admin(token, "listing users")
        listing = []
        for user_id, created_at in self.store.users():
            adapters = [{"task": r.task, "version": r.version, "size_bytes": self.store.size_of(r),
                         "updated_at": r.updated_at} for r in self.store.adapters(user_id)]
            listing.append({"user_id": user_id, "created_at": created_at, "adapters": adapters})
        return listing

    def authorize(self, user_id: str, token: str | None, admin: bool = False) -> None:
        """Allow only ``user_id``'s own token (and the admin token where ``admin``).

        Raises:
            Unauthorized: No token, or a token that belongs to nobody.
            Forbidden: A valid token of another user (also when ``user_id`` does not exist).
        """
        if not token:
            raise Unauthorized("missing bearer token (send 'Authorization: Bearer <token>')")
        if admin and self.is_admin(token):
            if not (valid_user_id(user_id) and self.store.user_exists(user_id)):
                raise NotFound(f"unknown user {user_id!r}")
            return
        stored = self.store.token_hash(user_id) if valid_user_id(user_id) else None
        if token_matches(stored, token):
            return
        if self.store.user_for_token_hash(hash_token(token)) is None:
            raise Unauthorized("invalid bearer token")
        raise Forbidden("this token does not grant access to that user")

    def authenticate(self, token: str | None) -> str:
        """The user a token belongs to.

        Raises:
            Unauthorized: No token or an unknown one.
        """
        if not token:
            raise Unauthorized("missing bearer token (send 'Authorization: Bearer <token>')")
        user_id = self.store.user_for_token_hash(hash_token(token))
        if user_id is None:
            raise Unauthorized("invalid bearer token")
        return user_id

    # ---- validation ----------------------------------------------------------------------------

    def served_task(self, task: str) -> str:
        """The canonical task name, if this server has an anchor for it (422 otherwise)."""
        name = normalize_task_name(task)
        if name not in self.anchors:
            raise ServeError(f"this server has no anchor for {name}; served tasks: {', '.join(self.anchors)}")
        return name

    def parse_items(self, task: str, items: Sequence[dict[str, Any]]) -> tuple[ProfileItem, ...]:
        """Validate history items against the limits and the task's fields."""
        if not items:
            raise ServeError("items is empty; personalization needs at least one history item")
        if len(items) > self.limits.max_items:
            raise PayloadTooLarge(f"too many items: {len(items)} (limit {self.limits.max_items})")
        limit = self.limits.max_text_chars
        for index, item in enumerate(items):
            for name, value in item.items():
                if isinstance(value, str) and len(value) > limit:
                    raise ServeError(f"items[{index}].{name} is {len(value)} characters long (limit {limit})")
        return parse_profile(list(items), task, "items")

    # ---- jobs ----------------------------------------------------------------------------------

    def start_job(self, user_id: str, token: str | None, task: str, items: Sequence[dict[str, Any]],
                  update: bool) -> Job:
        """Queue Stage 2 for a user: from the task anchor, or (update) from their current adapter."""
        self.authorize(user_id, token)
        task = self.served_task(task)
        self.config.personalize.train_config(task)  # a task --schedule tuned does not cover: 422 now, not a failed job
        history = self.parse_items(task, items)
        continues = None
        if update and get_strategy(self.config.personalize.strategy).grows_rank:
            # OPPU, PiSSA and LoRA-GA stack a LoRA under the trained one: every update would add r to the rank.
            raise ServeError(f"update is not available under --strategy {self.config.personalize.strategy} (each "
                             "update would grow the adapter's rank); POST /v1/users/{user_id}/personalize instead")
        current = self.store.current(user_id, task)
        if update:
            if current is None:
                raise Conflict(f"no adapter for {task} yet; POST /v1/users/{{user_id}}/personalize first")
            continues = current.version
        elif current is None and len(self.store.adapters(user_id)) >= self.limits.max_adapters:
            raise TooManyRequests(f"quota: at most {self.limits.max_adapters} tasks with an adapter per user; "
                                  "DELETE /v1/users/{user_id}/adapters to free them")
        self._take_job_slot(user_id)
        erasure = self._erasures.get(user_id, 0)

        def work(cancelled: Callable[[], bool]) -> int:  # closes over this request's validated items
            return self._train(user_id, task, history, continues, erasure, cancelled)

        return self.jobs.submit(user_id, task, "update" if update else "personalize", work)

    def _take_job_slot(self, user_id: str) -> None:
        """Count one job against the user's hourly quota (a sliding hour), or refuse with the wait."""
        now = time.monotonic()
        with self._quota_lock:
            started = self._job_times.setdefault(user_id, deque())
            while started and now - started[0] >= 3600:
                started.popleft()
            if len(started) >= self.limits.max_jobs_per_hour:
                wait = max(1, math.ceil(3600 - (now - started[0])))
                raise TooManyRequests(f"quota: at most {self.limits.max_jobs_per_hour} jobs per hour per user; "
                                      f"retry in {wait} s", retry_after=wait)
            started.append(now)

    def job(self, job_id: str, token: str | None) -> Job:
        """A job's state, for its owner only."""
        owner = self.authenticate(token)
        job = self.jobs.get(job_id)
        if job is None or job.user_id != owner:  # the same answer for both: job ids are not probed for existence
            raise NotFound(f"unknown job {job_id!r}")
        return job

    def _train(self, user_id: str, task: str, history: tuple[ProfileItem, ...], continues: int | None,
               erasure: int, cancelled: Callable[[], bool] = lambda: False) -> int:
        """Run Stage 2 and save the result as the user's new version; returns that version.

        For an update, the user's current (folded) adapter is the starting point: its A stays frozen under
        the prisp strategy, B and a fresh bridge C refine it on the new items only.
        """
        crash_point("job:running")
        if continues is None:
            start = self.anchors[task]
        else:
            record = self.store.current(user_id, task)
            if record is None or record.version != continues:
                raise Conflict(f"adapter for {task} changed before the update ran; retry")
            start = self._load(record)
        result = personalize(self.engine.base, self.engine.train_tokenizer, start, task, history,
                             self.config.personalize, label_set(task))
        request = SaveRequest(user_id=user_id, task=task, base_model=self.model_name,
                              strategy=self.config.personalize.strategy, items=len(result.items),
                              continues=continues)
        with self._adapters_lock:
            if self._erasures.get(user_id, 0) != erasure:
                raise Conflict("the user's data was deleted while this job ran; its result was discarded")
            if cancelled():
                raise Conflict("the job timed out while it ran; its result was discarded")
            record = self.store.save(request, result.weights)
            self.cache.drop_user(user_id, task)  # older versions of this task can never be served again
        self.engine.forget(user_id, task)  # outside the lock: it may wait for a running batch
        return record.version

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, user_id: str, token: str | None, task: str, text: str,
                 decode: str = "auto", personal: bool = True) -> tuple[str, int | None]:
        """Answer ``text`` for a user: their adapter for the task, or the task anchor when they have none.

        ``decode``: ``labels`` ranks the task's label set by likelihood (the answer is always a label),
        ``free`` generates greedily, ``auto`` is labels on classification and rating tasks.
        """
        self.authorize(user_id, token)
        task = self.served_task(task)
        if not text.strip():
            raise ServeError("input is empty")
        if len(text) > self.limits.max_input_chars:
            raise ServeError(f"input is {len(text)} characters long (limit {self.limits.max_input_chars})")
        mode = decode_mode(task, decode)
        weights, version = self.adapter_for(user_id, task) if personal else (self.anchors[task], None)
        labels = label_set(task, [text])
        prompt = query_prompt(task, text, labels)
        owner = None if version is None else (user_id, task)  # anchors belong to nobody
        if mode == "labels":
            return self.engine.score(weights, prompt, labels, owner=owner), version
        budget = min(get_task(task).max_new_tokens, self.limits.max_new_tokens)
        return self.engine.generate(weights, prompt, budget, owner=owner,
                                    first_line=get_task(task).first_line), version

    def adapter_for(self, user_id: str, task: str) -> tuple[LoraWeights, int | None]:
        """The weights a user is served with for ``task`` and their version (None: the anchor)."""
        with self._adapters_lock:
            record = self.store.current(user_id, task)
            if record is None:
                return self.anchors[task], None
            return self._load(record), record.version

    def _load(self, record: AdapterRecord) -> LoraWeights:
        key = (record.user_id, record.task, record.version)
        with self._adapters_lock:
            weights = self.cache.get(key)
            if weights is None:
                if record.base_model != self.model_name:
                    raise SealError(f"adapter of user {record.user_id} for {record.task} was trained on "
                                    f"base model {record.base_model!r}, not {self.model_name!r}; refusing to "
                                    "serve it")
                weights = self.store.load(record)
                weights.check_fits(self.engine.base)
                self.cache.put(key, weights)
            return weights

    # ---- deletion ------------------------------------------------------------------------------

    def delete_user(self, user_id: str, token: str | None) -> int:
        """Erase a user: jobs, cache entries, adapter files and rows, and the account itself (the user's own
        token or the admin token)."""
        self.authorize(user_id, token, admin=True)
        with self._adapters_lock:
            removed = len(self.store.adapters(user_id))
            self._erasures[user_id] = self._erasures.get(user_id, 0) + 1
            self.jobs.forget_user(user_id)
            self.store.delete_user(user_id)
            self.cache.drop_user(user_id)
            with self._quota_lock:
                self._job_times.pop(user_id, None)
        self.engine.forget(user_id)  # unload them from the serving model's slots too
        logger.info("deleted user %s (%d adapters)", user_id, removed)
        return removed

    def delete_adapters(self, user_id: str, token: str | None) -> int:
        """Erase a user's adapters but keep the account; they are then served by the anchors alone."""
        self.authorize(user_id, token)
        with self._adapters_lock:
            self._erasures[user_id] = self._erasures.get(user_id, 0) + 1
            self.jobs.forget_user(user_id)
            removed = self.store.delete_adapters(user_id)
            self.cache.drop_user(user_id)
        self.engine.forget(user_id)
        return removed


def _has_schedule(config: ServeConfig, task: str) -> bool:
    try:
        config.personalize.train_config(task)
    except PrispError:
        return False
    return True
