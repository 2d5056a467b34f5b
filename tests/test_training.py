"""The one training loop: tokenization, masking, truncation, schedule, determinism, bookkeeping."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prisp.training import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    TrainConfig,
    TrainState,
    causal_lm_loss,
    collate,
    fit_example,
    micro_batches,
    tokenize_examples,
    train,
    warmup_then_decay,
)

VOCAB = 128
WORDS = "user assistant : the a cat dog sat on mat ran far away what did do yes no title is".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def trainable(model: LlamaForCausalLM) -> list[torch.nn.Parameter]:
    """A small explicit trainable set; everything else frozen."""
    model.requires_grad_(False)
    params = [model.model.layers[-1].mlp.down_proj.weight, model.model.norm.weight]
    for p in params:
        p.requires_grad_(True)
    return params


def random_examples(n: int, seed: int = 3, length: int = 10, prompt: int = 6) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length + i % 3,), generator=generator).tolist()  # ragged lengths
        out.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


QUIET = {"progress": False}


@pytest.mark.parametrize(
    "option,value",
    [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0),
     ("warmup_ratio", 1.0), ("max_grad_norm", 0.0), ("max_length", 1), ("micro_batch_size", 0), ("micro_batch_tokens", 0),
     ("schedule_steps", 0), ("schedule_start", -1), ("max_steps", 0)],
)
def test_config_validation_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        TrainConfig(**{option: value})


def test_tokenize_chat_masks_prompt_and_appends_eos():
    tok = word_tokenizer()
    [ex] = tokenize_examples(tok, [Example("what did the cat do", "sat on the mat")], max_length=64)
    text = tok.apply_chat_template([{"role": "user", "content": "what did the cat do"}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok("sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + answer and not ex.truncated
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.convert_ids_to_tokens(prompt[:3]) == ["<s>", "user", ":"]
    assert tok.convert_ids_to_tokens(prompt[-2:]) == ["assistant", ":"]


def test_tokenize_without_chat_template():
    for tok, chat in ((word_tokenizer(chat=False), True), (word_tokenizer(), False)):
        [ex] = tokenize_examples(tok, [Example("the dog ran", "far away")], max_length=64, chat=chat)
        assert tok.convert_ids_to_tokens(ex.input_ids) == ["the", "dog", "ran", "far", "away", "</s>"]
        assert ex.labels[:3] == [IGNORE_INDEX] * 3 and ex.labels[3:] == ex.input_ids[3:]


def test_truncation_cuts_the_left_of_the_prompt_only():
    tok = word_tokenizer()
    long_prompt = " ".join(["the cat sat on the mat"] * 5) + " what did the dog do"
    [full] = tokenize_examples(tok, [Example(long_prompt, "ran far away")], max_length=512)
    [cut] = tokenize_examples(tok, [Example(long_prompt, "ran far away")], max_length=12)
    assert cut.truncated and len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[-12:] and cut.labels == full.labels[-12:]  # answer + prompt tail
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 4  # "ran far away </s>" survives
    assert tokenize_examples(tok, [Example(long_prompt, "ran far away")], max_length=12) == [cut]


def test_answer_longer_than_limit_keeps_one_prompt_token():
    ex = TokenizedExample(input_ids=list(range(10, 20)), labels=[IGNORE_INDEX] * 3 + list(range(13, 20)))
    cut = fit_example(ex, 4)
    assert cut.input_ids == [12, 13, 14, 15] and cut.labels == [IGNORE_INDEX, 13, 14, 15] and cut.truncated
    assert fit_example(ex, 10) is ex


def test_collate_right_pads_and_masks():
    batch = collate([TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_loss_is_on_answer_tokens_only():
    model = tiny_model()
    batch = collate(random_examples(3))
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits  # [b, T, V]
        loss = causal_lm_loss(model, batch)
    targets = batch["labels"][:, 1:]  # [b, T-1]; position t predicts token t+1
    scored = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[:, :-1][scored], targets[scored])
    torch.testing.assert_close(loss, manual)
    # 6 prompt tokens per example are context only; the rest (answer) is scored.
    assert scored.sum() == sum(len(e.input_ids) - 6 for e in random_examples(3))


def test_train_result_and_only_params_change():
    model = tiny_model()
    params = trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, max_length=11, **QUIET)
    result = train(model, params, random_examples(10), config)
    assert result.steps == 2 * math.ceil(10 / 4) == len(result.losses) == len(result.lrs)
    assert result.examples == 10 and result.epochs == 2
    assert result.truncated == 3  # the three length-12 examples
    assert result.trainable_params == 64 * 32 + 32 and result.seconds > 0
    assert result.peak_rss_mb > 0 and result.peak_rss_delta_mb >= 0 and result.peak_cuda_mb is None
    assert result.process_peak_rss_mb >= result.peak_rss_mb * 0.99 and result.device == "cpu"
    assert all(math.isfinite(x) for x in result.losses)
    json.dumps(result.to_dict())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    assert not model.training  # eval mode restored


def test_learning_decreases_loss():
    model = tiny_model()
    data = random_examples(4)
    config = TrainConfig(epochs=30, batch_size=4, lr=1e-2, warmup_ratio=0.0, **QUIET)
    result = train(model, list(model.parameters()), data, config)
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_seeded_runs_are_identical_and_rng_is_restored():
    def run(seed: int) -> list[torch.Tensor]:
        model = tiny_model()
        params = trainable(model)
        train(model, params, random_examples(9), TrainConfig(batch_size=2, lr=1e-2, seed=seed, **QUIET))
        return [p.detach() for p in params]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run(0)
    torch.set_rng_state(state)
    b = run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, run(1), strict=True))

    model = tiny_model()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train(model, trainable(model), random_examples(4), TrainConfig(batch_size=2, **QUIET))
    assert torch.equal(torch.rand(3), expected)  # dropout seeding did not leak into the caller's RNG


def test_lr_warms_up_then_decays():
    model = tiny_model()
    config = TrainConfig(batch_size=1, lr=1e-3, warmup_ratio=0.3, **QUIET)
    lrs = train(model, trainable(model), random_examples(10), config).lrs
    peak = lrs.index(max(lrs))
    assert peak == 3 and lrs[peak] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(x > y for x, y in zip(lrs[peak:], lrs[peak + 1 :]))
    assert min(lrs) > 0
    factor = warmup_then_decay(total_steps=4, warmup_steps=0)
    assert [factor(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_micro_batches_match_full_batch():
    def run(micro: int | None) -> list[torch.Tensor]:
        model = tiny_model()
        params = trainable(model)
        config = TrainConfig(batch_size=6, micro_batch_size=micro, lr=1e-2, **QUIET)
        losses = train(model, params, random_examples(12), config).losses
        return [p.detach() for p in params] + [torch.tensor(losses)]

    for x, y in zip(run(None), run(2), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_token_capped_micro_batches_match_full_batch():
    def run(micro: int | None, tokens: int | None) -> list[torch.Tensor]:
        model = tiny_model()
        params = trainable(model)
        config = TrainConfig(batch_size=6, micro_batch_size=micro, micro_batch_tokens=tokens, lr=1e-2, **QUIET)
        losses = train(model, params, random_examples(12), config).losses
        return [p.detach() for p in params] + [torch.tensor(losses)]

    for x, y in zip(run(None, None), run(4, 25), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_micro_batches_group_by_length_within_row_and_token_caps():
    examples = [TokenizedExample([1] * n, [IGNORE_INDEX] * (n - 1) + [1]) for n in (30, 5, 12, 6, 29, 11, 40)]
    chunks = micro_batches(examples, TrainConfig(micro_batch_size=3, micro_batch_tokens=60, **QUIET))
    assert sorted(map(id, (e for c in chunks for e in c))) == sorted(map(id, examples))  # each exactly once
    lengths = [[len(e.input_ids) for e in c] for c in chunks]
    assert lengths == [[5, 6, 11], [12, 29], [30], [40]]  # greedy in length order
    assert all(len(c) * max(c) <= 60 for c in lengths)
    assert micro_batches(examples, TrainConfig(micro_batch_tokens=10, **QUIET))[-1] == [examples[-1]]  # alone
    unlimited = micro_batches(examples, TrainConfig(**QUIET))
    assert len(unlimited) == 1 and [len(e.input_ids) for e in unlimited[0]] == sorted(len(e.input_ids) for e in examples)


def test_custom_loss_fn_hook_runs_in_train_mode():
    model = tiny_model()
    seen = []

    def loss_fn(m, batch):
        seen.append((m.training, tuple(batch)))
        return causal_lm_loss(m, batch) * 2

    config = TrainConfig(batch_size=2, **QUIET)
    result = train(model, trainable(model), random_examples(4), config, loss_fn=loss_fn)
    assert seen == [(True, ("input_ids", "attention_mask", "labels"))] * 2 and result.steps == 2
    assert not model.training


def test_train_rejects_bad_inputs():
    model = tiny_model()
    params = trainable(model)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, [model.lm_head.weight], random_examples(2), TrainConfig(**QUIET))
    with pytest.raises(ValueError, match="at least one example"):
        train(model, params, [], TrainConfig(**QUIET))
    with pytest.raises(ValueError, match="twice"):
        train(model, params + params[:1], random_examples(2), TrainConfig(**QUIET))


def dropout_loss(model, batch):
    """Causal-LM loss through a dropout layer, so the result depends on the loop's RNG stream."""
    logits = F.dropout(model(**batch).logits, p=0.2, training=True)
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def frozen_copy(state: TrainState) -> TrainState:
    """What a checkpoint keeps: copies of the live tensors handed to ``on_step``."""
    return TrainState(step=state.step, optimizer=[{k: v.clone() for k, v in m.items()} for m in state.optimizer],
                      rng=state.rng.clone())


def test_interrupted_call_resumes_exactly():
    config = TrainConfig(epochs=2, batch_size=3, lr=1e-2, warmup_ratio=0.2, weight_decay=0.01, seed=4, **QUIET)
    data = random_examples(10)  # 4 batches per epoch, the last short
    full_model = tiny_model()
    full_params = trainable(full_model)
    full = train(full_model, full_params, data, config, loss_fn=dropout_loss)

    saved = []
    first_model = tiny_model()
    first_params = trainable(first_model)
    first = train(first_model, first_params, data, TrainConfig(**{**config.__dict__, "max_steps": 5}),
                  loss_fn=dropout_loss, on_step=lambda state, loss: saved.append(frozen_copy(state)))
    assert first.steps == 5 and [s.step for s in saved] == [1, 2, 3, 4, 5]
    assert first.losses == full.losses[:5] and first.lrs == full.lrs[:5]  # max_steps keeps the schedule

    resumed_model = tiny_model()
    resumed_params = trainable(resumed_model)
    with torch.no_grad():
        for mine, theirs in zip(resumed_params, first_params, strict=True):
            mine.copy_(theirs)  # what a checkpoint's weights restore
    rest = train(resumed_model, resumed_params, data, config, loss_fn=dropout_loss, state=saved[-1])
    assert rest.steps == full.steps - 5
    assert rest.losses == full.losses[5:] and rest.lrs == full.lrs[5:]
    assert all(torch.equal(a, b) for a, b in zip(resumed_params, full_params, strict=True))

    # Each piece matters: without the moments, or without the RNG, the run diverges.
    for partial in (TrainState(step=5, rng=saved[-1].rng), TrainState(step=5, optimizer=saved[-1].optimizer)):
        other_model = tiny_model()
        other_params = trainable(other_model)
        with torch.no_grad():
            for mine, theirs in zip(other_params, first_params, strict=True):
                mine.copy_(theirs)
        train(other_model, other_params, data, config, loss_fn=dropout_loss, state=partial)
        assert not all(torch.equal(a, b) for a, b in zip(other_params, full_params, strict=True))
    assert torch.equal(saved[-1].optimizer[0]["exp_avg"], frozen_copy(saved[-1]).optimizer[0]["exp_avg"])


def test_one_schedule_over_several_calls():
    data = random_examples(8)
    one = train(tiny_model(), trainable(tiny_model()), data,
                TrainConfig(epochs=2, batch_size=2, lr=1e-3, warmup_ratio=0.25, **QUIET)).lrs
    model = tiny_model()
    params = trainable(model)
    kept = []
    lrs = []
    for call in range(2):
        config = TrainConfig(batch_size=2, lr=1e-3, warmup_ratio=0.25, schedule_steps=8, schedule_start=4 * call,
                             **QUIET)
        state = TrainState(optimizer=kept[-1].optimizer) if kept else None
        lrs += train(model, params, data, config, state=state, on_step=lambda s, loss: kept.append(s)).lrs
    assert lrs == one  # one warm-up, one decay, across the two calls
    assert int(kept[-1].optimizer[0]["step"]) == 8  # AdamW's step count carried across calls
    with pytest.raises(ValueError, match="moments for 1 parameters"):
        train(model, params, data, TrainConfig(**QUIET), state=TrainState(optimizer=kept[-1].optimizer[:1]))
    with pytest.raises(ValueError, match="at step 9"):
        train(model, params, data, TrainConfig(batch_size=2, **QUIET), state=TrainState(step=9))


def test_param_lrs_give_each_parameter_its_own_rate():
    """One step with rates [a, b] moves each parameter exactly as a plain run at its own rate does."""
    config = TrainConfig(batch_size=8, lr=1e-3, warmup_ratio=0.0, max_steps=1, **QUIET)
    data = random_examples(8)

    def step(lr: float, param_lrs=None) -> list[torch.Tensor]:
        model = tiny_model()
        params = trainable(model)
        before = [p.detach().clone() for p in params]
        train(model, params, data, TrainConfig(**{**config.__dict__, "lr": lr}), param_lrs=param_lrs)
        return [p.detach() - b for p, b in zip(params, before, strict=True)]

    mixed = step(1e-3, param_lrs=[1e-3, 5e-2])
    torch.testing.assert_close(mixed[0], step(1e-3)[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(mixed[1], step(5e-2)[1], rtol=0, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(step(1e-3, [1e-3, 1e-3]), step(1e-3), strict=True))
    model = tiny_model()
    for bad in ([1e-3], [1e-3, 0.0]):
        with pytest.raises(ValueError, match="one positive learning rate per parameter"):
            train(model, trainable(model), data, config, param_lrs=bad)
