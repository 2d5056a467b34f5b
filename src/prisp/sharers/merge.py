"""LoRA algebra for sharer methods: split a stacked adapter, and sum weighted per-layer pieces into one
adapter.

Every composed adapter here is exact: ``anchor + sum_j c_j * dW_j`` is written as one LoRA of rank ``r_anchor
+ sum_j r_j`` by concatenating factors (``A = [A_0; A_1; ...]``, ``B = [B_0, c_1 B_1, ...]``), the same trick
OPPU's export uses, so the result is a plain peft adapter of the unmodified base model. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from peft import set_peft_model_state_dict

from prisp.adapters import LoraPair, LoraSpec, LoraWeights
from prisp.errors import AdapterError

Term = tuple[LoraWeights, float]  # (a sharer's own LoRA, its coefficient)


def with_rank(spec: LoraSpec, r: int) -> LoraSpec:
    """``spec`` at rank ``r`` with the same scale so factors can be cut or stacked exactly."""
    alpha = spec.scale * (math.sqrt(r) if spec.use_rslora else r)
    return LoraSpec(
        r=r, alpha=alpha, dropout=spec.dropout, target_modules=spec.target_modules, use_rslora=spec.use_rslora
    )


def split_stack(weights: LoraWeights, first_rank: int) -> tuple[LoraWeights, LoraWeights]:
    """Undo ``stack_loras``: the first ``first_rank`` ranks and the remaining ones, each as its own LoRA.

    Raises:
        AdapterError: ``first_rank`` leaves nothing on one side.
    """
    r = weights.spec.r
    if not 0 < first_rank < r:
        raise AdapterError(f"cannot split a rank-{r} adapter after rank {first_rank}")

    def part(rows: slice, rank: int) -> LoraWeights:
        pairs = {
            key: LoraPair(A=p.A[rows].clone(), B=p.B[:, rows].clone()) for key, p in weights.pairs.items()
        }
        return LoraWeights(
            spec=with_rank(weights.spec, rank),
            pairs=pairs,
            module_paths=dict(weights.module_paths),
            layers_prefix=weights.layers_prefix,
        )

    return part(slice(0, first_rank), first_rank), part(slice(first_rank, r), r - first_rank)


def _check_compatible(anchor: LoraWeights, terms: Mapping[int, Sequence[Term]]) -> None:
    for layer_terms in terms.values():
        for delta, _ in layer_terms:
            if not math.isclose(delta.spec.scale, anchor.spec.scale) or set(delta.pairs) != set(anchor.pairs):
                raise AdapterError("sharer LoRAs must have the anchor's modules and scale to be composed")
    ranks = {sum(d.spec.r for d, _ in layer_terms) for layer_terms in terms.values()}
    if len(ranks) > 1:
        raise AdapterError(
            f"composed layers would have different ranks {sorted(ranks)}; give every layer as many "
            "pieces of the same rank"
        )


def layer_sum(anchor: LoraWeights, terms: Mapping[int, Sequence[Term]]) -> LoraWeights:
    """One LoRA computing ``dW_anchor + sum_j c_j dW_j`` per layer; ``terms[layer] = [(dW_j, c_j), ...]``.

    Each term contributes only its pieces (its ``(layer, module)`` pairs) at that layer. Every layer must get
    the same total rank, so the result is one uniform-rank adapter.

    Raises:
        AdapterError: a layer has no terms, ranks differ between layers, or modules/scales do not match.
    """
    layers = {layer for layer, _ in anchor.pairs}
    if set(terms) != layers:
        raise AdapterError(
            f"pieces given for layers {sorted(terms)}, but the anchor has layers {sorted(layers)}"
        )
    _check_compatible(anchor, terms)
    pairs = {}
    for (layer, name), base in anchor.pairs.items():
        chosen = terms[layer]
        A = torch.cat([base.A] + [d.pairs[(layer, name)].A for d, _ in chosen], 0)  # [R, in]
        B = torch.cat([base.B] + [c * d.pairs[(layer, name)].B for d, c in chosen], 1)  # [out, R]
        pairs[(layer, name)] = LoraPair(A=A, B=B)
    rank = anchor.spec.r + sum(d.spec.r for d, _ in next(iter(terms.values())))
    return LoraWeights(
        spec=with_rank(anchor.spec, rank),
        pairs=pairs,
        module_paths=dict(anchor.module_paths),
        layers_prefix=anchor.layers_prefix,
    )


def uniform_terms(
    anchor: LoraWeights, deltas: Sequence[LoraWeights], coefs: Sequence[Sequence[float]]
) -> dict:
    """``terms`` for :func:`layer_sum` when every layer uses all ``deltas``; ``coefs[layer_index][j]``."""
    layers = sorted({layer for layer, _ in anchor.pairs})
    return {layer: [(d, float(coefs[i][j])) for j, d in enumerate(deltas)] for i, layer in enumerate(layers)}


def load_into(peft_model, weights: LoraWeights) -> None:
    """Overwrite the LoRA tensors of an already attached adapter of the same rank (no re-injection).

    Raises:
        AdapterError: peft did not take every tensor (a rank or module mismatch).
    """
    result = set_peft_model_state_dict(peft_model, weights.to_peft_state_dict())
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterError(
            f"adapter does not match the attached one: unexpected {result.unexpected_keys[:2]}, "
            f"missing {missing[:2]}"
        )
