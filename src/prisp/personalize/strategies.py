"""The personalization strategies: which adapter a user starts from and which factors train.

Every strategy runs the same training loop on the same examples; they differ only in this table,
so comparisons between them (Table 5 of the paper, and OPPU) are fair by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from prisp.errors import PrispError


@dataclass(frozen=True)
class Strategy:
    """One row of the strategy table.

    Attributes:
        name: CLI name.
        description: one line for help texts and reports.
        train_A, train_B, train_C: which LoRA factors receive gradients (C is the r x r bridge).
        bridge: insert the bridge C (identity at start) so that dW = B C A.
        fresh_lora: OPPU: merge the anchor into the base, then train a new LoRA from a random init.
        svd_init: Table 4: no anchor (only its LoRA shape); a LoRA on the base model started by peft's PiSSA
            (``pissa``) or LoRA-GA (``lora-ga``) initialiser (``prisp.personalize.svd_init``).
    """

    name: str
    description: str
    train_A: bool
    train_B: bool
    train_C: bool
    bridge: bool = False
    fresh_lora: bool = False
    svd_init: str | None = None

    @property
    def grows_rank(self) -> bool:
        """Its export stacks another LoRA under the trained one (OPPU's anchor, PiSSA / LoRA-GA's initial
        offset), so starting again from a user's adapter would add r to the rank every time."""
        return self.fresh_lora or self.svd_init is not None

    def trainable_formula(self, d_in: int, d_out: int, r: int) -> int:
        """Trainable parameters per LoRA module (App. D)."""
        return (self.train_A * r * d_in) + (self.train_B * d_out * r) + (self.train_C * r * r)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("prisp", "anchor A frozen; B and the bridge C trained (dW = B C A)", False, True, True, bridge=True),
        Strategy("full-lora", "ablation: anchor A and B both trained", True, True, False),
        Strategy("no-bridge", "ablation: only the anchor's B trained", False, True, False),
        Strategy("bridge-only", "ablation: only the bridge C trained", False, False, True, bridge=True),
        Strategy("oppu", "OPPU: anchor merged into the base, a fresh per-user LoRA (A, B) trained", True, True,
                 False, fresh_lora=True),
        Strategy("pissa", "Table 4: a LoRA on the base model from its weights' principal singular components "
                 "(PiSSA), A and B trained; the anchor gives only the LoRA shape", True, True, False,
                 svd_init="pissa"),
        Strategy("lora-ga", "Table 4: a LoRA on the base model from the SVD of the user's own calibration "
                 "gradients (LoRA-GA), A and B trained; the anchor gives only the LoRA shape", True, True, False,
                 svd_init="lora-ga"),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; one line listing the choices otherwise."""
    if name not in STRATEGIES:
        raise PrispError(f"unknown strategy {name!r}; expected one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
