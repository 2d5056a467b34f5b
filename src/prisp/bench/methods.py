"""The benchmark's methods and prompt variants, as small tables (Table 2 / Table 13 of the paper).

Prompt-only baselines (NP, RAG, PAG, RAG+PAG) answer with the task-adapted model and have one fixed variant;
personalized methods are run under every retrieval variant (Base / +RAG / +PAG / RAG+PAG), and Table 2 reports
each method's best variant per task, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

from prisp.errors import PrispError

# Prompt compositions: keys of prisp.predict.METHODS, with the paper's column names.
VARIANTS: dict[str, str] = {"np": "Base", "rag": "+RAG", "pag": "+PAG", "rag+pag": "RAG+PAG"}


@dataclass(frozen=True)
class BenchMethod:
    """One row of the comparison.

    Attributes:
        name: CLI name.
        label: name in the report.
        kind: ``prompt`` (no training), ``anchor`` (PRISP's Stage-1 anchor alone, no per-user training: what
            Stage 2 must improve on), ``personal`` (a Stage-2 strategy) or ``sharer`` (Per-Pcs, PriME).
        shared_params: uses LoRA parameters trained on other users (Table 2's privacy column).
        requires_task_data: needs task-level training data (a PRISP anchor from the hypernetwork does not; the
            run records the anchor actually used).
        variant: the fixed prompt variant of a prompt-only method (None: every variant).
        strategy: the ``prisp.personalize`` strategy of a personal method.
        anchor: which anchor it starts from: ``task`` (task-adapted) or ``prisp`` (the PRISP anchor hook).
    """

    name: str
    label: str
    kind: str
    shared_params: bool
    requires_task_data: bool
    variant: str | None = None
    strategy: str | None = None
    anchor: str = "task"


BENCH_METHODS: dict[str, BenchMethod] = {
    m.name: m
    for m in (
        BenchMethod("np", "NP", "prompt", False, True, variant="np"),
        BenchMethod("rag", "RAG", "prompt", False, True, variant="rag"),
        BenchMethod("pag", "PAG", "prompt", False, True, variant="pag"),
        BenchMethod("rag+pag", "RAG + PAG", "prompt", False, True, variant="rag+pag"),
        BenchMethod("per-pcs", "Per-Pcs", "sharer", True, True),
        BenchMethod("prime", "PriME", "sharer", True, True),
        BenchMethod("oppu", "OPPU", "personal", False, True, strategy="oppu"),
        BenchMethod("prisp", "PRISP (Ours)", "personal", False, False, strategy="prisp", anchor="prisp"),
        # PRISP's starting point (Stage 1 alone, every prompt variant); selectable, not in the default grid.
        BenchMethod("anchor", "PRISP Stage 1 only", "anchor", False, False, anchor="prisp"),
        # Table 5 ablations of PRISP's Stage 2 (same anchor), selectable but not in the default grid.
        BenchMethod("full-lora", "Full LoRA", "personal", False, False, strategy="full-lora", anchor="prisp"),
        BenchMethod("no-bridge", "No Bridge", "personal", False, False, strategy="no-bridge", anchor="prisp"),
        BenchMethod(
            "bridge-only", "Bridge Only", "personal", False, False, strategy="bridge-only", anchor="prisp"
        ),
        # Table 4: SVD-based starts instead of the hypernetwork's (the anchor gives only the LoRA shape).
        BenchMethod("pissa", "PiSSA", "personal", False, False, strategy="pissa", anchor="prisp"),
        BenchMethod("lora-ga", "LoRA-GA", "personal", False, False, strategy="lora-ga", anchor="prisp"),
    )
}
DEFAULT_METHODS: tuple[str, ...] = ("np", "rag", "pag", "rag+pag", "per-pcs", "prime", "oppu", "prisp")


def get_method(name: str) -> BenchMethod:
    """The method called ``name``; one line listing the choices otherwise."""
    if name not in BENCH_METHODS:
        raise PrispError(f"unknown benchmark method {name!r}; expected one of: {', '.join(BENCH_METHODS)}")
    return BENCH_METHODS[name]


UNTRAINED_KINDS = ("prompt", "anchor")  # no per-user training: no data-size sweep, no training cost


def method_variants(method: BenchMethod, variants: tuple[str, ...]) -> tuple[str, ...]:
    """The prompt variants ``method`` runs under."""
    return (method.variant,) if method.variant else variants
