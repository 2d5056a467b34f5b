"""Figure 8's task descriptions: the reference (Table 11), a paraphrase, and an imprecise one.

The paraphrase is the task spec's ``[descriptions] paraphrase``. The imprecise description is the spec's own
where the paper gives one (LaMP-2, Table 12); otherwise it is chosen as the paper chose it: the hypernetwork's
*training* description (SNI ``train`` tasks) most cosine-similar to the reference under the hypernetwork's own
description encoder, "simulating slightly imprecise user-provided task descriptions".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prisp.data.tasks import get_task
from prisp.errors import PrispError

KINDS = ("reference", "paraphrase", "imprecise")


@dataclass(frozen=True)
class Description:
    """One wording of a task's description and where it came from."""

    kind: str
    text: str
    origin: str  # "Table 11", "spec", or the SNI task and cosine similarity it was chosen by


def check_kinds(kinds: tuple[str, ...]) -> None:
    unknown = [k for k in kinds if k not in KINDS[1:]]
    if unknown:
        raise PrispError(f"--descriptions takes {', '.join(KINDS[1:])}, got {unknown[0]!r}")


def nearest_training_description(reference: str, sni_tasks, encoder) -> tuple[str, str, float]:
    """``(task, description, cosine)`` of the SNI ``train`` description closest to ``reference``, itself
    excluded."""
    candidates = [(task.name, text) for task in sni_tasks if task.split == "train" for text in task.descriptions
                  if text.strip() != reference.strip()]
    if not candidates:
        raise PrispError("the SNI data has no train-split descriptions to choose an imprecise description from")
    vectors = encoder.encode([reference] + [text for _, text in candidates])
    sims = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:])
    best = int(torch.argmax(sims))
    return candidates[best][0], candidates[best][1], float(sims[best])


def description(task: str, kind: str, sni_tasks=None, encoder=None) -> Description:
    """The ``kind`` wording of ``task``'s description (``sni_tasks`` and ``encoder`` for a chosen imprecise one).

    Raises:
        PrispError: the task has no such wording and it cannot be chosen.
    """
    spec = get_task(task)
    given = dict(spec.alt_descriptions)
    if kind == "reference":
        return Description(kind, spec.description, "Table 11" if spec.builtin else "spec")
    if kind in given:
        return Description(kind, given[kind], "spec")
    if kind == "imprecise" and sni_tasks is not None and encoder is not None:
        name, text, sim = nearest_training_description(spec.description, sni_tasks, encoder)
        return Description(kind, text, f"nearest SNI train description ({name}, cosine {sim:.3f})")
    raise PrispError(f"{spec.name} has no {kind} description ([descriptions] {kind} in its spec)")
