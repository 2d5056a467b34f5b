"""One base model for every user: concurrent requests share one batched forward with per-row adapters.

Why batch across users: at the default model's size (135M parameters) one CPU forward pass over 8 rows
costs far less than 8 forward passes of one row (a single row leaves the matrix kernels mostly idle
and pays the Python and dispatch overhead of 30 layers for every token), so answering concurrent
requests together raises throughput instead of only queueing them behind one lock. Measured once on
the shared 2-core machine, 1 torch thread, SmolLM2-135M: 8 LaMP-4 requests of 4 users with random
adapters took 31 s one at a time and 7.8 s as one batch, with identical answers.

How: ``generate`` puts the request on a queue and waits. One batcher thread takes the first waiting
request, waits up to ``batch_window_ms`` for more (or until ``max_batch`` are there), places each
distinct adapter of the batch in its own peft adapter slot (:mod:`prisp.serve.slots`, a bounded LRU
pool) and runs one greedy generation with peft's mixed-adapter batches (``adapter_names``: row i goes
through slot i's LoRA only). Decoding is :func:`prisp.generation.generate` itself, the same code the
unbatched path and the benchmarks use: left padding with an attention mask, each row cut to its own
``max_new_tokens``, first line kept. Label answers (``decode: labels``) ride in the same batches: each is
scored by :func:`prisp.scoring.score_labels` through its own slot (``adapter_name``), after the batch's
generation, so only the batcher thread ever touches the model.

Isolation: a row's LoRA delta is computed from its own slot only (peft gathers the rows of each adapter
and adds that adapter's ``B A x`` to them alone), slots are matched by the identity of the adapter object
(never recycled while a slot holds it), and only the batcher thread touches the model, under a lock.

Equality with the unbatched answer: greedy decoding is causal and padded positions are masked, so a
row's tokens do not depend on the other rows; the logits can differ from a batch-1 run by float
rounding (different kernel blocking), which changes an answer only at an exact near-tie of the top two
logits, exactly as for the batched predictions of ``prisp eval``.

Memory: the serving model is a structural copy of the base that *shares* its (frozen) weight tensors,
so peft's in-place injection never touches the pristine base that Stage 2 jobs copy from; each slot
adds one adapter's A and B (1.8 MiB for r 8 on q/v of the default model).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from torch import nn

from prisp.adapters import LoraWeights
from prisp.errors import PrispError
from prisp.generation import GenerationConfig, clean_output, generate
from prisp.scoring import score_labels
from prisp.serve.slots import AdapterSlots, Owner

__all__ = ["BatchStats", "ServingModel"]


@dataclass(frozen=True)
class BatchStats:
    """Counters of the batcher since the start.

    Attributes:
        batches: Batched generations run.
        requests: Requests answered in them (failed ones included).
        largest: Most requests in one batch.
        adapter_loads: Adapters copied into a slot (slot-pool misses).
    """

    batches: int = 0
    requests: int = 0
    largest: int = 0
    adapter_loads: int = 0

    @property
    def mean_batch(self) -> float:
        """Mean requests per batch (0 before the first)."""
        return self.requests / self.batches if self.batches else 0.0


@dataclass
class _Request:
    weights: LoraWeights
    prompt: str
    max_new_tokens: int
    owner: Owner | None
    labels: tuple[str, ...] = ()  # non-empty: answer by scoring these labels instead of generating
    first_line: bool = True  # False: a long-form task's answer keeps every line
    answer: Future = field(default_factory=Future)


_STOP = object()  # queue sentinel: the batcher exits


class ServingModel:
    """The base model plus a pool of peft LoRA slots; thread-safe, batching concurrent requests.

    Attributes:
        base: The pristine base model (never modified here; Stage 2 copies it).
        tokenizer: Used for generation, by the batcher thread only.
        train_tokenizer: A private copy for background jobs (fast tokenizers are not safe to share
            across threads while one of them changes truncation settings).
        batch_window_ms: How long the batcher waits for companions of a request (0: take what is queued).
        max_batch: Most requests in one batched generation.
    """

    def __init__(self, base: nn.Module, tokenizer, batch_window_ms: float = 10.0, max_batch: int = 8,
                 adapter_slots: int = 32):
        """Set up the engine; the batcher thread starts with the first request.

        Raises:
            PrispError: A negative window, ``max_batch`` below 1, or fewer slots than ``max_batch``
                (a batch of distinct users needs one slot each).
        """
        if not batch_window_ms >= 0:  # also refuses NaN
            raise PrispError(f"--batch-window-ms must be at least 0, got {batch_window_ms}")
        if max_batch < 1:
            raise PrispError(f"--max-batch must be at least 1, got {max_batch}")
        if adapter_slots < max_batch:
            raise PrispError(f"--adapter-slots ({adapter_slots}) must be at least --max-batch ({max_batch})")
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.train_tokenizer = copy.deepcopy(tokenizer)
        self.batch_window_ms = batch_window_ms
        self.max_batch = max_batch
        self.slots = AdapterSlots(self.base, adapter_slots)
        self._queue: queue.Queue = queue.Queue()
        self._model_lock = threading.Lock()  # held while the model or the slots are used or changed
        self._state_lock = threading.Lock()  # guards the thread's start/stop and the counters
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = BatchStats()

    def generate(self, weights: LoraWeights, prompt: str, max_new_tokens: int,
                 owner: Owner | None = None, first_line: bool = True) -> str:
        """Answer ``prompt`` with ``weights`` applied on the base model (greedy; the first line unless
        ``first_line`` is False).

        Blocks until the batch holding this request is done.

        Args:
            weights: The adapter; the same object for the same adapter (slots match by identity).
            prompt: The raw prompt (the chat template is applied here).
            max_new_tokens: This request's answer budget.
            owner: ``(user id, task)`` of a user's own adapter, so :meth:`forget` can unload it.

        Raises:
            AdapterError: ``weights`` do not fit the base model.
            PrispError: The engine is shut down, or ``max_new_tokens`` is below 1.
        """
        if max_new_tokens < 1:
            raise PrispError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return self._submit(_Request(weights, prompt, max_new_tokens, owner, first_line=first_line))

    def score(self, weights: LoraWeights, prompt: str, labels: tuple[str, ...], owner: Owner | None = None) -> str:
        """The label of ``labels`` most likely as the answer to ``prompt`` under ``weights`` (``decode: labels``).

        Queued and batched with generation requests; same arguments and errors as :meth:`generate`, and
        ``labels`` must not be empty.
        """
        if not labels:
            raise PrispError("label scoring needs a label set; this task has none")
        return self._submit(_Request(weights, prompt, 1, owner, tuple(labels)))

    def _submit(self, request: _Request) -> str:
        with self._state_lock:
            if self._closed:
                raise PrispError("the serving model is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prisp-batcher", daemon=True)
                self._thread.start()
            self._queue.put(request)
        return request.answer.result()

    def stats(self) -> BatchStats:
        """A snapshot of the batch counters."""
        with self._state_lock:
            return self._stats

    def forget(self, user_id: str, task: str | None = None) -> int:
        """Unload a user's adapters (of one task, or all) from the slots; waits for a running batch.

        A request that fetched the adapter before a deletion and is still queued loads it once more;
        it then ages out of the pool like any other.
        """
        with self._model_lock:
            return self.slots.forget(user_id, task)

    def place(self, weights: LoraWeights, owner: Owner | None = None) -> str:
        """Load ``weights`` into a slot now, as a batch would (for measuring the swap cost); its slot name."""
        with self._model_lock:
            return self.slots.place(weights, set(), owner)

    def close(self) -> None:
        """Finish the queued requests, then stop the batcher thread; later requests are refused."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join()

    # ---- the batcher thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._serve(batch)
            if stop:
                return

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` plus whatever arrives within the window, up to ``max_batch``; True if told to stop."""
        batch = [first]
        deadline = time.monotonic() + self.batch_window_ms / 1000
        while len(batch) < self.max_batch:
            try:
                # Already queued requests (piled up during the previous batch) are taken without waiting.
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _serve(self, batch: list[_Request]) -> None:
        """Run one batched generation; every request's future gets its answer or its error."""
        with self._model_lock:
            pinned: set[str] = set()
            ready, names = [], []
            for request in batch:
                try:  # one unfit adapter fails its own request only
                    names.append(self.slots.place(request.weights, pinned, request.owner))
                    ready.append(request)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting request thread
                    request.answer.set_exception(exc)
            if ready:
                try:
                    texts = self._decode(ready, names)
                except Exception as exc:  # noqa: BLE001 - the batcher must survive; callers see the error
                    for request in ready:
                        request.answer.set_exception(exc)
                else:
                    for request, text in zip(ready, texts):
                        request.answer.set_result(text)
            loads = self.slots.loads
        with self._state_lock:
            s = self._stats
            self._stats = BatchStats(batches=s.batches + 1, requests=s.requests + len(batch),
                                     largest=max(s.largest, len(batch)), adapter_loads=loads)

    def _decode(self, batch: list[_Request], names: list[str]) -> list[str]:
        texts: list[str | None] = [None] * len(batch)
        free = [i for i, r in enumerate(batch) if not r.labels]
        if free:
            # Whole texts from the batch; each request then keeps its first line or not (tasks share batches).
            config = GenerationConfig(max_new_tokens=max(batch[i].max_new_tokens for i in free),
                                      batch_size=len(free), first_line=False)
            result = generate(self.slots.model, self.tokenizer, [batch[i].prompt for i in free], config,
                              adapter_names=[names[i] for i in free], budgets=[batch[i].max_new_tokens for i in free])
            for i, text in zip(free, result.texts):
                texts[i] = clean_output(text, batch[i].first_line)
        for i, request in enumerate(batch):
            if request.labels:
                texts[i] = score_labels(self.slots.model, self.tokenizer, [request.prompt], request.labels,
                                        adapter_name=names[i]).choices[0]
        return texts
