"""One base model for every user: adapters are copied into a peft slot per request, under one lock.

Why a lock and not batching across users: on CPU one forward pass already uses every torch thread,
so serving two users at once would not be faster, and mixing adapters inside one batch needs
multi-LoRA kernels (vLLM / punica); for that, export the folded adapters (``prisp serve export``).
The lock makes "copy this user's A and B into the slot, then generate" atomic, so concurrent
requests of different users can never see each other's weights.

Memory: the serving model is a structural copy of the base that *shares* its (frozen) weight tensors,
so peft's in-place injection never touches the pristine base that Stage 2 jobs deep-copy.
"""

from __future__ import annotations

import copy
import itertools
import threading
import warnings

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from prisp.adapters import LoraWeights, attach_lora, parse_module_name
from prisp.errors import AdapterError
from prisp.generation import GenerationConfig, generate

SlotKey = tuple[int, float, bool, tuple[str, ...]]  # what fixes peft's scaling and layer set


def _slot_key(weights: LoraWeights) -> SlotKey:
    spec = weights.spec
    return (spec.r, float(spec.alpha), spec.use_rslora, tuple(sorted(spec.target_modules)))


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class ServingModel:
    """The base model plus one peft LoRA slot per adapter spec; thread-safe generation.

    Attributes:
        base: The pristine base model (never modified here; Stage 2 copies it).
        tokenizer: Used for generation, under the lock.
        train_tokenizer: A private copy for background jobs (fast tokenizers are not safe to share
            across threads while one of them changes truncation settings).
    """

    def __init__(self, base: nn.Module, tokenizer):
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.train_tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self._peft: nn.Module | None = None
        self._slots: dict[SlotKey, str] = {}
        self._index: dict[str, dict[tuple[int, str], tuple[nn.Linear, nn.Linear]]] = {}

    def generate(self, weights: LoraWeights, prompt: str, max_new_tokens: int) -> str:
        """Answer ``prompt`` with ``weights`` applied on the base model (greedy, first line)."""
        config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=1)
        with self._lock:
            model = self._activate(weights)
            result = generate(model, self.tokenizer, [prompt], config)
        return result.texts[0]

    def _activate(self, weights: LoraWeights) -> nn.Module:
        """Put ``weights`` into the slot for their spec and make it the only active adapter."""
        key = _slot_key(weights)
        if self._peft is None:
            self._peft = attach_lora(shared_copy(self.base), weights).eval()
            self._slots[key] = "default"
        elif key not in self._slots:
            name = f"slot{len(self._slots)}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft warns about adding adapters to a model in eval mode
                self._peft.add_adapter(name, weights.spec.to_peft_config())
            self._slots[key] = name
        name = self._slots[key]
        self._peft.set_adapter(name)
        self._peft.eval()
        self._copy_into(name, weights)
        return self._peft

    @torch.no_grad()
    def _copy_into(self, name: str, weights: LoraWeights) -> None:
        index = self._index.get(name) or self._build_index(name)
        if index.keys() != weights.pairs.keys():
            raise AdapterError(f"adapter modules {sorted(weights.pairs)[:2]}... do not match the serving "
                               "slot")
        for key, pair in weights.pairs.items():
            lora_A, lora_B = index[key]
            lora_A.weight.copy_(pair.A)  # [r, in]
            lora_B.weight.copy_(pair.B)  # [out, r]

    def _build_index(self, name: str) -> dict[tuple[int, str], tuple[nn.Linear, nn.Linear]]:
        index = {}
        for qualified, module in self._peft.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                site = parse_module_name(qualified)
                if site is not None:
                    index[(site.layer, site.name)] = (module.lora_A[name], module.lora_B[name])
        self._index[name] = index
        return index
