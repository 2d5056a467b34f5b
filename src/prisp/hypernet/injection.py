"""Generated LoRAs applied in-graph, one LoRA per batch row, without touching the base model's weights.

Forward hooks on each target linear layer add ``scale * dropout(x) @ A_t^T @ B_t^T`` to its output for
batch row ``t``. The factors are plain tensors (the hypernetwork's output), so gradients flow back into
the hypernetwork while the base model's parameters stay frozen and bit-identical. This computes exactly
what peft computes for the same ``(A, B)`` (tests check it against ``PeftModel``). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from prisp.adapters.config import LoraSpec
from prisp.adapters.weights import ModuleKey, parse_module_name
from prisp.errors import AdapterError

Factors = Mapping[ModuleKey, tuple[Tensor, Tensor]]  # (layer, module) -> (A [b, r, in], B [b, out, r])


class BatchedLora:
    """Hooks that add per-row LoRA updates to a model's target modules while :meth:`use` is active.

    Args:
        model: A transformers decoder (not peft-wrapped).
        spec: Scale, dropout and target modules.
    """

    def __init__(self, model: nn.Module, spec: LoraSpec):
        self.spec = spec
        self.sites: dict[ModuleKey, nn.Linear] = {}
        for qualified, module in model.named_modules():
            site = parse_module_name(qualified)
            if site is not None and site.name in spec.target_modules and isinstance(module, nn.Linear):
                self.sites[(site.layer, site.name)] = module
        if not self.sites:
            raise AdapterError(f"base model has no decoder-layer linear modules named {list(spec.target_modules)}")
        self.factors: Factors | None = None
        self._handles = [module.register_forward_hook(self._hook(key)) for key, module in self.sites.items()]

    def shapes(self) -> dict[ModuleKey, tuple[int, int]]:
        """``(layer, module) -> (in, out)`` of the hooked modules."""
        return {key: (m.in_features, m.out_features) for key, m in self.sites.items()}

    def _hook(self, key: ModuleKey):
        scale = self.spec.scale
        p = self.spec.dropout

        def hook(module: nn.Linear, args: tuple, output: Tensor) -> Tensor | None:
            if self.factors is None:
                return None
            A, B = self.factors[key]  # [b, r, in], [b, out, r]
            x = args[0]  # [b, n, in]
            if p > 0 and module.training:
                x = nn.functional.dropout(x, p=p, training=True)
            low = torch.matmul(x.to(A.dtype), A.transpose(-1, -2))  # [b, n, r]
            return output + (scale * torch.matmul(low, B.transpose(-1, -2))).to(output.dtype)  # [b, n, out]

        return hook

    @contextmanager
    def use(self, factors: Factors) -> Iterator[None]:
        """Apply ``factors`` to every forward inside the block (batch size 1 broadcasts to any batch)."""
        missing = sorted(self.sites.keys() - factors.keys())
        if missing:
            raise AdapterError(f"generated LoRA lacks layer {missing[0][0]} {missing[0][1]}")
        previous, self.factors = self.factors, factors
        try:
            yield
        finally:
            self.factors = previous

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
