"""Prompt construction: the paper's Table 16 personalization prompts and history rendering.

LaMP inputs are parsed back into their parts (article, abstract, candidate titles ...) so the
Table 16 template can be filled; an input that does not parse is used verbatim, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from prisp.data.lamp import ProfileItem
from prisp.data.tasks import categories_from_input, get_task

_INSTRUCTION = "User Instruction: "


@dataclass(frozen=True)
class ParsedInput:
    """The parts of a LaMP input that the templates need."""

    body: str  # article / abstract / review / description / tweet, or the whole input when unparsed
    title: str = ""  # LaMP-1: the query paper title
    options: tuple[str, str] = ("", "")  # LaMP-1: reference candidates [1] and [2]
    labels: tuple[str, ...] = ()  # LaMP-2/2N: the label list named in the input
    parsed: bool = True


_LAMP1_RE = re.compile(
    r'title\s+"(?P<title>.*?)"\s*,\s*which reference is related\?.*?\[1\]:\s*"(?P<a>.*?)"\s*\[2\]:\s*"(?P<b>.*)"\s*$',
    re.DOTALL | re.IGNORECASE,
)
# The marker after which each task's free text starts in the official input texts.
_BODY_MARKERS = {
    "LaMP-2": r"description:\s*", "LaMP-2N": r"article:\s*", "LaMP-3": r"review:\s*",
    "LaMP-4": r"article:\s*", "LaMP-5": r"paper:\s*", "LaMP-7": r"after it:\s*",
}


def parse_input(task: str, text: str) -> ParsedInput:
    """Split an official LaMP input into its parts."""
    name = get_task(task).name
    if name == "LaMP-1":
        match = _LAMP1_RE.search(text)
        if not match:
            return ParsedInput(body=text, parsed=False)
        return ParsedInput(body=match["title"], title=match["title"], options=(match["a"], match["b"]))
    labels = categories_from_input(text) if name == "LaMP-2N" else ()
    if name == "LaMP-2":
        tags = re.search(r"tags:\s*\[([^\]]*)\]", text, re.IGNORECASE)
        labels = tuple(t.strip() for t in tags.group(1).split(",")) if tags else ()
    match = re.search(_BODY_MARKERS[name], text, re.IGNORECASE)
    if not match:
        return ParsedInput(body=text, labels=labels, parsed=False)
    return ParsedInput(body=text[match.end():].strip(), labels=labels)


def fill_prompt(task: str, parts: ParsedInput, labels: Sequence[str] = ()) -> str:
    """The Table 16 prompt for already-parsed parts (also used to turn history items into examples)."""
    name = get_task(task).name
    label_list = ", ".join(parts.labels or labels)
    if name == "LaMP-1":
        return (f"{_INSTRUCTION}Identify the most relevant reference for the listed publication by the researcher. "
                "Select the reference paper that is most closely related to the researcher's work. Please respond "
                f"with only the number that corresponds to the reference. Paper Title: {parts.title} "
                f"Reference: [1] - {parts.options[0]} [2] - {parts.options[1]} Answer:")
    if name == "LaMP-2":
        return (f"{_INSTRUCTION}Which tag does this movie relate to among the following tags? Just answer with the "
                f"tag name without further explanation. tags: [{label_list}] Description: {parts.body} Tag:")
    if name == "LaMP-2N":
        return (f"{_INSTRUCTION}Which category does this article relate to among the following categories? Just "
                "answer with the category name without further explanation. "
                f"categories: [{label_list}] Article: {parts.body} Category:")
    if name == "LaMP-3":
        return (f"{_INSTRUCTION}What is the score of the following review on a scale of 1 to 5? Just answer with "
                f"1, 2, 3, 4, or 5 without further explanation. Review: {parts.body} Score:")
    if name == "LaMP-4":
        return f"{_INSTRUCTION}Generate a headline for the following article. Article: {parts.body} Headline:"
    if name == "LaMP-5":
        return f"{_INSTRUCTION}Generate a title for the following abstract of a paper. Abstract: {parts.body} Title:"
    return (f"{_INSTRUCTION}Paraphrase the following tweet without any explanation before or after it. "
            f"Tweet: {parts.body} Paraphrase:")


def query_prompt(task: str, text: str, labels: Sequence[str] = ()) -> str:
    """The Table 16 prompt for an official LaMP input (or the input verbatim when it does not parse)."""
    parts = parse_input(task, text)
    if not parts.parsed:
        return f"{_INSTRUCTION}{text} Answer:"
    return fill_prompt(task, parts, labels)


HISTORY_FIELD_CHARS = 600


def clip(text: str, limit: int = HISTORY_FIELD_CHARS) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary (deterministic)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."


def render_item(task: str, item: ProfileItem) -> str:
    """One history item as context text, in the same words the task's prompt uses.

    Long fields (ACL abstracts reach 2000 characters) are clipped so a retrieved item cannot crowd the
    query out of a small model's context.
    """
    name = get_task(task).name
    f = {key: clip(value) for key, value in item.fields.items()}
    renderers = {
        "LaMP-1": lambda: f'Paper Title: {f["title"]} Abstract: {f["abstract"]}',
        "LaMP-2": lambda: f'Description: {f["description"]} Tag: {f["tag"]}',
        "LaMP-2N": lambda: f'Article: {f["title"]}. {f["text"]} Category: {f["category"]}',
        "LaMP-3": lambda: f'Review: {f["text"]} Score: {f["score"]}',
        "LaMP-4": lambda: f'Article: {f["text"]} Headline: {f["title"]}',
        "LaMP-5": lambda: f'Abstract: {f["abstract"]} Title: {f["title"]}',
        "LaMP-7": lambda: f'Tweet: {f["text"]}',
    }
    return renderers[name]()


def with_context(prompt: str, task: str, retrieved: Sequence[ProfileItem] = (), profile_text: str = "") -> str:
    """Prepend retrieved history items (RAG) and/or a user profile text (PAG) to a prompt."""
    blocks = []
    if profile_text:
        blocks.append(f"User Profile: {profile_text.strip()}")
    if retrieved:
        history = "\n".join(render_item(task, item) for item in retrieved)
        blocks.append(f"User History:\n{history}")
    return "\n".join([*blocks, prompt]) if blocks else prompt


def retrieval_query(task: str, text: str) -> str:
    """The text BM25 should match against a user's history for this input."""
    parts = parse_input(task, text)
    if get_task(task).name == "LaMP-1" and parts.parsed:
        return " ".join([parts.title, *parts.options])
    return parts.body
