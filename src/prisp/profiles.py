"""PAG: a user profile text written by the base LLM from the user's history (Table 15 prompts), cached on
disk.

A profile is generated once per (model, task, user, history items, generation options) and stored as a small
JSON file under ``$PRISP_HOME/profiles``, so a benchmark that asks again (another method, another variant, a
resumed run) reads it instead of sampling it anew. Sampling is seeded per call and the caller's RNG state is
restored, so the same inputs give the same text whatever else the process did before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prisp.data.lamp import LampSplit, ProfileItem
from prisp.data.prompts import clip, render_item
from prisp.data.protocol import DEFAULT_K, recent_items
from prisp.data.tasks import get_task
from prisp.errors import DataError, PrispError
from prisp.generation import GenerationConfig, generate

_HISTORY = "{USER_HISTORY}"
# Table 15 of the paper, verbatim except the placeholder. LaMP-2N (news categorization, LaMP v1) is not in
# Table 15; its prompt is PAG's original news-category prompt in the same form as the movie-tag one.
PROFILE_PROMPTS: dict[str, str] = {
    "LaMP-1": (
        "Write a summary, in English, of the research interests and topics of a researcher who has "
        "published the following papers. Only generate the summary, no other text. User history: "
        f"{_HISTORY} Answer:"
    ),
    "LaMP-2": (
        "Look at the following past movies this user has watched and determine the most popular tag "
        "they labeled. Answer in the following form: most popular tag: <tag>. User History: "
        f"{_HISTORY} Answer:"
    ),
    "LaMP-2N": (
        "Look at the following past articles this journalist has written and determine the most "
        "popular category they write in. Answer in the following form: most popular category: "
        f"<category>. User History: {_HISTORY} Answer:"
    ),
    "LaMP-3": (
        "Based on this user's past reviews, what are the most common scores they give for positive "
        "and negative reviews? Answer in the following form: most common positive score: <most common "
        "positive score>, most common negative score: <most common negative score>. User History: "
        f"{_HISTORY} Answer:"
    ),
    "LaMP-4": (
        "Given this author's previous articles, try to describe a template for their headlines. I "
        "want to be able to accurately predict the headline given one of their articles. Be specific "
        f"about their style and wording, don't tell me anything generic. User History: {_HISTORY} "
        "Answer:"
    ),
    "LaMP-5": (
        "Given this author's previous publications, try to describe a template for their titles. I "
        "want to be able to accurately predict the title of one of the papers from the abstract. Only "
        f"generate the template description, nothing else. User History: {_HISTORY} Answer:"
    ),
    "LaMP-7": (
        "Given this person's previous tweets, try to describe a template for their tweets. I want to "
        "take a generic sentence and rephrase it to sound like one of their tweets, with the same "
        "style/punctuation/capitalization/wording/tone/etc. as them. Only give me the template "
        f"description, nothing else. User History: {_HISTORY} Answer:"
    ),
}
PROMPT_VERSION = 1  # bump when a prompt or the history rendering changes, so cached profiles are not reused


@dataclass(frozen=True)
class ProfileConfig:
    """How profiles are generated (every field is part of the cache key).

    Attributes:
        k: most recent history items shown to the LLM (paper: 10).
        max_new_tokens: length budget of the profile.
        temperature, top_p: sampling options (paper: 0.6 / 0.9).
        seed: seeds the sampling of every profile.
        item_chars: each history item field is clipped to this many characters, so ten items fit the prompt
            without the left-truncation of the generator cutting the instruction off.
        max_input_tokens: prompt budget of the generator.
    """

    k: int = DEFAULT_K
    max_new_tokens: int = 128
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0
    item_chars: int = 300
    max_input_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "item_chars", "max_input_tokens"):
            if getattr(self, name) < 1:
                raise DataError(f"profile option {name} must be at least 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise DataError(
                f"profile sampling needs temperature > 0 and 0 < top_p <= 1, got "
                f"{self.temperature} / {self.top_p}"
            )


@dataclass
class UserProfile:
    """One user's profile text and where it came from."""

    user: str
    text: str
    key: str
    items: list[str]
    seconds: float  # generation time of the run that produced it (also when read from the cache)
    cached: bool


def profile_prompt(task: str, items: Sequence[ProfileItem], item_chars: int = 300) -> str:
    """The Table 15 prompt for ``task`` with ``items`` rendered as the user history (one item per line)."""
    name = get_task(task).name
    if name not in PROFILE_PROMPTS:
        raise PrispError(f"PAG profiles (Table 15) exist for the LaMP tasks only, not for {name}; use np or rag")
    clipped = [
        ProfileItem(i.id, {k: clip(v, item_chars) for k, v in i.fields.items()}, i.date) for i in items
    ]
    history = "\n".join(render_item(name, item) for item in clipped)
    return PROFILE_PROMPTS[name].replace(_HISTORY, history)


def profile_key(
    model_name: str, task: str, user: str, items: Sequence[ProfileItem], config: ProfileConfig
) -> str:
    """Content hash of everything a profile depends on."""
    payload = {
        "model": model_name,
        "task": get_task(task).name,
        "user": user,
        "version": PROMPT_VERSION,
        "items": [item.to_json() for item in items],
        "config": asdict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class ProfileStore:
    """Profiles on disk: ``ROOT/<task>/<key>.json``; writes are atomic (temp file, then rename)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def default(cls) -> ProfileStore:
        """The store under ``$PRISP_HOME/profiles``."""
        from prisp.models import prisp_home

        return cls(prisp_home() / "profiles")

    def path(self, task: str, key: str) -> Path:
        return self.root / get_task(task).name / f"{key}.json"

    def get(self, task: str, key: str) -> dict | None:
        path = self.path(task, key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is regenerated rather than trusted

    def put(self, task: str, key: str, record: dict) -> None:
        from prisp.files import write_json_atomic

        write_json_atomic(self.path(task, key), record)


@contextlib.contextmanager
def _base_llm(model):
    """Run with any peft adapter switched off: profiles come from the base LLM, whatever is attached."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else contextlib.nullcontext():
        yield


def generate_profile(model, tokenizer, task: str, items: Sequence[ProfileItem], config: ProfileConfig) -> str:
    """Sample one profile text (seeded; the global RNG state is restored afterwards)."""
    prompt = profile_prompt(task, items, config.item_chars)
    gen = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        batch_size=1,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        max_input_tokens=config.max_input_tokens,
        first_line=False,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), _base_llm(model):
        torch.manual_seed(config.seed)
        text = generate(model, tokenizer, [prompt], gen).texts[0]
    return " ".join(text.split())  # one line: it is prepended to prompts


def user_profile(
    model,
    tokenizer,
    model_name: str,
    task: str,
    user: str,
    history: Sequence[ProfileItem],
    config: ProfileConfig = ProfileConfig(),
    store: ProfileStore | None = None,
) -> UserProfile:
    """The profile of one user from their ``config.k`` most recent items: read from ``store`` or generated.

    Raises:
        DataError: the history is empty.
    """
    if not history:
        raise DataError(f"user {user!r} has an empty history; PAG needs at least one item")
    items = recent_items(history, config.k)
    key = profile_key(model_name, task, user, items, config)
    record = store.get(task, key) if store else None
    if record is not None:
        return UserProfile(user, record["text"], key, record["items"], record["seconds"], cached=True)
    start = time.perf_counter()
    text = generate_profile(model, tokenizer, task, items, config)
    profile = UserProfile(user, text, key, [i.id for i in items], time.perf_counter() - start, cached=False)
    if store:
        store.put(
            task,
            key,
            {
                "user": user,
                "task": get_task(task).name,
                "model": model_name,
                "text": text,
                "items": profile.items,
                "seconds": profile.seconds,
                "config": asdict(config),
            },
        )
    return profile


def split_profiles(
    model,
    tokenizer,
    model_name: str,
    split: LampSplit,
    config: ProfileConfig = ProfileConfig(),
    store: ProfileStore | None = None,
    limit: int | None = None,
    on_user: Callable[[UserProfile], None] | None = None,
) -> dict[str, UserProfile]:
    """Profiles of every user who asks one of the first ``limit`` queries of ``split``, keyed by user."""
    profiles: dict[str, UserProfile] = {}
    for user, queries in split.users_asking(limit).items():
        if not queries[0].profile:  # nothing to summarise: the prompt simply gets no profile
            profiles[user] = UserProfile(user, "", "", [], 0.0, cached=False)
            continue
        profiles[user] = user_profile(
            model, tokenizer, model_name, split.task, user, queries[0].profile, config, store
        )
        if on_user:
            on_user(profiles[user])
    return profiles


def query_profiles(split: LampSplit, profiles: Mapping[str, UserProfile]) -> dict[str, str]:
    """``{query id: profile text}`` for :class:`prisp.predict.PredictConfig` ``profiles``."""
    return {
        q.id: profiles[user].text
        for user, queries in split.users.items()
        if user in profiles
        for q in queries
    }


def with_profiles(
    predict_config,
    model,
    tokenizer,
    model_name: str,
    split: LampSplit,
    config: ProfileConfig = ProfileConfig(),
    store: ProfileStore | None = None,
    on_user: Callable[[UserProfile], None] | None = None,
):
    """``predict_config`` with the PAG profiles its method needs (unchanged for methods without a profile).

    Profiles come from ``store`` (default: ``$PRISP_HOME/profiles``) or are generated by the base LLM (any
    adapter on ``model`` is switched off), for the users of the first ``predict_config.limit`` queries.
    """
    from dataclasses import replace

    from prisp.predict import METHODS

    if not METHODS[predict_config.method].profile:
        return predict_config
    found = split_profiles(
        model,
        tokenizer,
        model_name,
        split,
        config,
        store or ProfileStore.default(),
        predict_config.limit,
        on_user,
    )
    return replace(predict_config, profiles=query_profiles(split, found))
