"""The LaMP tasks: names, profile fields, label sets, decoding lengths.

One :class:`TaskSpec` per task keeps every task-specific fact in one table, so code
elsewhere asks the spec instead of branching on task names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prisp.errors import DataError

LAMP1_LABELS: tuple[str, ...] = ("[1]", "[2]")
LAMP2_TAGS: tuple[str, ...] = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)
# LaMP v1 news categorization (HuffPost); the fallback when a questions file does not list its categories.
LAMP2N_OFFICIAL_CATEGORIES: tuple[str, ...] = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living", "parents",
    "food & drink",
)
LAMP3_LABELS: tuple[str, ...] = ("1", "2", "3", "4", "5")


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one LaMP task.

    Attributes:
        name: canonical name, e.g. ``"LaMP-4"``.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        profile_fields: fields every profile item must carry (besides ``id``; ``date`` is optional).
        query_fields: profile fields whose text BM25 indexes for retrieval.
        labels: the fixed label set (classification/regression); empty when read from the data.
        max_new_tokens: decoding budget; short for labels, longer for text.
        official_dir: the directory name on the LaMP download server.
        description: the natural-language task description the hypernetwork turns into an anchor (Table 11;
            LaMP-2N's is ours, LaMP v1's news categorization).
    """

    name: str
    kind: str
    profile_fields: tuple[str, ...]
    query_fields: tuple[str, ...]
    labels: tuple[str, ...]
    max_new_tokens: int
    official_dir: str
    description: str

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("LaMP-1", "classification", ("title", "abstract"), ("title", "abstract"), LAMP1_LABELS, 8,
                 "LaMP_1",
                 "Identify the most relevant reference for a given paper title. Select between two candidate "
                 "references [1] and [2]."),
        TaskSpec("LaMP-2", "classification", ("description", "tag"), ("description",), LAMP2_TAGS, 10,
                 "LaMP_2/new",
                 "Classify movies into one of these 15 tags based on their descriptions: sci-fi, based on a "
                 "book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, fantasy, romance, "
                 "thought-provoking, social commentary, violence, or true story."),
        TaskSpec("LaMP-2N", "classification", ("text", "title", "category"), ("title", "text"), (), 10,
                 "LaMP_2",
                 "Classify a news article into one of the given categories based on its headline and "
                 "description."),
        TaskSpec("LaMP-3", "regression", ("text", "score"), ("text",), LAMP3_LABELS, 4, "LaMP_3",
                 "What is the score of the following review on a scale of 1 to 5?"),
        TaskSpec("LaMP-4", "generation", ("text", "title"), ("text",), (), 32, "LaMP_4",
                 "Generate a headline for an article."),
        TaskSpec("LaMP-5", "generation", ("title", "abstract"), ("abstract",), (), 32, "LaMP_5",
                 "Generate an appropriate title for an academic paper based on the provided abstract."),
        TaskSpec("LaMP-7", "generation", ("text",), ("text",), (), 64, "LaMP_7",
                 "Paraphrase the following text into a tweet."),
    )
}

_NAME_RE = re.compile(r"^lamp[-_ ]?(\d)(n?)$", re.IGNORECASE)


def normalize_task_name(name: str) -> str:
    """Map ``LaMP_4``, ``lamp-4``, ``LaMP-2N`` ... to the canonical ``LaMP-4`` form.

    Raises:
        DataError: the name is not a LaMP task prisp supports.
    """
    match = _NAME_RE.match(str(name).strip())
    canonical = f"LaMP-{match.group(1)}{match.group(2).upper()}" if match else str(name)
    if canonical not in TASKS:
        raise DataError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return canonical


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` for ``name`` in any accepted spelling."""
    return TASKS[normalize_task_name(name)]


_CATEGORIES_RE = re.compile(r"categories:\s*\[([^\]]*)\]", re.IGNORECASE)


def categories_from_input(text: str) -> tuple[str, ...]:
    """The category list a LaMP-2N input names (``categories: [a, b, ...]``), or ``()``."""
    match = _CATEGORIES_RE.search(text)
    if not match:
        return ()
    return tuple(c.strip() for c in match.group(1).split(",") if c.strip())


def label_set(task: str, inputs: list[str] | None = None) -> tuple[str, ...]:
    """The label set for ``task``; for LaMP-2N read from ``inputs`` when they list categories."""
    spec = get_task(task)
    if spec.name == "LaMP-2N":
        for text in inputs or []:
            found = categories_from_input(text)
            if found:
                return found
        return LAMP2N_OFFICIAL_CATEGORIES
    return spec.labels


_EDGE_PUNCT = " \t\n\"'`*.:;,!"


def snap_to_label(text: str, labels: tuple[str, ...] | list[str]) -> str:
    """Map a model answer to a label when it unambiguously *starts* with one; else return it unchanged.

    Small models answer "1" where LaMP-1's gold is "[1]", or "Politics." for "politics". The official metric
    counts those wrong; this snap (applied to predictions, never inside the metric) only accepts an answer
    whose first token is a label (case-insensitive, a bare digit standing for "[digit]"), and never searches
    further into the text, so a rambling answer that mentions a label later stays wrong.
    """
    if not labels:
        return text
    stripped = text.strip().strip(_EDGE_PUNCT)
    lowered = stripped.lower()
    by_length = sorted(labels, key=len, reverse=True)
    for label in by_length:
        if lowered == label.lower():
            return label
    for label in by_length:
        for form in {label.lower(), label.lower().strip("[]")}:
            if lowered.startswith(form) and not lowered[len(form):len(form) + 1].isalnum():
                return label
    return text
