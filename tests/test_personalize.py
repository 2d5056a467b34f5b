"""Stage 2: strategy invariants, exact export, cost accounting, examples and the personalize CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from peft import PeftModel
from typer.testing import CliRunner

from prisp.adapters import (
    LoraPair,
    LoraSpec,
    LoraWeights,
    attach_lora,
    bridge_params,
    extract_weights,
    load_adapter,
    random_init,
    save_adapter,
    shapes_for_model,
)
from prisp.cli import SAMPLE_DIR, app
from prisp.data.examples import item_example, query_examples, user_examples
from prisp.data.lamp import Query, load_task_split
from prisp.errors import AdapterError, DataError, PrispError
from prisp.personalize import STRATEGIES, PersonalizeConfig, personalization_hyperparams, personalize
from prisp.personalize.cache import AdapterCache
from prisp.personalize.hyperparams import TUNED
from prisp.personalize.personalizer import _calibration, _prepare
from prisp.training import TrainConfig, tokenize_examples, train
from prisp.training.loop import _decoder_and_head

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer), seed=3)


@pytest.fixture(scope="module")
def anchor(base):
    """A non-trivial anchor (B != 0), so every factor's change is visible in the output."""
    weights = random_init(base, LoraSpec(), seed=1)
    gen = torch.Generator().manual_seed(2)
    pairs = {k: LoraPair(p.A, torch.randn(p.B.shape, generator=gen) * 0.05) for k, p in weights.pairs.items()}
    return LoraWeights(weights.spec, pairs)


@pytest.fixture(scope="module")
def history():
    return load_task_split(SAMPLE_DIR, "LaMP-4", "dev").queries[0].profile


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _run(base, tokenizer, anchor, history, strategy):
    config = PersonalizeConfig(strategy=strategy, lr=5e-2, progress=False, batch_size=4)
    return personalize(base, tokenizer, anchor, "LaMP-4", history, config)


def test_bridge_at_identity_reproduces_the_anchor_exactly(base, anchor):
    expected = _logits(attach_lora(copy.deepcopy(base), anchor).eval(), IDS)
    for name in ("prisp", "bridge-only"):
        model, _, _ = _prepare(base, anchor, STRATEGIES[name], seed=0)
        assert torch.equal(_logits(model.eval(), IDS), expected)


def _svd_start(base, anchor, tokenizer, history, strategy, seed=0):
    tokenized = tokenize_examples(tokenizer, user_examples("LaMP-4", history).examples, 512)
    calibrate = _calibration(tokenized, TrainConfig(batch_size=4, micro_batch_size=2), tokenizer.pad_token_id)
    model, params, offset = _prepare(base, anchor, STRATEGIES[strategy], seed=seed, calibrate=calibrate)
    return model, params, offset


@pytest.mark.parametrize("strategy", ["pissa", "lora-ga"])
def test_svd_starts_leave_the_model_where_the_base_is(base, tiny_tokenizer, anchor, history, strategy):
    """The residual weight plus the initial LoRA is the base weight: step 0 answers as the base model does,
    and the offset stacked onto the export is the start with B negated. The anchor's weights play no part."""
    model, params, offset = _svd_start(base, anchor, tiny_tokenizer, history, strategy)
    torch.testing.assert_close(_logits(model.eval(), IDS), _logits(base, IDS), atol=1e-5, rtol=1e-5)
    start = extract_weights(model)
    assert len(params) == 2 * len(anchor.pairs)  # A and B of every targeted module
    for key, pair in start.pairs.items():
        assert torch.equal(offset.pairs[key].A, pair.A) and torch.equal(offset.pairs[key].B, -pair.B)
        assert not torch.equal(pair.A, anchor.pairs[key].A)


def test_pissa_starts_from_the_principal_singular_components(base, tiny_tokenizer, anchor, history):
    model, _, _ = _svd_start(base, anchor, tiny_tokenizer, history, "pissa")
    start, scale, r = extract_weights(model), anchor.spec.scale, anchor.spec.r
    weights = dict(base.named_parameters())
    for (layer, name), pair in start.pairs.items():
        W = weights[f"model.layers.{layer}.self_attn.{name}.weight"].detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(scale * pair.B @ pair.A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-4,
                                   rtol=1e-4)


def test_lora_ga_starts_from_the_users_own_gradients(base, tiny_tokenizer, anchor, history):
    """Seeded and per user: the same items give the same start, another user's items another; no items, no
    LoRA-GA."""
    first = extract_weights(_svd_start(base, anchor, tiny_tokenizer, history, "lora-ga")[0])
    again = extract_weights(_svd_start(base, anchor, tiny_tokenizer, history, "lora-ga")[0])
    other_items = [dataclasses.replace(item, fields={k: v[::-1] for k, v in item.fields.items()}) for item in history]
    other = extract_weights(_svd_start(base, anchor, tiny_tokenizer, other_items, "lora-ga")[0])
    for key, pair in first.pairs.items():
        assert torch.equal(pair.A, again.pairs[key].A) and torch.equal(pair.B, again.pairs[key].B)
        assert not torch.allclose(pair.A.abs(), other.pairs[key].A.abs(), atol=1e-3)
    with pytest.raises(PrispError, match="calibration gradients"):
        _prepare(base, anchor, STRATEGIES["lora-ga"], seed=0)


def test_strategies_that_stack_a_lora_grow_the_rank():
    assert [s.name for s in STRATEGIES.values() if s.grows_rank] == ["oppu", "pissa", "lora-ga"]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_base_model_is_never_modified(base, tiny_tokenizer, anchor, history, strategy):
    """Users share the base's weights (``shared_copy``): neither training nor OPPU's merge may write them."""
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    result = _run(base, tiny_tokenizer, anchor, history, strategy)
    assert all(torch.equal(t, before[k]) for k, t in base.state_dict().items())
    assert [p.requires_grad for p in base.parameters()] == flags
    assert result.train.steps > 0


@pytest.mark.parametrize("strategy", ["prisp", "full-lora", "no-bridge", "bridge-only"])
def test_only_the_intended_factors_change(base, tiny_tokenizer, anchor, history, strategy):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = _run(base, tiny_tokenizer, anchor, history, strategy)
    spec = STRATEGIES[strategy]
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), f"base weight {name} changed"
    raw_B, raw_A = {}, {}
    for name, param in result.model.named_parameters():
        if "lora_A" in name:
            raw_A[name] = param
        elif "lora_B" in name and not name.endswith(".C"):
            raw_B[name] = param
    assert len(raw_A) == len(raw_B) == len(anchor.pairs)
    anchor_A = [p.A for _, p in sorted(anchor.pairs.items())]
    anchor_B = [p.B for _, p in sorted(anchor.pairs.items())]
    a_same = [torch.equal(a, b) for a, b in zip(raw_A.values(), anchor_A)]
    b_same = [torch.equal(a, b) for a, b in zip(raw_B.values(), anchor_B)]
    assert all(a_same) != spec.train_A and all(b_same) != spec.train_B
    if spec.train_A:
        assert not any(a_same)
    if spec.train_B:
        assert not any(b_same)
    bridges = bridge_params(result.model)
    assert bool(bridges) == spec.bridge
    eye = torch.eye(anchor.spec.r)
    assert all(not torch.equal(c, eye) for c in bridges) == spec.train_C or not spec.bridge
    if spec.bridge and not spec.train_C:
        assert all(torch.equal(c, eye) for c in bridges)
    if not spec.train_A:  # the exported adapter keeps the anchor's A bit for bit
        assert all(torch.equal(result.weights.pairs[k].A, anchor.pairs[k].A) for k in anchor.pairs)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_trainable_counts_follow_the_appendix_d_formula(base, tiny_tokenizer, anchor, history, strategy):
    result = _run(base, tiny_tokenizer, anchor, history, strategy)
    r = anchor.spec.r
    expected = sum(STRATEGIES[strategy].trainable_formula(d_in, d_out, r)
                   for d_in, d_out in shapes_for_model(base).values())
    assert result.train.trainable_params == expected
    assert result.train.seconds > 0 and len(result.train.losses) == result.train.steps


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_exported_adapter_in_plain_peft_reproduces_the_trained_model(base, tiny_tokenizer, anchor, history,
                                                                      strategy, tmp_path):
    result = _run(base, tiny_tokenizer, anchor, history, strategy)
    trained = _logits(result.model, IDS)
    path = save_adapter(result.weights, tmp_path / "adapter", "tiny")
    plain = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert torch.allclose(_logits(plain, IDS), trained, atol=1e-5)
    loaded = load_adapter(path)
    assert all(torch.equal(loaded.pairs[k].A, p.A) and torch.equal(loaded.pairs[k].B, p.B)
               for k, p in result.weights.pairs.items())
    # OPPU: anchor and user LoRA stacked; PiSSA / LoRA-GA: the initial offset and the trained LoRA.
    assert result.weights.spec.r == (16 if STRATEGIES[strategy].grows_rank else 8)


def test_personalization_is_seeded(base, tiny_tokenizer, anchor, history):
    first = _run(base, tiny_tokenizer, anchor, history, "prisp").weights
    second = _run(base, tiny_tokenizer, anchor, history, "prisp").weights
    assert all(torch.equal(first.pairs[k].B, second.pairs[k].B) for k in first.pairs)


def test_anchor_that_does_not_fit_is_refused(base, tiny_tokenizer, history):
    shapes = {k: (d_in * 2, d_out) for k, (d_in, d_out) in shapes_for_model(base).items()}
    with pytest.raises(AdapterError, match="does not fit the base model"):
        personalize(base, tiny_tokenizer, random_init(shapes, LoraSpec()), "LaMP-4", history)


def test_user_examples_plain_and_augmented_from_earlier_items_only(history):
    built = user_examples("LaMP-4", history, k=10)
    assert [i.id for i in built.items] == [i.id for i in history[-10:]]
    assert len(built.examples) == 10 + 9 and built.augmented == 9  # the oldest item has nothing earlier
    first_aug = built.examples[2]  # plain(0), plain(1), augmented(1)
    assert first_aug.prompt.startswith("User History:\n") and built.items[0].fields["title"] in first_aug.prompt
    for example in built.examples:
        assert example.prompt.endswith("Headline:")
    with_profile = user_examples("LaMP-4", history, k=3, profile_text="writes puns")
    assert with_profile.augmented == 3 and with_profile.examples[1].prompt.startswith("User Profile: writes puns")
    assert len(user_examples("LaMP-4", history, k=10, augment=False).examples) == 10
    with pytest.raises(DataError, match="history is empty"):
        user_examples("LaMP-4", [], k=10)


def test_item_examples_per_task():
    lamp1 = load_task_split(SAMPLE_DIR, "LaMP-1", "dev").queries[0].profile[0]
    ex = item_example("LaMP-1", lamp1)
    assert lamp1.fields["title"] in ex.prompt and ex.answer == lamp1.fields["abstract"][:600].strip() or \
        ex.answer.endswith("...")
    news = load_task_split(SAMPLE_DIR, "LaMP-2N", "dev")
    item = news.queries[0].profile[0]
    ex = item_example("LaMP-2N", item, ("politics", "sports"))
    assert ex.answer == item.fields["category"] and "categories: [politics, sports]" in ex.prompt
    with pytest.raises(DataError, match="needs golds"):
        query_examples("LaMP-4", [Query("q", "Generate a headline for the following article: x", ())])


def test_table7_hyperparameters():
    assert personalization_hyperparams("LaMP-4").lr == 5e-4 and personalization_hyperparams("LaMP-4").batch_size == 16
    assert personalization_hyperparams("LaMP-2N") == personalization_hyperparams("LaMP-2")
    assert personalization_hyperparams("LaMP_5").lr == 1e-6


# Table 7 of the paper, "PRISP (Ours)" (batch, epochs, lr), typed in from the paper, not read from the code.
PAPER_TABLE7 = {"LaMP-1": (16, 1, 2e-4), "LaMP-2": (16, 1, 1e-4), "LaMP-2N": (16, 1, 1e-4), "LaMP-3": (6, 1, 1e-4),
                "LaMP-4": (16, 1, 5e-4), "LaMP-5": (10, 1, 1e-6), "LaMP-7": (16, 1, 3e-6)}
SEARCHED = ("LaMP-1", "LaMP-2N", "LaMP-4", "LaMP-5")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_paper_schedule_is_table7_exactly(strategy):
    for task, (batch, epochs, lr) in PAPER_TABLE7.items():
        for config in (PersonalizeConfig(strategy=strategy), PersonalizeConfig(strategy=strategy, schedule="paper")):
            loop = config.train_config(task)
            assert (loop.batch_size, loop.epochs, loop.lr) == (batch, epochs, lr), task


def test_the_tuned_schedule_is_the_searchs_choice():
    """TUNED holds what bench/results/schedule_search.md chose, for every searched task and strategy."""
    report = Path(__file__).resolve().parents[1] / "bench/results/schedule_search.md"
    chosen = {}
    in_table = False
    for line in report.read_text().splitlines():
        in_table = in_table or line.startswith("## Chosen")
        cells = [c.strip() for c in line.strip("|").split("|")]
        if in_table and len(cells) == 7 and cells[0].startswith("LaMP"):
            factors = {f: float(v) for f, v in zip("BC", cells[5:]) if v != "–"}
            chosen[cells[0], cells[1]] = (int(cells[4]), int(cells[3]), float(cells[2]), factors)
    assert {(t, s) for t, s in chosen} == {(t, s) for t in SEARCHED for s in ("prisp", "oppu", "no-bridge",
                                                                             "bridge-only", "pissa", "lora-ga")}
    for (task, strategy), (batch, epochs, lr, factors) in chosen.items():
        config = PersonalizeConfig(strategy=strategy, schedule="tuned")
        loop = config.train_config(task)
        assert (loop.batch_size, loop.epochs, loop.lr) == (batch, epochs, lr), (task, strategy)
        assert config.factor_lrs(task) == factors, (task, strategy)
    assert personalization_hyperparams("LaMP-2N", "prisp", "tuned") == TUNED["prisp"]["LaMP-2N"]


def test_schedule_overrides_and_refusals():
    tuned = TUNED["prisp"]["LaMP-4"]
    loop = PersonalizeConfig(schedule="tuned", lr=0.5).train_config("LaMP-4")
    assert (loop.lr, loop.epochs, loop.batch_size) == (0.5, tuned.epochs, tuned.batch_size)
    with pytest.raises(PrispError, match="no tuned Stage-2 schedule for prisp on LaMP-7"):
        PersonalizeConfig(schedule="tuned").train_config("LaMP-7")
    with pytest.raises(PrispError, match="no tuned Stage-2 schedule for full-lora"):
        PersonalizeConfig(strategy="full-lora", schedule="tuned").train_config("LaMP-4")
    explicit = PersonalizeConfig(schedule="tuned", lr=0.1, epochs=2, batch_size=3).train_config("LaMP-7")
    assert (explicit.lr, explicit.epochs, explicit.batch_size) == (0.1, 2, 3)  # nothing left to look up
    with pytest.raises(PrispError, match="--schedule must be one of paper, tuned"):
        PersonalizeConfig(schedule="fast")
    with pytest.raises(PrispError, match="--lr-c must be positive, got -1"):
        PersonalizeConfig(lr_C=-1)


def test_factor_learning_rates_reach_their_factors(base, tiny_tokenizer, anchor, history):
    """The bridge's own rate applies to C alone, is recorded, and an explicit --lr drops a row's factor rates."""
    from prisp.personalize import get_strategy
    from prisp.personalize.personalizer import _factors

    assert _factors(get_strategy("prisp"), 6) == ["B", "C"] * 3
    assert _factors(get_strategy("oppu"), 4) == ["A", "B"] * 2
    assert _factors(get_strategy("bridge-only"), 3) == ["C"] * 3

    def run(**options):
        config = PersonalizeConfig(epochs=1, batch_size=64, lr=1e-4, progress=False, **options)
        return personalize(base, tiny_tokenizer, anchor, "LaMP-4", history, config)

    plain, fast_bridge = run(), run(lr_C=0.05)
    assert plain.train.steps == 1 and fast_bridge.hyperparams["lr_C"] == 0.05 and "lr_C" not in plain.hyperparams
    eye = torch.eye(anchor.spec.r)
    moved = [max((c - eye).abs().max().item() for c in bridge_params(r.model)) for r in (plain, fast_bridge)]
    # One AdamW step moves an entry by at most ~its lr: 1e-4 for the plain run's bridge, 0.05 for the fast one's.
    assert moved[0] <= 1.1e-4 and moved[1] > 0.04
    assert PersonalizeConfig(strategy="bridge-only", schedule="tuned").factor_lrs("LaMP-4") == \
        TUNED["bridge-only"]["LaMP-4"].factor_lrs()
    assert PersonalizeConfig(schedule="tuned", lr=1e-3).factor_lrs("LaMP-4") == {}
    assert PersonalizeConfig(schedule="tuned", lr=1e-3, lr_C=0.2).factor_lrs("LaMP-4") == {"C": 0.2}


# ---- CLI -------------------------------------------------------------------------------------------------------


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def anchor_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("anchor") / "task-adapted"
    result = invoke("task-adapt", "--task", "LaMP-4", "--model", tiny_model_dir, "--samples", "4", "--out", out)
    assert result.exit_code == 0, result.output
    assert "task-adapted anchor on 4 samples" in result.stdout
    assert json.loads((out / "task_adaptation.json").read_text())["samples"] == 4
    return out


QUESTIONS = SAMPLE_DIR / "LaMP-4" / "dev_questions.json"


def test_personalize_cli_writes_a_folded_adapter_and_report(tiny_model_dir, anchor_dir, tmp_path):
    out = tmp_path / "user"
    result = invoke("personalize", "--anchor", anchor_dir, "--task", "LaMP-4", "--history", QUESTIONS,
                    "--user", "LaMP-4-dev-2", "--model", tiny_model_dir, "--lr", "0.01", "--out", out,
                    "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "personalization.json").read_text())
    assert report["train"]["threads"] == 1
    assert report["strategy"] == "prisp" and len(report["items_used"]) == 10 and report["examples"] == 19
    assert report["hyperparameters"]["lr"] == 0.01 and report["hyperparameters"]["batch_size"] == 16
    assert report["trainable_params"] > 0 and report["seconds"] > 0 and report["peak_memory_mb"] > 0
    assert len(report["train"]["losses"]) == report["train"]["steps"]
    adapter = load_adapter(out)
    anchor = load_adapter(anchor_dir)
    assert all(torch.equal(adapter.pairs[k].A, anchor.pairs[k].A) for k in anchor.pairs)  # A frozen
    generated = invoke("generate", "--adapter", out, "--model", tiny_model_dir, "--task", "LaMP-4",
                       "--input", "Generate a headline for the following article: rain", "--max-new-tokens", "4")
    assert generated.exit_code == 0, generated.output


@pytest.mark.parametrize("strategy", ["pissa", "lora-ga"])
def test_personalize_cli_svd_strategies(tiny_model_dir, anchor_dir, tmp_path, strategy):
    """Table 4's starts through the CLI: a plain rank-2r LoRA of the unmodified base that generate loads; the
    tuned schedule is their searched row on LaMP-4, and is refused before anything is written where the search did not
    cover them (LaMP-7)."""
    out = tmp_path / "user"
    result = invoke("personalize", "--anchor", anchor_dir, "--task", "LaMP-4", "--history", QUESTIONS,
                    "--user", "LaMP-4-dev-2", "--model", tiny_model_dir, "--lr", "0.01", "--out", out,
                    "--strategy", strategy, "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "personalization.json").read_text())
    assert report["strategy"] == strategy and report["adapter_rank"] == 16
    assert load_adapter(out).spec.r == 16
    generated = invoke("generate", "--adapter", out, "--model", tiny_model_dir, "--task", "LaMP-4",
                       "--input", "Generate a headline for the following article: rain", "--max-new-tokens", "4")
    assert generated.exit_code == 0, generated.output
    assert PersonalizeConfig(strategy=strategy, schedule="tuned").train_config("LaMP-4").lr == \
        TUNED[strategy]["LaMP-4"].lr
    refused = invoke("personalize", "--anchor", anchor_dir, "--task", "LaMP-7", "--history", QUESTIONS,
                     "--user", "LaMP-4-dev-2", "--model", tiny_model_dir, "--schedule", "tuned",
                     "--out", tmp_path / "tuned", "--strategy", strategy, "--threads", "1")
    assert refused.exit_code != 0 and f"no tuned Stage-2 schedule for {strategy}" in refused.output
    assert not (tmp_path / "tuned").exists()


def test_personalize_cli_tuned_schedule(tiny_model_dir, anchor_dir, tmp_path):
    tuned = TUNED["no-bridge"]["LaMP-4"]
    result = invoke("personalize", "--anchor", anchor_dir, "--task", "LaMP-4", "--history", QUESTIONS,
                    "--user", "LaMP-4-dev-2", "--model", tiny_model_dir, "--strategy", "no-bridge",
                    "--schedule", "tuned", "--out", tmp_path / "u", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "u" / "personalization.json").read_text())
    used = report["hyperparameters"]
    assert (used["schedule"], used["lr"], used["epochs"], used["batch_size"]) == (
        "tuned", tuned.lr, tuned.epochs, tuned.batch_size)
    assert report["train"]["steps"] == tuned.epochs * -(-report["examples"] // tuned.batch_size)


def test_personalize_history_list_file(tiny_model_dir, anchor_dir, tmp_path):
    items = json.loads(QUESTIONS.read_text())[0]["profile"][:3]
    history = tmp_path / "history.json"
    history.write_text(json.dumps(items))
    result = invoke("personalize", "--anchor", anchor_dir, "--task", "LaMP-4", "--history", history,
                    "--strategy", "oppu", "--model", tiny_model_dir, "--out", tmp_path / "u")
    assert result.exit_code == 0, result.output
    assert load_adapter(tmp_path / "u").spec.r == 16


def _error_line(result):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("prisp: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    return errors[0]


def test_personalize_refusals_leave_no_half_written_output(tiny_model_dir, anchor_dir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out"
    common = ["--anchor", anchor_dir, "--task", "LaMP-4", "--model", tiny_model_dir, "--out", out]
    assert "history is empty" in _error_line(invoke("personalize", "--history", empty, *common))
    assert "--user" in _error_line(invoke("personalize", "--history", QUESTIONS, *common))
    assert "no question with id 'nope'" in _error_line(invoke("personalize", "--history", QUESTIONS, "--user",
                                                              "nope", *common))
    assert "--threads must be a positive integer or 'auto'" in _error_line(
        invoke("personalize", "--history", QUESTIONS, "--user", "LaMP-4-dev-0", "--threads", "0", *common))
    assert "--schedule must be one of paper, tuned" in _error_line(
        invoke("personalize", "--history", QUESTIONS, "--user", "LaMP-4-dev-0", "--schedule", "fast", *common))
    assert "no tuned Stage-2 schedule for full-lora on LaMP-4" in _error_line(
        invoke("personalize", "--history", QUESTIONS, "--user", "LaMP-4-dev-0", "--schedule", "tuned",
               "--strategy", "full-lora", *common))
    assert not out.exists()
    # An existing adapter at --out survives a refused run untouched.
    model = build_tiny_llama(int(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]))
    shapes = {k: (d_in * 2, d_out) for k, (d_in, d_out) in shapes_for_model(model).items()}
    wrong = save_adapter(random_init(shapes, LoraSpec()), tmp_path / "wrong", "other")
    previous = save_adapter(random_init(model, LoraSpec(), seed=9), out, "tiny")
    before = (previous / "adapter_model.safetensors").read_bytes()
    line = _error_line(invoke("personalize", "--history", QUESTIONS, "--user", "LaMP-4-dev-0",
                              "--anchor", wrong, "--task", "LaMP-4", "--model", tiny_model_dir, "--out", out))
    assert "does not fit the base model" in line
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "out", "wrong"]


def test_predict_personalized_caches_users(tiny_model_dir, anchor_dir, tmp_path):
    args = ["predict", "--task", "LaMP-4", "--method", "prisp", "--anchor", anchor_dir, "--model", tiny_model_dir,
            "--cache", tmp_path / "cache", "--out", tmp_path / "p.json"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "personalized 3 users (3 trained, 0 from cache)" in first.stderr
    second = invoke(*args)
    assert "personalized 3 users (0 trained, 3 from cache)" in second.stderr
    assert json.loads((tmp_path / "p.json").read_text())["golds"][0]["id"] == "LaMP-4-dev-0"
    assert "needs --anchor" in _error_line(invoke("predict", "--task", "LaMP-4", "--method", "prisp",
                                                  "--out", tmp_path / "x.json"))


def test_a_cached_adapter_is_never_replaced_by_a_second_writer(base, tmp_path):
    # Pool workers may race on one key; its inputs are the same, so the first finished copy stays put
    # (a reader never finds the directory moved aside mid-swap) and the second writer is not an error.
    first, second = random_init(base, LoraSpec(), seed=1), random_init(base, LoraSpec(), seed=2)
    cache = AdapterCache(tmp_path / "cache")
    key = cache.path("key")
    cache.put("key", first, "tiny", {"seconds": 1.0})
    before = (key / "adapter_model.safetensors").stat().st_ino
    cache.put("key", second, "tiny", {"seconds": 2.0})
    assert (key / "adapter_model.safetensors").stat().st_ino == before
    assert json.loads((key / "personalization.json").read_text()) == {"seconds": 1.0, "key": "key"}
    weights, report = cache.get("key")
    assert report["seconds"] == 1.0 and cache.get("other") is None
    stored = load_adapter(key).to_peft_state_dict()
    assert all(torch.equal(t, stored[k]) for k, t in first.to_peft_state_dict().items())
    assert sorted(p.name for p in key.parent.iterdir()) == ["key"]  # no temporary directory left behind


@pytest.mark.slow
def test_personalize_cli_on_the_real_default_model(tmp_path):
    anchor = tmp_path / "anchor"
    assert invoke("lora-init", "--out", anchor).exit_code == 0
    out = tmp_path / "user"
    result = invoke("personalize", "--anchor", anchor, "--task", "LaMP-4", "--history", QUESTIONS, "--user",
                    "LaMP-4-dev-0", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "personalization.json").read_text())
    # 30 layers x (q: 576*8 + 64, v: 192*8 + 64) trainable under PRISP.
    assert report["trainable_params"] == 30 * ((576 * 8 + 64) + (192 * 8 + 64))
    assert load_adapter(out).spec.r == 8


def _full_logits_loss(model, batch):
    """The loop's loss before it skipped the LM head on prompt positions: transformers' own, over every position."""
    return model(**batch).loss


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fast_loop_matches_the_full_logits_unchunked_path(base, tiny_tokenizer, history, strategy):
    """Answer-only LM head + length-grouped micro-batches give the old path's loss curve and adapter.

    Dropout is off so both runs see the same function (with dropout the masks fall on other rows, by design).
    """
    weights = random_init(base, LoraSpec(dropout=0.0), seed=1)
    gen = torch.Generator().manual_seed(2)
    anchor0 = LoraWeights(weights.spec, {k: LoraPair(p.A, torch.randn(p.B.shape, generator=gen) * 0.05)
                                         for k, p in weights.pairs.items()})
    examples = user_examples("LaMP-4", history).examples
    tokenized = tokenize_examples(tiny_tokenizer, examples, 512)
    assert len({len(e.input_ids) for e in tokenized}) > 1  # ragged: grouping by length changes the chunks

    def run(micro, loss_fn):
        config = TrainConfig(batch_size=4, micro_batch_size=micro, lr=5e-2, progress=False)
        model, params, _ = _prepare(base, anchor0, STRATEGIES[strategy], seed=0,
                                    calibrate=_calibration(tokenized, config, tiny_tokenizer.pad_token_id))
        result = train(model, params, tokenized, config, loss_fn=loss_fn, pad_id=tiny_tokenizer.pad_token_id)
        return result.losses, [p.detach().clone() for p in params], model

    old_losses, old_params, _ = run(None, _full_logits_loss)
    new_losses, new_params, new_model = run(2, None)
    assert _decoder_and_head(new_model) is not None  # the peft-wrapped model takes the answer-only path
    torch.testing.assert_close(torch.tensor(new_losses), torch.tensor(old_losses), atol=1e-5, rtol=1e-5)
    # LoRA-GA's start is an SVD of the calibration gradient, which the two paths sum in another order: its
    # rounding differences reach the trained factors at the 1e-5 level.
    atol, rtol = (1e-4, 1e-3) if strategy == "lora-ga" else (1e-5, 1e-4)
    for old, new in zip(old_params, new_params, strict=True):
        torch.testing.assert_close(new, old, atol=atol, rtol=rtol)
    if not STRATEGIES[strategy].train_A and not STRATEGIES[strategy].grows_rank:
        for name, param in new_model.named_parameters():
            if "lora_A" in name:
                site = [k for k in anchor0.pairs if f"layers.{k[0]}." in name and k[1] in name]
                assert len(site) == 1 and torch.equal(param, anchor0.pairs[site[0]].A)


def test_the_adapter_key_changes_with_every_input_of_training(anchor, history):
    """A cache hit needs every input that training reads to be the same (stale adapters were possible when the
    anchor's scale or the label list changed)."""
    import dataclasses

    from prisp.personalize.cache import anchor_digest
    from prisp.personalize.cache import personalization_key as adapter_key

    items = history[:10]
    config = PersonalizeConfig(progress=False)
    key = adapter_key("tiny", anchor, config, "LaMP-4", items)
    assert key == adapter_key("tiny", anchor, PersonalizeConfig(progress=True), "LaMP-4", items)  # not an input
    rescaled = [dataclasses.replace(anchor, spec=dataclasses.replace(anchor.spec, **change))
                for change in ({"alpha": 32}, {"use_rslora": False}, {"dropout": 0.1})]
    changed = [adapter_key("tiny", a, config, "LaMP-4", items) for a in rescaled]
    changed += [adapter_key("tiny", anchor, config, "LaMP-4", items, labels) for labels in (["a", "b"], ["b", "a"])]
    changed += [adapter_key("other", anchor, config, "LaMP-4", items),
                adapter_key("tiny", anchor, config, "LaMP-4", items[:9]),
                adapter_key("tiny", anchor, PersonalizeConfig(progress=False, lr=1e-3), "LaMP-4", items),
                adapter_key("tiny", anchor, PersonalizeConfig(progress=False, schedule="tuned"), "LaMP-4", items),
                adapter_key("tiny", anchor, PersonalizeConfig(progress=False, strategy="oppu"), "LaMP-4", items)]
    assert len({key, *changed}) == len(changed) + 1
    assert adapter_key("tiny", anchor_digest(anchor), config, "LaMP-4", items) == key  # a digest names the same


def test_one_key_for_the_predictor_the_sharer_pool_and_the_batch(anchor, history, monkeypatch):
    """The batch runner names its jobs with the same key, so it also sees the resolved schedule: re-tuning a
    row of the tuned table re-personalizes stored users (the batch key used to hash only the table's name)."""
    import dataclasses

    from prisp.batch import BatchConfig, job_key
    from prisp.batch.users import UserJob
    from prisp.data.protocol import recent_items
    from prisp.personalize import hyperparams
    from prisp.personalize.cache import anchor_digest, personalization_key

    config = BatchConfig(task="LaMP-4", model="tiny", personalize=PersonalizeConfig(progress=False,
                                                                                    schedule="tuned"))
    job = UserJob("u1", tuple(history))
    user_config = config.user_config("u1")
    expected = personalization_key("tiny", anchor, user_config, "LaMP-4", recent_items(history, user_config.k))
    before = job_key(anchor_digest(anchor), config, (), job)
    assert before == expected
    row = hyperparams.TUNED["prisp"]["LaMP-4"]
    monkeypatch.setitem(hyperparams.TUNED["prisp"], "LaMP-4", dataclasses.replace(row, lr=row.lr * 2))
    assert job_key(anchor_digest(anchor), config, (), job) != before
