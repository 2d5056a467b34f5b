"""Sharer baselines: a pool of LoRAs trained on other users, Per-Pcs and PriME (both share parameters)."""

from prisp.sharers.merge import layer_sum, split_stack
from prisp.sharers.perpcs import (
    PerPcs,
    PerPcsConfig,
    PieceSelection,
    compose_pieces,
    piece_scores,
    select_pieces,
)
from prisp.sharers.pool import Sharer, SharerConfig, SharerPool, build_pool
from prisp.sharers.prime import Prime, PrimeConfig
from prisp.sharers.search import SearchConfig, SearchResult, cma_minimize
from prisp.sharers.similarity import HistoryEmbedder, cluster_representatives, rank_by_similarity
from prisp.sharers.targets import AdapterBuild, SharerRun, TargetCost, predict_with_sharers

__all__ = [
    "AdapterBuild",
    "HistoryEmbedder",
    "PerPcs",
    "PerPcsConfig",
    "PieceSelection",
    "Prime",
    "PrimeConfig",
    "SearchConfig",
    "SearchResult",
    "Sharer",
    "SharerConfig",
    "SharerPool",
    "SharerRun",
    "TargetCost",
    "build_pool",
    "cluster_representatives",
    "cma_minimize",
    "compose_pieces",
    "layer_sum",
    "piece_scores",
    "predict_with_sharers",
    "rank_by_similarity",
    "select_pieces",
    "split_stack",
]
