"""LoRA hyper-parameters shared by generation, training and export.

One scaling convention everywhere: rsLoRA by default, so the update is
``dW = (alpha / sqrt(r)) * B @ A``. Keeping the spec in one frozen object means the
hypernetwork, the bridge training and the exported peft adapter can never disagree on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peft import LoraConfig

from prisp.errors import AdapterError


@dataclass(frozen=True)
class LoraSpec:
    """Shape and scale of a LoRA adapter.

    Attributes:
        r: Rank of the update.
        alpha: ``lora_alpha`` as peft understands it.
        dropout: Dropout on the LoRA input path (training only).
        target_modules: Short names of the linear layers that carry LoRA (e.g. ``q_proj``).
        use_rslora: Scale by ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            # A bare string would silently iterate over characters.
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"LoRA option r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise AdapterError(f"LoRA option alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA option dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise AdapterError(f"LoRA option target_modules must name modules, got {self.target_modules!r}")

    @property
    def scale(self) -> float:
        """Multiplier applied to ``B @ A`` (5.657 for the defaults)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_config(self, base_model_name: str | None = None) -> LoraConfig:
        """The equivalent ``peft.LoraConfig`` for a causal LM.

        Args:
            base_model_name: Recorded as ``base_model_name_or_path`` when given.
        """
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_rslora=self.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name,
        )
