"""BM25 retrieval over one user's history, as LaMP does it (``BM25Okapi``, whitespace tokens)."""

from __future__ import annotations

from typing import Sequence

from rank_bm25 import BM25Okapi

from prisp.data.lamp import ProfileItem
from prisp.data.tasks import get_task


def item_text(task: str, item: ProfileItem) -> str:
    """The text of an item that retrieval indexes: the task's query fields joined by spaces."""
    return " ".join(item.fields[name] for name in get_task(task).query_fields)


class Bm25Retriever:
    """BM25 over a fixed list of profile items of one user.

    Ties keep the original (chronological) order, so results are deterministic.
    """

    def __init__(self, task: str, items: Sequence[ProfileItem]):
        self.task = get_task(task).name
        self.items = list(items)
        corpus = [item_text(self.task, item).split() for item in self.items]
        # BM25Okapi divides by the corpus size; an empty history simply retrieves nothing.
        self._bm25 = BM25Okapi(corpus) if self.items and any(corpus) else None

    def top_k(self, query: str, k: int = 1) -> list[ProfileItem]:
        """The ``k`` best-scoring items for ``query``, best first."""
        if self._bm25 is None or k <= 0:
            return []
        scores = self._bm25.get_scores(query.split())
        order = sorted(range(len(self.items)), key=lambda i: (-scores[i], i))
        return [self.items[i] for i in order[:k]]
