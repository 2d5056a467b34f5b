"""Shared fixtures: a tiny random Llama and a tiny byte-level tokenizer, built in-process.

Test lanes are marked by what they cost: ``slow`` (the real default model), ``encoder`` (the real MiniLM
description/history encoder), ``ray`` (a local Ray cluster), ``kill`` (server processes SIGKILLed). Unmarked tests
form the fast lane. The cost guard
below fails any test that loads the real model or MiniLM without the mark, so the lanes stay true.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread avoids OpenMP oversubscription collapse.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COST_MARKS: set[str] = set()  # the marks of the test being set up or run


def pytest_runtest_setup(item):
    COST_MARKS.clear()
    COST_MARKS.update(mark.name for mark in item.iter_markers())


def _guarded(original, mark: str, what: str):
    def guard(*args, **kwargs):
        if mark not in COST_MARKS:
            pytest.fail(f"this test loads {what}: mark it @pytest.mark.{mark} (see tests/conftest.py)")
        return original(*args, **kwargs)

    return guard


def _install_cost_guards() -> None:
    import prisp.models
    from prisp.hypernet import encoders

    real_resolve = prisp.models.resolve_model
    # Only the models registered by the package are real; tests may register fake entries of their own.
    real_names = frozenset(prisp.models.REGISTRY)

    def resolve(name_or_path, *args, **kwargs):
        # Checked before resolving: resolving a registered model converts it (tens of seconds) the first time.
        if str(name_or_path) in real_names and "slow" not in COST_MARKS:
            pytest.fail(f"this test loads the real model {name_or_path!r}: mark it @pytest.mark.slow")
        return real_resolve(name_or_path, *args, **kwargs)

    prisp.models.resolve_model = resolve
    encoders.MiniLMEncoder.__init__ = _guarded(encoders.MiniLMEncoder.__init__, "encoder", "the real MiniLM encoder")


_install_cost_guards()

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Generate a headline for the following article. Article: The council approved the budget. Headline:",
    "Which category does this article relate to among the following categories? politics sports world news",
    "Generate a title for the following abstract of a paper. Abstract: We study neural models. Title:",
    "For an author who has written the paper with the title, which reference is related? [1] [2]",
    "What is the score of the following review on a scale of 1 to 5? 1 2 3 4 5",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"()[]{}-_&/",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) with a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    """A random LlamaForCausalLM small enough to train a few steps in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny model directory, usable anywhere prisp takes ``--model``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep tests out of the user's ~/.cache/prisp; one home per session so the real model converts once."""
    home = os.environ.get("PRISP_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "prisp-home")
    monkeypatch.setenv("PRISP_HOME", home)


@pytest.fixture(scope="session")
def tiny_hypernet_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A small hypernetwork checkpoint for the tiny model, with the base-model description encoder (no MiniLM)
    and random weights large enough that its anchors depend on the description (a fresh net's B is 0)."""
    from prisp.adapters.weights import shapes_for_model
    from prisp.hypernet.checkpoint import HyperNetCheckpoint, save_checkpoint
    from prisp.hypernet.model import HyperNet, HyperNetConfig
    from prisp.models import load_model

    model = load_model(str(tiny_model_dir)).model
    torch.manual_seed(0)
    net = HyperNet(HyperNetConfig.for_shapes(model.config.hidden_size, shapes_for_model(model), task_dim=8,
                                             pos_dim=4, hidden_dim=16, num_blocks=1, head_in_dim=8))
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.05)
    return save_checkpoint(HyperNetCheckpoint(net, base_model="tiny", encoder="base"),
                           tmp_path_factory.mktemp("tiny-hypernet") / "hypernet")
