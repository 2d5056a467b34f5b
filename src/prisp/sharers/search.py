"""Gradient-free search of merge weights: CMA-ES (the ``cma`` package) under a hard evaluation budget.

The budget counts calls of the loss, the starting point included, and is never exceeded (a last, partial
generation is evaluated but not told to CMA-ES). Every candidate is clipped into the box, so the loss never
sees a weight outside the bounds. Seeded, and numpy's global RNG (which ``cma`` seeds) is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SearchConfig:
    """CMA-ES options.

    Attributes:
        budget: loss evaluations in total (the start point is the first).
        bound: weights live in ``[-bound, bound]``.
        sigma0: initial step size.
        seed: seeds the search.
        popsize: candidates per generation (None: CMA-ES' default ``4 + 3 ln(dim)``, capped by the budget).
    """

    budget: int = 10
    bound: float = 1.5
    sigma0: float = 0.5
    seed: int = 0
    popsize: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"search budget must be at least 1, got {self.budget}")
        if not self.bound > 0 or not self.sigma0 > 0:
            raise ValueError(f"search bound and sigma0 must be positive, got {self.bound} / {self.sigma0}")


@dataclass
class SearchResult:
    """The best point found and every evaluation, in order."""

    best: np.ndarray
    best_loss: float
    points: list[np.ndarray] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def cma_minimize(
    loss: Callable[[np.ndarray], float], x0: Sequence[float], config: SearchConfig
) -> SearchResult:
    """Minimise ``loss`` over the box ``[-bound, bound]^dim`` from ``x0`` with at most ``budget`` calls."""
    x0 = np.asarray(x0, dtype=float)
    if x0.size == 1:
        # cma refuses one-dimensional problems; search a plane and read only its first coordinate.
        padded = cma_minimize(lambda z: loss(z[:1]), [float(x0[0]), 0.0], config)
        return SearchResult(padded.best[:1], padded.best_loss, [p[:1] for p in padded.points], padded.losses)
    return _cma_minimize(loss, x0, config)


def _cma_minimize(loss: Callable[[np.ndarray], float], x0: np.ndarray, config: SearchConfig) -> SearchResult:
    import cma

    x0 = np.clip(np.asarray(x0, dtype=float), -config.bound, config.bound)
    result = SearchResult(best=x0, best_loss=math.inf)

    def evaluate(x: np.ndarray) -> float:
        x = np.clip(np.asarray(x, dtype=float), -config.bound, config.bound)
        value = float(loss(x))
        result.points.append(x)
        result.losses.append(value)
        if value < result.best_loss:
            result.best, result.best_loss = x, value
        return value

    evaluate(x0)
    if config.budget == 1:
        return result
    popsize = config.popsize or 4 + int(3 * math.log(max(1, x0.size)))
    # cma treats seed 0 as "seed from the clock"; shifting by one keeps every user seed deterministic.
    options = {
        "bounds": [-config.bound, config.bound],
        "seed": config.seed + 1,
        "verbose": -9,
        "popsize": max(2, min(popsize, config.budget - 1)),
    }
    state = np.random.get_state()
    try:
        es = cma.CMAEvolutionStrategy(x0.tolist(), config.sigma0, options)
        while len(result.losses) < config.budget:
            candidates = es.ask()
            remaining = config.budget - len(result.losses)
            values = [evaluate(x) for x in candidates[:remaining]]
            if len(values) == len(candidates):
                es.tell(candidates, values)
    finally:
        np.random.set_state(state)
    return result
