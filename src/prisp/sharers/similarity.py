"""User similarity from history embeddings: mean sentence embedding of a user's items (MiniLM by default).

Sharer selection in Per-Pcs and PriME ranks sharers by the cosine similarity of these mean embeddings; the
pool of sharers worth training is chosen by clustering them, one representative per cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prisp.data.lamp import ProfileItem
from prisp.retrieval import item_text


class HistoryEmbedder:
    """Mean item embedding of a user's history.

    Args:
        encoder: anything with ``encode(texts) -> Tensor [T, d]``; default: the packaged all-MiniLM-L6-v2
            (``prisp.hypernet.encoders.MiniLMEncoder``), loaded on first use.
    """

    def __init__(self, encoder=None):
        self._encoder = encoder

    @property
    def encoder(self):
        if self._encoder is None:
            from prisp.hypernet.encoders import MiniLMEncoder

            self._encoder = MiniLMEncoder()
        return self._encoder

    @property
    def name(self) -> str:
        return getattr(self._encoder, "name", None) or (
            type(self._encoder).__name__ if self._encoder else "minilm"
        )

    def embed(self, task: str, items: Sequence[ProfileItem]) -> Tensor:
        """The unit-length mean embedding ``[d]`` of ``items`` (the text retrieval indexes for ``task``)."""
        if not items:
            raise ValueError("cannot embed an empty history")
        vectors = self.encoder.encode([item_text(task, item) for item in items]).float()  # [n, d]
        return torch.nn.functional.normalize(vectors.mean(0), dim=0)


def rank_by_similarity(target: Tensor, others: Sequence[Tensor]) -> list[tuple[int, float]]:
    """Indices of ``others`` and their cosine similarity to ``target``, best first (ties: by index)."""
    if not others:
        return []
    stacked = torch.nn.functional.normalize(torch.stack(list(others)).float(), dim=1)  # [S, d]
    sims = stacked @ torch.nn.functional.normalize(target.float(), dim=0)  # [S]
    return sorted(((i, float(s)) for i, s in enumerate(sims.tolist())), key=lambda pair: (-pair[1], pair[0]))


def cluster_representatives(embeddings: Tensor, n: int, seed: int = 0) -> list[int]:
    """``n`` diverse rows of ``embeddings [N, d]``: k-means into ``n`` clusters, each centroid's nearest row.

    Returns all rows when ``N <= n``. The result is sorted and deterministic for a given seed.
    """
    total = embeddings.shape[0]
    if total <= n:
        return list(range(total))
    from sklearn.cluster import KMeans

    points = torch.nn.functional.normalize(embeddings.float(), dim=1).numpy()
    km = KMeans(n_clusters=n, n_init=10, random_state=seed).fit(points)
    chosen = []
    for cluster in range(n):
        members = [i for i, label in enumerate(km.labels_) if label == cluster]
        dists = ((points[members] - km.cluster_centers_[cluster]) ** 2).sum(1)
        chosen.append(members[int(dists.argmin())])
    return sorted(chosen)
