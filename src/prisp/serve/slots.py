"""A bounded pool of peft LoRA adapter slots on one serving copy of the base model.

Each distinct user adapter in a batch needs its own peft adapter (peft's mixed-adapter batches route
every row through the adapter named for it), so the pool loads adapters into named slots and keeps
them there, least recently used evicted first, up to ``capacity`` slots. A slot is created with the
adapter's spec (rank, alpha, rsLoRA, targets fix peft's scaling and layer set); a slot whose spec no
longer fits is deleted and a new one added, so adapters of different specs coexist.

Which adapter a slot holds is tracked by object identity of the :class:`LoraWeights`, not by user id:
the serving cache hands out one object per (user, task, version) and a new version is a new object,
so identity can never confuse two users or two versions. The slot keeps a strong reference to the
object it holds, so its ``id`` cannot be recycled for another adapter while the slot claims it.
Served ``LoraWeights`` must therefore not be modified in place (nothing in prisp does).

Not thread-safe: :class:`prisp.serve.engine.ServingModel` calls it under its model lock.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from prisp.adapters import LoraWeights, parse_module_name, shared_copy
from prisp.errors import AdapterError

SlotKey = tuple[int, float, bool, tuple[str, ...]]  # what fixes peft's scaling and layer set
SlotIndex = dict[tuple[int, str], tuple[nn.Linear, nn.Linear]]  # (layer, module) -> (lora_A, lora_B)
Owner = tuple[str, str]  # (user id, task) of a user's own adapter; anchors have none


def slot_key(weights: LoraWeights) -> SlotKey:
    """The part of an adapter's spec that a peft slot is built for (dropout is off at inference)."""
    spec = weights.spec
    return (spec.r, float(spec.alpha), spec.use_rslora, tuple(sorted(spec.target_modules)))


@dataclass
class Slot:
    """One peft adapter of the serving model.

    Attributes:
        name: The peft adapter name (``slot<n>``; never reused, so a stale name cannot alias a new slot).
        key: The spec it was created for.
        weights: The adapter it holds now (None: empty or failed mid-copy, never matched).
        index: Its LoRA modules, for copying A and B in.
        owner: Whose adapter it holds, so a deletion can unload it (None: an anchor, or empty).
    """

    name: str
    key: SlotKey
    weights: LoraWeights | None
    index: SlotIndex
    owner: Owner | None = None


class AdapterSlots:
    """Up to ``capacity`` user adapters loaded as named peft adapters on a shared copy of the base.

    Attributes:
        base: The pristine base model (adapters are checked against it; never modified).
        model: The peft model (None until the first adapter arrives: its spec is needed to build it).
        capacity: Most slots kept.
        loads: Adapters copied into a slot so far (misses; a hit costs nothing).
    """

    def __init__(self, base: nn.Module, capacity: int):
        if capacity < 1:
            raise ValueError(f"AdapterSlots capacity must be at least 1, got {capacity}")
        self.base = base
        self.capacity = capacity
        self.model: nn.Module | None = None
        self.loads = 0
        self._slots: OrderedDict[str, Slot] = OrderedDict()  # least recently used first
        self._holding: dict[int, Slot] = {}  # id(weights) -> the slot holding that very object
        self._names = (f"slot{i}" for i in itertools.count())

    def place(self, weights: LoraWeights, pinned: set[str], owner: Owner | None = None) -> str:
        """The name of a slot holding ``weights``, loading them (and evicting) if needed.

        Args:
            weights: The adapter a request is served with.
            pinned: Slots the batch being assembled already uses; never evicted. The chosen slot is added.
            owner: ``(user id, task)`` when ``weights`` are a user's own adapter.

        Raises:
            AdapterError: ``weights`` do not fit the base model, or every slot is pinned.
        """
        slot = self._holding.get(id(weights))
        if slot is None or slot.weights is not weights:
            weights.check_fits(self.base)
            slot = self._load(weights, pinned, owner)
        self._slots.move_to_end(slot.name)
        pinned.add(slot.name)
        return slot.name

    def forget(self, user_id: str, task: str | None = None) -> int:
        """Empty the slots holding a user's adapters (of one task, or all); returns how many.

        The slots' A and B are zeroed, so a deleted user's values do not linger in the model either.
        """
        doomed = [s for s in self._slots.values()
                  if s.owner is not None and s.owner[0] == user_id and (task is None or s.owner[1] == task)]
        for slot in doomed:
            self._empty(slot)
            _zero(slot.index)
        return len(doomed)

    def holds(self, weights: LoraWeights) -> bool:
        """Whether some slot holds this very adapter object now."""
        slot = self._holding.get(id(weights))
        return slot is not None and slot.weights is weights

    def owners(self) -> list[Owner]:
        """Whose adapters the slots hold now, least recently used first (anchors are nobody's)."""
        return [s.owner for s in self._slots.values() if s.owner is not None]

    def __len__(self) -> int:
        return len(self._slots)

    # ---- internals -----------------------------------------------------------------------------

    def _load(self, weights: LoraWeights, pinned: set[str], owner: Owner | None) -> Slot:
        """Copy ``weights`` into a slot and return it.

        Preference: a slot of their spec that is empty or holds the same owner's older copy (decrypted
        again, or a previous version); else a new slot while there is room; else the least recently used.
        """
        key = slot_key(weights)
        free = [s for s in self._slots.values() if s.name not in pinned]
        slot = next((s for s in free if s.key == key and (s.weights is None or
                                                          (owner is not None and s.owner == owner))), None)
        if slot is None and len(self._slots) >= self.capacity:
            if not free:
                raise AdapterError(f"all {self.capacity} adapter slots are in use by one batch; use at "
                                   "least as many slots as the largest batch")
            victim = next((s for s in free if s.weights is None), free[0])  # an empty slot, else the LRU one
            if victim.key == key:
                slot = victim
            else:
                slot = self._add_slot(weights)
                self._drop(victim)  # after adding: peft keeps at least one adapter at all times
        elif slot is None:
            slot = self._add_slot(weights)
        self._empty(slot)  # until the copy completes: a half-copied slot must never match
        _copy_into(slot.index, weights)
        slot.weights, slot.owner = weights, owner
        self._holding[id(weights)] = slot
        self.loads += 1
        return slot

    def _add_slot(self, weights: LoraWeights) -> Slot:
        name = next(self._names)
        config = weights.spec.to_peft_config()
        with warnings.catch_warnings():
            # peft warns about adding adapters to a model in eval mode, and (0.21 with transformers 5)
            # about a deprecated transformers method it calls itself.
            warnings.simplefilter("ignore")
            if self.model is None:
                # peft injects in place: a structural copy sharing the base's tensors keeps the base pristine
                self.model = get_peft_model(shared_copy(self.base), config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        self.model.eval()  # peft leaves new LoRA layers in train mode (dropout)
        slot = Slot(name, slot_key(weights), None, _build_index(self.model, name))
        self._slots[name] = slot
        return slot

    def _empty(self, slot: Slot) -> None:
        if slot.weights is not None:
            self._holding.pop(id(slot.weights), None)
        slot.weights = slot.owner = None

    def _drop(self, slot: Slot) -> None:
        self._empty(slot)
        del self._slots[slot.name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.delete_adapter(slot.name)


def _build_index(peft_model: nn.Module, name: str) -> SlotIndex:
    index: SlotIndex = {}
    for qualified, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            site = parse_module_name(qualified)
            if site is not None:
                index[(site.layer, site.name)] = (module.lora_A[name], module.lora_B[name])
    return index


@torch.no_grad()
def _copy_into(index: SlotIndex, weights: LoraWeights) -> None:
    if index.keys() != weights.pairs.keys():
        raise AdapterError(f"adapter modules {sorted(weights.pairs)[:2]}... do not match the serving slot")
    for key, pair in weights.pairs.items():
        lora_A, lora_B = index[key]
        lora_A.weight.copy_(pair.A)  # [r, in]
        lora_B.weight.copy_(pair.B)  # [out, r]


@torch.no_grad()
def _zero(index: SlotIndex) -> None:
    for lora_A, lora_B in index.values():
        lora_A.weight.zero_()
        lora_B.weight.zero_()
