"""Importing Text-to-LoRA's published checkpoint layout (``hypermod.pt`` + ``args.yaml``).

The checkpoints are built here from T2L's key names and shapes (written out explicitly below, as read in
T2L's ``hyper_modulator.py``), at tiny sizes that fit the tiny Llama of conftest (2 layers, q_proj 32->32,
v_proj 32->16). A functional forward pass written from the same reading checks our module.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, load_adapter
from prisp.cli import app
from prisp.errors import AdapterError
from prisp.hypernet.t2l_import import T2LAnchorer, T2LEncoder, add_full_stop, load_t2l, pooling_for

E, D, H, R = 32, 16, 8, 4  # embedding (tiny Llama hidden size), latent, head input, LoRA rank
MODULES = {"q_proj": (32, 32), "v_proj": (32, 16)}
runner = CliRunner()


def t2l_state(layers: int = 2, seed: int = 0, head_bias: bool = True) -> dict[str, torch.Tensor]:
    """A T2L SFT ``hypermod.state_dict()`` with random values: every key and shape T2L saves."""
    shapes = {"task_encoder.mlp.0.weight": (D // 2, E), "task_encoder.mlp.0.bias": (D // 2,),
              "task_encoder.mlp.1.weight": (D // 2,), "task_encoder.mlp.1.bias": (D // 2,),
              "layer_depth_encoder.0.weight": (layers, D // 4), "layer_depth_encoder.1.weight": (D // 4,),
              "layer_depth_encoder.1.bias": (D // 4,), "layer_type_encoder.0.weight": (len(MODULES), D // 4),
              "layer_type_encoder.1.weight": (D // 4,), "layer_type_encoder.1.bias": (D // 4,),
              "mixer.1.weight": (4 * D, D), "mixer.1.bias": (4 * D,), "mixer.4.weight": (D, 4 * D), "mixer.4.bias": (D,),
              "mlp3.0.weight": (D,), "mlp3.0.bias": (D,), "mlp3.1.weight": (4 * D, D), "mlp3.1.bias": (4 * D,),
              "mlp3.4.weight": (H, 4 * D), "mlp3.4.bias": (H,)}
    for block in ("mlp1", "mlp2"):
        shapes |= {f"{block}.mlp.0.weight": (D,), f"{block}.mlp.0.bias": (D,), f"{block}.mlp.1.weight": (4 * D, D),
                   f"{block}.mlp.1.bias": (4 * D,), f"{block}.mlp.4.weight": (D, 4 * D), f"{block}.mlp.4.bias": (D,)}
    for name, (d_in, d_out) in MODULES.items():
        shapes[f"heads.{name}.weight"] = (R * (d_in + d_out), H)
        if head_bias:
            shapes[f"heads.{name}.bias"] = (R * (d_in + d_out),)
        for group in ("AB_offset", "mean_recon_target", "std_recon_target"):
            shapes |= {f"{group}.A.{name}": (layers, R, d_in), f"{group}.B.{name}": (layers, d_out, R)}
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * 0.3 + (1.0 if len(s) == 1 and ".weight" in k else 0.0)
            for k, s in shapes.items()}


def reference(state: dict, emb: torch.Tensor, name: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T2L's SFT forward for one module type, as plain functions of its state dict: (A [L,r,in], B [L,out,r])."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], state[f"{p}.weight"], state[f"{p}.bias"])

    def lin(x, p):
        return F.linear(x, state[f"{p}.weight"], state.get(f"{p}.bias"))

    L = state["layer_depth_encoder.0.weight"].shape[0]
    task = ln(lin(emb.reshape(1, -1), "task_encoder.mlp.0"), "task_encoder.mlp.1").expand(L, -1)
    depth = ln(state["layer_depth_encoder.0.weight"], "layer_depth_encoder.1")
    kind = ln(state["layer_type_encoder.0.weight"][index], "layer_type_encoder.1").expand(L, -1)
    x = F.silu(lin(F.silu(lin(torch.cat([task, depth, kind], -1), "mixer.1")), "mixer.4"))
    for block in ("mlp1", "mlp2"):
        x = x + F.silu(lin(F.silu(lin(ln(x, f"{block}.mlp.0"), f"{block}.mlp.1")), f"{block}.mlp.4"))
    out = lin(F.silu(lin(F.silu(lin(ln(x, "mlp3.0"), "mlp3.1")), "mlp3.4")), f"heads.{name}")
    d_in, d_out = MODULES[name]
    A = out[:, : R * d_in].reshape(L, R, d_in) + state[f"AB_offset.A.{name}"]
    B = out[:, R * d_in:].reshape(L, R, d_out).transpose(1, 2) + state[f"AB_offset.B.{name}"]
    return A, B


def write_t2l(path: pathlib.Path, model_dir, state=None, peft_config: bool = True, **args) -> pathlib.Path:
    """A T2L directory: hypermod.pt (torch.save of a state dict), args.yaml, adapter_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(t2l_state() if state is None else state, path / "hypermod.pt")
    base = {"model_dir": str(model_dir), "emb_model": "", "target_modules": list(MODULES), "training_task": "sft",
            "exp_setup": "hyper_lora", "encoder_type": "linear", "shared_AB_head": False, "autoreg_gen": False,
            "learnable_pos_emb": False, "use_one_hot_task_emb": False, "hypernet_latent_size": D,
            "head_in_size": H, "mt_lora_path": None, "pred_z_score": True, "lr": 2.5e-5}
    (path / "args.yaml").write_text(yaml.safe_dump({**base, **args}), encoding="utf-8")
    if peft_config:
        LoraSpec(r=R, alpha=2 * R, target_modules=tuple(MODULES)).to_peft_config(str(model_dir)).save_pretrained(path)
    return path


def test_module_reproduces_t2l_forward_layout_and_module_order(tiny_model_dir, tmp_path):
    state = t2l_state()
    checkpoint = load_t2l(write_t2l(tmp_path / "t2l", tiny_model_dir, state))
    assert set(checkpoint.hypernet.state_dict()) == {k for k in state if "recon_target" not in k}
    assert checkpoint.base_model == str(tiny_model_dir) and checkpoint.pooling == "last_token"
    assert checkpoint.config.spec == LoraSpec(r=R, alpha=8, dropout=0.05, target_modules=tuple(MODULES))
    emb = torch.randn(E)
    weights = checkpoint.hypernet.to_lora_weights(emb)
    assert sorted(weights.pairs) == [(layer, m) for layer in range(2) for m in sorted(MODULES)]
    for index, name in enumerate(MODULES):
        A, B = reference(state, emb, name, index)
        for layer in range(2):
            pair = weights.pairs[(layer, name)]
            assert pair.A.dtype == pair.B.dtype == torch.float32
            assert pair.A.shape == (R, MODULES[name][0]) and pair.B.shape == (MODULES[name][1], R)
            torch.testing.assert_close(pair.A, A[layer], rtol=0, atol=1e-5)
            torch.testing.assert_close(pair.B, B[layer], rtol=0, atol=1e-5)
    swapped = load_t2l(tmp_path / "t2l", module_order=["v_proj", "q_proj"]).hypernet.to_lora_weights(emb)
    torch.testing.assert_close(swapped.pairs[(0, "q_proj")].A, reference(state, emb, "q_proj", 1)[0][0], rtol=0,
                               atol=1e-5)
    assert not torch.equal(swapped.pairs[(0, "q_proj")].A, weights.pairs[(0, "q_proj")].A)
    with pytest.raises(AdapterError, match="not a permutation"):
        load_t2l(tmp_path / "t2l", module_order=["q_proj"])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_cli_anchor_from_t2l_loads_in_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = t2l_state(seed=1)
    src = write_t2l(tmp_path / "t2l", tiny_model_dir, state)
    out = tmp_path / "anchor"
    result = runner.invoke(app, ["anchor", "--t2l", str(src), "--description", "Summarise the article in one line",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote anchor" in result.stdout and json.loads((out / "t2l_anchor.json").read_text())["emb_model"] == ""
    written = load_adapter(out)
    anchorer = T2LAnchorer.load(src)  # model and encoder default to args.yaml's model_dir
    emb = anchorer.encoder.encode(["Summarise the article in one line"])[0]
    assert torch.equal(anchorer.generate("Summarise the article in one line").weights.pairs[(1, "v_proj")].B,
                       anchorer.generate("Summarise the article in one line").weights.pairs[(1, "v_proj")].B)
    for index, name in enumerate(MODULES):
        A, B = reference(state, emb, name, index)
        torch.testing.assert_close(written.pairs[(1, name)].A, A[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(written.pairs[(1, name)].B, B[1], rtol=0, atol=1e-5)
    # Plain peft applies it with T2L's scale: alpha / sqrt(r) (rsLoRA) times B @ A on every target module.
    ids = torch.randint(3, 200, (1, 7))
    merged = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for (layer, name), pair in written.pairs.items():
            getattr(merged.model.layers[layer].self_attn, name).weight += 8 / R ** 0.5 * pair.B @ pair.A
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_encoder_formatting_pooling_and_defaults_without_peft_config(tiny_model_dir, tmp_path):
    assert add_full_stop("  Summarise the text ") == "Summarise the text." and add_full_stop("Why?") == "Why?"
    assert pooling_for("Alibaba-NLP/gte-large-en-v1.5") == "cls" and pooling_for("") == "last_token"
    cls_emb = T2LEncoder(tiny_model_dir, "cls").encode(["Translate to French"])
    last_emb = T2LEncoder(tiny_model_dir, "last_token").encode(["Translate to French"])
    assert not torch.allclose(cls_emb, last_emb)
    torch.testing.assert_close(last_emb.norm(dim=-1), torch.tensor([E ** 0.5]))  # L2-normalised times sqrt(dim)
    src = write_t2l(tmp_path / "t2l", tiny_model_dir, peft_config=False, emb_model="tiny/gte-tiny")
    anchorer = T2LAnchorer.load(src, encoder_dir=tiny_model_dir)
    assert anchorer.encoder.pooling == "cls" and anchorer.checkpoint.config.spec.alpha == 2 * R
    assert any("T2L's defaults" in note for note in anchorer.notes)


class _Marker:
    """Unpickling this would create a file: proof that no arbitrary object is ever built."""

    path = None

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _pickled_object(src, state, tmp_path):
    _Marker.path = tmp_path / "pwned"
    torch.save({**state, "evil": _Marker()}, src / "hypermod.pt")


def _truncated(src, state, tmp_path):
    data = (src / "hypermod.pt").read_bytes()
    (src / "hypermod.pt").write_bytes(data[: len(data) // 2])


def _mutate_state(change):
    def mutate(src, state, tmp_path):
        change(state)
        torch.save(state, src / "hypermod.pt")
    return mutate


def _mutate_args(**changes):
    def mutate(src, state, tmp_path):
        args = yaml.safe_load((src / "args.yaml").read_text())
        (src / "args.yaml").write_text(yaml.safe_dump({**args, **changes}))
    return mutate


REFUSALS = {
    "missing args.yaml": (lambda src, state, tmp: (src / "args.yaml").unlink(), "has no args.yaml"),
    "malformed args.yaml": (lambda src, state, tmp: (src / "args.yaml").write_text("model_dir: [oops\n"),
                            "is not valid YAML"),
    "missing hypermod.pt": (lambda src, state, tmp: (src / "hypermod.pt").unlink(), "has no hypermod.pt"),
    "pickled object": (_pickled_object, "holds pickled Python objects"),
    "truncated weights": (_truncated, "not a complete torch checkpoint"),
    "missing key": (_mutate_state(lambda s: s.pop("mixer.4.weight")), "lacks mixer.4.weight"),
    "unexpected key": (_mutate_state(lambda s: s.update({"pos_emb.0.weight": torch.zeros(2)})),
                       "unexpected tensor pos_emb.0.weight"),
    "tampered head shape": (_mutate_state(lambda s: s.update({"heads.q_proj.weight": torch.zeros(3, H)})),
                            "heads.q_proj.weight has shape [3, 8]"),
    "non-finite values": (_mutate_state(lambda s: s["mlp3.1.weight"].fill_(float("nan"))), "not finite"),
    "other layer count": (_mutate_state(lambda s: s.update(t2l_state(layers=3))),
                          "made for 3 layers but the base model has 2"),
    "recon checkpoint": (_mutate_args(training_task="recon"), "training_task='recon' is not supported"),
    "encoder dim": (_mutate_args(emb_model="Alibaba-NLP/gte-large-en-v1.5"), "pass --encoder-dir"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refuses_bad_checkpoints_with_one_line_and_no_output(tiny_model_dir, tmp_path, case):
    mutate, needle = REFUSALS[case]
    state = t2l_state()
    src = write_t2l(tmp_path / "t2l", tiny_model_dir, state)
    mutate(src, state, tmp_path)
    out = tmp_path / "anchor"
    result = runner.invoke(app, ["anchor", "--t2l", str(src), "--model", str(tiny_model_dir), "--description",
                                 "Summarise the article.", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prisp: error: ") and needle in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".anchor*"))
    assert not (tmp_path / "pwned").exists()
