"""Label scoring: the cached, batched candidate pass equals an explicit forward per label; --decode end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_tiny_llama
from typer.testing import CliRunner

from prisp.adapters import LoraPair, LoraSpec, LoraWeights, attach_lora, random_init
from prisp.cli import SAMPLE_DIR, app
from prisp.data.lamp import load_task_split
from prisp.data.tasks import label_set
from prisp.errors import DataError
from prisp.scoring import LabelScores, _prompt_ids, label_token_ids, score_labels

LABELS = ("politics", "sports", "world news", "a", "science and technology")
PROMPTS = ["Which category does this article relate to? The council approved the budget.",
           "Which category does this article relate to? abc",
           "What is the score of the following review on a scale of 1 to 5? Great film, terrible ending."]


def explicit_logprob(model, prompt_ids: list[int], candidate: list[int]) -> float:
    """log p(candidate | prompt) from one plain forward over prompt + candidate."""
    ids = torch.tensor([prompt_ids + candidate])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt_ids) - 1 + j, token].item() for j, token in enumerate(candidate))


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    base = build_tiny_llama(len(tiny_tokenizer), seed=5).eval()
    weights = random_init(base, LoraSpec(), seed=1)
    gen = torch.Generator().manual_seed(3)
    adapter = LoraWeights(weights.spec, {k: LoraPair(p.A, torch.randn(p.B.shape, generator=gen))
                                         for k, p in weights.pairs.items()})
    return base, attach_lora(copy.deepcopy(base), adapter).eval()


@pytest.mark.parametrize("normalise", ["mean", "sum"])
def test_choice_is_the_argmax_of_an_explicit_forward_per_label(models, tiny_tokenizer, normalise):
    for model in models:
        result = score_labels(model, tiny_tokenizer, PROMPTS, LABELS, normalise=normalise)
        candidates = label_token_ids(tiny_tokenizer, LABELS)
        assert len({len(c) for c in candidates}) > 1  # ragged candidates: the padding path is exercised
        for row, prompt in enumerate(PROMPTS):
            ids, _ = _prompt_ids(tiny_tokenizer, prompt, 1024)
            expected = torch.tensor([explicit_logprob(model, ids, c) / (len(c) if normalise == "mean" else 1)
                                     for c in candidates])
            torch.testing.assert_close(result.scores[row], expected, atol=1e-4, rtol=1e-4)
            assert result.choices[row] == LABELS[int(expected.argmax())]
        assert all(choice in LABELS for choice in result.choices)


def test_the_adapter_changes_the_scores(models, tiny_tokenizer):
    base, adapted = models
    plain = score_labels(base, tiny_tokenizer, PROMPTS, LABELS).scores
    personal = score_labels(adapted, tiny_tokenizer, PROMPTS, LABELS).scores
    assert not torch.allclose(plain, personal)


def test_refusals(models, tiny_tokenizer):
    with pytest.raises(DataError, match="needs a label set"):
        score_labels(models[0], tiny_tokenizer, PROMPTS, ())
    with pytest.raises(DataError, match="unknown label normalisation"):
        score_labels(models[0], tiny_tokenizer, PROMPTS, LABELS, normalise="max")


def test_expected_error_answer_is_the_weighted_median_of_the_ratings():
    ratings = ("3", "1", "5", "2", "4")  # any order: the median is taken over the values
    probs = torch.tensor([[0.05, 0.30, 0.45, 0.05, 0.15]])  # P(1..5) = .30 .05 .05 .15 .45
    scored = LabelScores(ratings, probs.log(), ["5"], log_likelihoods=probs.log() - 3.0)  # unnormalised is fine
    assert scored.min_expected_error() == ["4"]  # the likeliest is 5; 4 has the least expected |error|
    gen = torch.Generator().manual_seed(0)
    totals = torch.randn(50, 5, generator=gen) * 3
    scored = LabelScores(ratings, totals, [], log_likelihoods=totals)
    values = torch.tensor([float(r) for r in ratings])
    expected_error = (torch.softmax(totals, -1)[:, None, :] * (values[None, :, None] - values[None, None, :]).abs()
                      ).sum(-1)  # [prompt, candidate answer]
    best = expected_error.min(-1).values
    for row, answer in enumerate(scored.min_expected_error()):
        assert expected_error[row, ratings.index(answer)] <= best[row] + 1e-9
    with pytest.raises(DataError, match="numeric labels"):
        LabelScores(LABELS, torch.zeros(1, len(LABELS)), []).min_expected_error()


def test_predict_rating_rule_end_to_end(tiny_model_dir, tmp_path):
    outs = {rule: tmp_path / f"{rule}.json" for rule in ("likeliest", "expected-error")}
    for rule, out in outs.items():
        result = invoke("predict", "--task", "LaMP-3", "--model", tiny_model_dir, "--rating-rule", rule, "--out", out)
        assert result.exit_code == 0, result.output
        assert all(g["output"] in ("1", "2", "3", "4", "5") for g in json.loads(out.read_text())["golds"])
    bad = tmp_path / "bad.json"
    assert "--rating-rule must be one of likeliest, expected-error" in one_error(
        invoke("predict", "--task", "LaMP-3", "--model", tiny_model_dir, "--rating-rule", "mean", "--out", bad))
    assert not bad.exists()


# --- --decode end to end: predict, generate, bench keys ------------------------------------------------------




runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("prisp: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    return errors[0]


@pytest.mark.parametrize("task", ["LaMP-2N", "LaMP-3", "LaMP-1"])
def test_predict_decode_labels_answers_only_labels(tiny_model_dir, tmp_path, task):
    out = tmp_path / "preds.json"
    result = invoke("predict", "--task", task, "--model", tiny_model_dir, "--decode", "labels", "--out", out)
    assert result.exit_code == 0, result.output
    answers = [g["output"] for g in json.loads(out.read_text())["golds"]]
    split = load_task_split(SAMPLE_DIR, task, "dev")
    labels = label_set(task, split.inputs)  # LaMP-2N: the categories named in the inputs
    assert answers and all(a in labels for a in answers)


def test_auto_is_labels_for_label_tasks_and_free_for_generation(tiny_model_dir, tmp_path):
    from prisp.predict import decode_mode

    assert [decode_mode(t, "auto") for t in ("LaMP-1", "LaMP-2N", "LaMP-3", "LaMP-4")] == \
        ["labels", "labels", "labels", "free"]
    auto, labels = tmp_path / "auto.json", tmp_path / "labels.json"
    for out, decode in ((auto, "auto"), (labels, "labels")):
        assert invoke("predict", "--task", "LaMP-2N", "--model", tiny_model_dir, "--decode", decode,
                      "--out", out).exit_code == 0
    assert json.loads(auto.read_text()) == json.loads(labels.read_text())


def test_decode_refusals_write_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "preds.json"
    assert "--decode must be one of" in one_error(
        invoke("predict", "--task", "LaMP-2N", "--model", tiny_model_dir, "--decode", "beam", "--out", out))
    assert "generation task" in one_error(
        invoke("predict", "--task", "LaMP-4", "--model", tiny_model_dir, "--decode", "labels", "--out", out))
    assert not out.exists()
    assert "needs --task" in one_error(invoke("generate", "--input", "hello", "--decode", "labels",
                                              "--model", tiny_model_dir))


def test_generate_decode_labels_prints_a_label(tiny_model_dir):
    text = ("Which category does this article relate to among the following categories? Just answer with the "
            "category name without further explanation. categories: [politics, sports, business] article: "
            "The council approved the budget.")
    result = invoke("generate", "--task", "LaMP-2N", "--input", text, "--decode", "labels", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() in label_set("LaMP-2N", [text])


def test_bench_rows_are_keyed_by_decoding_and_old_rows_read_as_free():
    from prisp.bench.config import profile_config
    from prisp.bench.results import Cell, row_key
    from prisp.bench.runner import cell_key

    cell = Cell("LaMP-2N", "prisp", "np", 10, 4)
    free = cell_key(profile_config("quick", tasks=("LaMP-2N",)), cell)
    labels = cell_key(profile_config("quick", tasks=("LaMP-2N",), decode="labels"), cell)
    assert free != labels
    old_row = {"model": "smollm2-135m", "protocol": "few-shot", "split": "dev", "task": "LaMP-2N", "method": "prisp",
               "variant": "np", "items": 10, "users": 4}
    config = profile_config("quick", tasks=("LaMP-2N",))
    assert row_key({**old_row, "model": config.model, "protocol": config.protocol, "split": config.split}) == free
    with pytest.raises(Exception, match="--decode must be"):
        profile_config("quick", decode="beam")
