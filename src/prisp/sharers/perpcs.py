"""Per-Pcs: split sharer LoRAs into per-layer pieces and compose, layer by layer, the pieces a gate prefers.

The gate is training-free here: a piece (sharer s, layer l) is scored by the cosine similarity between the
target's and the sharer's mean hidden state entering layer l over their history items, centred by the pool's
mean so that the shared direction of all hidden states does not make every piece look alike. At each layer the
top-k pieces are summed with softmax(score / temperature) weights on top of the task-adapted anchor (Per-Pcs'
original gate is a trained vector per piece, Table 7 "Sharer Gate"; this keeps its per-layer selection without
training one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from prisp.adapters import LoraWeights
from prisp.data.examples import item_example
from prisp.data.lamp import ProfileItem
from prisp.errors import DataError
from prisp.personalize.hyperparams import PER_PCS_TOP_K, table7_row
from prisp.sharers.merge import layer_sum
from prisp.sharers.pool import SharerPool
from prisp.sharers.similarity import HistoryEmbedder
from prisp.sharers.targets import AdapterBuild, measured


@dataclass(frozen=True)
class PerPcsConfig:
    """Per-Pcs options.

    Attributes:
        top_k: pieces composed per layer (None: Table 7 for the task).
        candidates: the target's most similar sharers (mean history embedding) whose pieces compete
            (None: all).
        temperature: softmax temperature turning the chosen pieces' scores into weights.
        max_length: tokens per history item when computing gate features.
    """

    top_k: int | None = None
    candidates: int | None = None
    temperature: float = 0.1
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise DataError(f"per-pcs top_k must be at least 1, got {self.top_k}")
        if not self.temperature > 0:
            raise DataError(f"per-pcs temperature must be positive, got {self.temperature}")


@dataclass
class PieceSelection:
    """Chosen pieces: ``indices[l, j]``, the sharer of layer l's j-th piece; ``weights[l, j]``, its weight."""

    indices: Tensor  # [L, k] long
    weights: Tensor  # [L, k] float, rows sum to 1


@torch.no_grad()
def gate_features(
    model,
    tokenizer,
    task: str,
    items: Sequence[ProfileItem],
    labels: Sequence[str] = (),
    max_length: int = 256,
) -> Tensor:
    """Mean hidden state entering each decoder layer over a user's items (prompt and answer): ``[L, d]``."""
    texts = [f"{ex.prompt} {ex.answer}" for ex in (item_example(task, item, labels) for item in items)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch, output_hidden_states=True).hidden_states[:-1]  # L x [n, T, d]: inputs of layers
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [n, T, 1]
    per_item = [(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in hidden]  # L x [n, d]
    return torch.stack([h.mean(0) for h in per_item]).cpu()  # [L, d]


def piece_scores(target: Tensor, sharers: Tensor) -> Tensor:
    """Centred cosine similarity of each sharer's layer features to the target's: ``[S, L]``.

    Args:
        target: ``[L, d]``.
        sharers: ``[S, L, d]``.
    """
    centre = sharers.mean(0, keepdim=True)  # [1, L, d]
    t = torch.nn.functional.normalize((target.unsqueeze(0) - centre).float(), dim=-1)  # [1, L, d]
    s = torch.nn.functional.normalize((sharers - centre).float(), dim=-1)  # [S, L, d]
    return (s * t).sum(-1)  # [S, L]


def select_pieces(scores: Tensor, top_k: int, temperature: float = 0.1) -> PieceSelection:
    """The ``top_k`` highest-scoring sharers per layer (ties: lower sharer index) and their softmax weights.

    Args:
        scores: ``[S, L]``, higher is better.
    """
    k = min(top_k, scores.shape[0])
    # A stable sort keeps equal scores in sharer order, so the choice is deterministic.
    order = torch.sort(-scores.T, dim=1, stable=True).indices[:, :k]  # [L, k]
    chosen = torch.gather(scores.T, 1, order)  # [L, k]
    return PieceSelection(order, torch.softmax(chosen / temperature, dim=1))


def compose_pieces(
    anchor: LoraWeights, deltas: Sequence[LoraWeights], selection: PieceSelection
) -> LoraWeights:
    """The anchor plus, at every layer, the chosen sharers' pieces of that layer weighted as selected."""
    layers = sorted({layer for layer, _ in anchor.pairs})
    terms = {
        layer: [(deltas[int(s)], float(w)) for s, w in zip(selection.indices[i], selection.weights[i])]
        for i, layer in enumerate(layers)
    }
    return layer_sum(anchor, terms)


class PerPcs:
    """Per-Pcs over a trained pool (a :class:`prisp.sharers.targets.SharerMethod`)."""

    name = "per-pcs"

    def __init__(
        self, pool: SharerPool, config: PerPcsConfig = PerPcsConfig(), embedder: HistoryEmbedder | None = None,
        task: str | None = None,
    ):
        """``task``: the target task when it is not the pool's (Figure 7 reuses another task's sharers); its
        Table 7 row applies."""
        self.pool = pool
        self.config = config
        self.embedder = embedder or HistoryEmbedder()
        self.top_k = config.top_k or table7_row(PER_PCS_TOP_K, task or pool.task)

    def key_payload(self) -> dict:
        return {"pool": self.pool.key, "config": asdict(self.config), "top_k": self.top_k}

    def _sharer_gates(self, base, tokenizer, labels) -> None:
        # A sharer's gate reads its own task's examples, so with its own labels (the target's may be another
        # task's: Figure 7); a pool that carries none (a generation task, or one built by hand) takes the target's.
        labels = self.pool.labels or labels
        for sharer in self.pool.sharers:
            if sharer.gate is None:  # computed once per pool; its time is charged with the sharer's training
                with measured() as cost:
                    sharer.gate = gate_features(
                        base, tokenizer, self.pool.task, sharer.items, labels, self.config.max_length
                    )
                sharer.gate_seconds = cost.seconds

    def build(
        self, base, tokenizer, task: str, items: Sequence[ProfileItem], labels: Sequence[str]
    ) -> AdapterBuild:
        self._sharer_gates(base, tokenizer, labels)
        with measured(next(base.parameters()).device) as cost:
            candidates = [
                s for s, _ in self.pool.nearest(self.embedder.embed(task, items), self.config.candidates)
            ]
            target = gate_features(base, tokenizer, task, items, labels, self.config.max_length)
            scores = piece_scores(target, torch.stack([s.gate for s in candidates]))
            selection = select_pieces(scores, self.top_k, self.config.temperature)
            weights = compose_pieces(self.pool.anchor, [s.delta for s in candidates], selection)
        picked = sorted({int(i) for i in selection.indices.flatten()})
        details = {
            "top_k": self.top_k,
            "pieces": [[candidates[int(i)].user for i in row] for row in selection.indices],
            "picked": [candidates[i].user for i in picked],
        }
        return AdapterBuild(weights, cost.seconds, cost.peak_memory_mb, 0, candidates, details)
