"""Adapters: peft naming, scale, the bridge (B C A), fold/export, atomic safetensors I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from prisp.adapters import (
    LoraSpec,
    LoraWeights,
    add_bridge,
    attach_lora,
    bridge_params,
    extract_weights,
    fold_bridge,
    load_adapter,
    random_init,
    remove_bridge,
    save_adapter,
    set_trainable,
    shapes_for_config,
    shapes_for_model,
)
from prisp.adapters import io as adapter_io
from prisp.errors import AdapterError
from prisp.training import TokenizedExample, TrainConfig, train

VOCAB = 128
D_MODEL, D_KV = 32, 16  # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads x head_dim 8)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def anchor_weights(seed: int = 1) -> LoraWeights:
    """A LoRA with non-zero B, so the bridge and A actually matter."""
    weights = random_init(tiny_config(), LoraSpec(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    for pair in weights.pairs.values():
        pair.B = 0.05 * torch.randn(pair.B.shape, generator=generator)
    return weights


@pytest.fixture()
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))  # [b, T]


def examples(n: int = 8, seed: int = 3) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (10,), generator=generator).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 6 + ids[6:]))
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_spec_scale_and_peft_config():
    spec = LoraSpec()
    assert spec.scale == pytest.approx(16 / math.sqrt(8)) and round(spec.scale, 3) == 5.657
    assert LoraSpec(use_rslora=False).scale == 2.0
    config = spec.to_peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (8, 16, 0.05, True)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.bias == "none"
    assert config.task_type == "CAUSAL_LM"
    with pytest.raises(AdapterError, match="dropout"):
        LoraSpec(dropout=1.5)


def test_random_init_is_peft_like_and_seeded():
    model = tiny_model()
    assert shapes_for_model(model) == shapes_for_config(tiny_config())
    assert shapes_for_model(model)[(1, "v_proj")] == (D_MODEL, D_KV)
    a, b = random_init(model, LoraSpec(), seed=5), random_init(tiny_config(), LoraSpec(), seed=5)
    for key, pair in a.pairs.items():
        assert torch.equal(pair.A, b.pairs[key].A) and not pair.B.any()
        assert pair.A.abs().max() <= 1 / math.sqrt(D_MODEL)  # kaiming-uniform(a=sqrt 5) bound
    other = random_init(model, LoraSpec(), seed=6)
    assert not torch.equal(a.pairs[(0, "q_proj")].A, other.pairs[(0, "q_proj")].A)


def test_peft_state_dict_naming_round_trips():
    weights = anchor_weights()
    peft_model = attach_lora(tiny_model(), weights)
    ours, theirs = weights.to_peft_state_dict(), get_peft_model_state_dict(peft_model)
    assert ours.keys() == theirs.keys()
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = LoraWeights.from_peft_state_dict(theirs, weights.spec)
    assert back.pairs.keys() == weights.pairs.keys()
    assert extract_weights(peft_model).spec == weights.spec


def test_attached_lora_applies_scale_times_BA(input_ids):
    """Same logits as merging W + (alpha/sqrt r) B A by hand: one scaling convention."""
    weights = anchor_weights()
    merged = tiny_model()
    with torch.no_grad():
        for layer, name in weights.pairs:
            linear = getattr(merged.model.layers[layer].self_attn, name)
            pair = weights.pairs[(layer, name)]
            linear.weight += weights.spec.scale * pair.B @ pair.A  # [out, in]
    peft_model = attach_lora(tiny_model(), weights)
    assert not peft_model.training  # keeps the base model's eval mode
    torch.testing.assert_close(logits(peft_model, input_ids), logits(merged, input_ids), atol=1e-5, rtol=0)


def test_identity_bridge_reproduces_anchor_exactly(input_ids):
    peft_model = attach_lora(tiny_model(), anchor_weights())
    before = logits(peft_model, input_ids)
    cs = add_bridge(peft_model)
    assert len(cs) == 4 and all(torch.equal(c, torch.eye(8)) for c in cs)
    assert torch.equal(logits(peft_model, input_ids), before)
    with pytest.raises(AdapterError, match="already has a bridge"):
        add_bridge(peft_model)


def _factors(peft_model) -> dict[str, dict[str, torch.Tensor]]:
    """Snapshot of A, B (raw) and C per module, plus all non-LoRA weights."""
    snap: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "C": {}, "base": {}}
    for name, param in peft_model.named_parameters():
        kind = (
            "A" if "lora_A" in name else "C" if name.endswith(".C")
            else "B" if "lora_B" in name else "base"
        )
        snap[kind][name] = param.detach().clone()
    return snap


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool | None:
    """True if every tensor changed, False if none did; None (fail) for a mix or none present."""
    flags = {not torch.equal(before[k], after[k]) for k in before}
    return flags.pop() if len(flags) == 1 else None


# strategy: (bridge, train_A, train_B, train_C, per-module trainable count (d_in, d_out, r))
STRATEGIES = {
    "prisp": (True, False, True, True, lambda i, o, r: o * r + r * r),
    "no-bridge": (False, False, True, False, lambda i, o, r: o * r),
    "bridge-only": (True, False, False, True, lambda i, o, r: r * r),
    "full-lora": (False, True, True, False, lambda i, o, r: r * (i + o)),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_only_intended_factors_train(strategy):
    bridge, train_A, train_B, train_C, formula = STRATEGIES[strategy]
    peft_model = attach_lora(tiny_model(), anchor_weights())
    if bridge:
        add_bridge(peft_model)
    peft_model.set_adapter("default")  # the pitfall: this re-enables grads on every LoRA weight
    params = set_trainable(peft_model, train_A, train_B, train_C)
    assert [p for p in peft_model.parameters() if p.requires_grad] == params
    expected = sum(formula(i, o, 8) for i, o in shapes_for_config(tiny_config()).values())
    before = _factors(peft_model)
    config = TrainConfig(batch_size=4, lr=1e-2, warmup_ratio=0.0, progress=False)
    result = train(peft_model, params, examples(), config)
    assert result.trainable_params == expected and result.steps == 2
    after = _factors(peft_model)
    assert _changed(before["A"], after["A"]) is train_A
    assert _changed(before["B"], after["B"]) is train_B
    assert _changed(before["base"], after["base"]) is False
    if bridge:
        assert _changed(before["C"], after["C"]) is train_C
    else:
        assert not before["C"] and not bridge_params(peft_model)


def test_set_trainable_errors():
    peft_model = attach_lora(tiny_model(), anchor_weights())
    with pytest.raises(AdapterError, match="add_bridge"):
        set_trainable(peft_model, False, True, True)
    with pytest.raises(AdapterError, match="no trainable"):
        set_trainable(peft_model, False, False, False)


def _trained_bridged_model():
    peft_model = attach_lora(tiny_model(), anchor_weights())
    add_bridge(peft_model)
    params = set_trainable(peft_model, False, True, True)
    train(peft_model, params, examples(), TrainConfig(batch_size=4, lr=5e-2, progress=False))
    assert not torch.equal(bridge_params(peft_model)[0], torch.eye(8))
    return peft_model.eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_fold_export_loads_in_plain_peft(tmp_path, input_ids):
    peft_model = _trained_bridged_model()
    expected = logits(peft_model, input_ids)
    folded = fold_bridge(peft_model)
    for (layer, name), pair in folded.pairs.items():
        lora_B = getattr(peft_model.base_model.model.model.layers[layer].self_attn, name).lora_B["default"]
        raw_B, C = lora_B.parametrizations.weight.original, lora_B.parametrizations.weight[0].C
        assert torch.equal(pair.B, raw_B @ C)
    out = save_adapter(folded, tmp_path / "user-adapter", base_model_name="tiny-llama")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["use_rslora"] is True and config["base_model_name_or_path"] == "tiny-llama"
    plain = PeftModel.from_pretrained(tiny_model(), str(out)).eval()
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    weights = anchor_weights()
    loaded = load_adapter(save_adapter(weights, tmp_path / "a", base_model_name="tiny"))
    assert loaded.spec == weights.spec and loaded.pairs.keys() == weights.pairs.keys()
    for key, pair in weights.pairs.items():
        assert torch.equal(loaded.pairs[key].A, pair.A) and torch.equal(loaded.pairs[key].B, pair.B)


def test_remove_bridge_folds_in_place(input_ids):
    peft_model = _trained_bridged_model()
    expected, folded = logits(peft_model, input_ids), fold_bridge(peft_model)
    remove_bridge(peft_model)
    assert not bridge_params(peft_model)
    torch.testing.assert_close(logits(peft_model, input_ids), expected, atol=1e-6, rtol=0)
    plain = extract_weights(peft_model)
    assert all(torch.equal(plain.pairs[k].B, folded.pairs[k].B) for k in folded.pairs)


def test_save_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    first = anchor_weights(seed=1)
    save_adapter(first, out, base_model_name="tiny")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(anchor_weights(seed=2), out, base_model_name="tiny")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp or backup dir left
    monkeypatch.undo()
    save_adapter(anchor_weights(seed=2), out, base_model_name="tiny")  # replacing works
    key = (0, "q_proj")
    assert torch.equal(load_adapter(out).pairs[key].B, anchor_weights(seed=2).pairs[key].B)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_save_refuses_to_clobber_other_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="refusing to overwrite"):
        save_adapter(anchor_weights(), tmp_path, base_model_name="tiny")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_check_fits_wrong_shape_missing_and_extra_layer():
    model = tiny_model()
    weights = anchor_weights()
    weights.check_fits(model)
    weights.pairs[(1, "q_proj")].A = torch.zeros(8, 64)
    with pytest.raises(AdapterError) as exc:
        weights.check_fits(model)
    assert _one_line(exc) == (
        "adapter does not fit the base model: layer 1 q_proj A is [8, 64], model expects [8, 32]"
    )

    weights = anchor_weights()
    del weights.pairs[(1, "v_proj")]
    with pytest.raises(AdapterError) as exc:
        attach_lora(model, weights)
    assert "layer 1 v_proj is missing from the adapter" in _one_line(exc)

    weights = anchor_weights()
    weights.pairs[(5, "q_proj")] = weights.pairs[(0, "q_proj")]
    with pytest.raises(AdapterError) as exc:
        weights.check_fits(model)
    assert "layer 5 q_proj is not in the model" in _one_line(exc)


def test_load_adapter_errors(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    good = save_adapter(anchor_weights(), tmp_path / "good", base_model_name="tiny")

    (tmp_path / "noconf").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path / "noconf")

    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        load_adapter(good)
    (good / "adapter_config.json").write_text(json.dumps(config))

    (good / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt") as exc:
        load_adapter(good)
    _one_line(exc)

    (good / "adapter_model.safetensors").unlink()
    (good / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled weights are never loaded"):
        load_adapter(good)


def test_shared_copy_shares_storage_but_not_flags_and_owns_what_it_is_told():
    from conftest import build_tiny_llama

    from prisp.adapters import shared_copy

    base = build_tiny_llama(64)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    flags = [p.requires_grad for p in base.parameters()]
    view = shared_copy(base, own_modules=("q_proj",))
    named = dict(base.named_parameters())
    for name, param in view.named_parameters():
        assert not param.requires_grad and param is not named[name]
        shared = param.data_ptr() == named[name].data_ptr()
        assert shared != name.endswith("q_proj.weight"), name  # q_proj owned, the rest views
        assert torch.equal(param, named[name])
    assert [p.requires_grad for p in base.parameters()] == flags
    with torch.no_grad():
        view.model.layers[0].self_attn.q_proj.weight.add_(1.0)  # an owned weight: the base does not see it
    assert not torch.equal(view.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([[1, 2, 3]])
    plain = shared_copy(base)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # ties survive
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, base(input_ids=ids).logits)
