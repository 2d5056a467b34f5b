"""Generation and prediction on a tiny random Llama (fast) and the real default model (slow)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prisp.adapters import LoraSpec, attach_lora, random_init
from prisp.data.lamp import load_split
from prisp.files import write_json_atomic
from prisp.generation import GenerationConfig, clean_output, generate
from prisp.models import load_model
from prisp.predict import PredictConfig, predict_split

PROMPTS = ["Generate a headline for the following article. Article: cats. Headline:",
           "Which category? politics sports",
           "Generate a title for the following abstract of a paper. Abstract: We study neural models with "
           "a long abstract that makes this prompt much longer than the others. Title:"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    config = GenerationConfig(max_new_tokens=6, batch_size=3, first_line=False)
    batched = generate(tiny.model, tiny.tokenizer, PROMPTS, config)
    single = [generate(tiny.model, tiny.tokenizer, [p], GenerationConfig(max_new_tokens=6, batch_size=1,
                                                                         first_line=False)).texts[0]
              for p in PROMPTS]
    assert batched.texts == single
    assert batched.new_tokens > 0 and batched.seconds > 0


def test_per_prompt_budgets_cut_each_row_like_its_own_run(tiny):
    weights = random_init(tiny.model, LoraSpec(), seed=3)
    for pair in weights.pairs.values():  # the tiny base answers nothing; a loud adapter makes it talk
        pair.B.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    model = attach_lora(copy.deepcopy(tiny.model), weights).eval()
    budgets = [2, 6, 4]
    batched = generate(model, tiny.tokenizer, PROMPTS, GenerationConfig(batch_size=3, first_line=False),
                       budgets=budgets)
    single = [generate(model, tiny.tokenizer, [p], GenerationConfig(max_new_tokens=b, batch_size=1,
                                                                    first_line=False)).texts[0]
              for p, b in zip(PROMPTS, budgets)]
    assert batched.texts == single
    assert len({len(t) for t in single}) > 1, "the budgets should have cut the rows differently"
    with pytest.raises(ValueError, match="budgets"):
        generate(tiny.model, tiny.tokenizer, PROMPTS, budgets=[2])
    with pytest.raises(ValueError, match="adapter_names"):
        generate(tiny.model, tiny.tokenizer, PROMPTS, adapter_names=["default"])


def test_greedy_generation_is_deterministic(tiny):
    config = GenerationConfig(max_new_tokens=5)
    assert generate(tiny.model, tiny.tokenizer, PROMPTS, config).texts == \
        generate(tiny.model, tiny.tokenizer, PROMPTS, config).texts


def test_over_long_prompts_are_cut_from_the_left_and_counted(tiny):
    result = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationConfig(max_new_tokens=2, max_input_tokens=16))
    assert result.truncated_prompts == 3 and len(result.texts) == 3


def test_clean_output_keeps_first_nonempty_line():
    assert clean_output("\n  Park Opens Today \n\nIn a move ...", first_line=True) == "Park Opens Today"
    assert clean_output("  a\nb ", first_line=False) == "a\nb"
    assert clean_output("   ", first_line=True) == ""


def test_generation_config_validates():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def _split(tmp_path):
    profile = [{"id": f"p{i}", "date": f"2020-01-{i + 1:02d}", "text": t, "title": f"H{i}"}
               for i, t in enumerate(["the mayor opened a park", "stocks fell", "rain again"])]
    questions = [{"id": f"q{i}", "input": f"Generate a headline for the following article: {t}", "profile": profile}
                 for i, t in enumerate(["a park for the mayor", "stocks and bonds"])]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP-4", "golds": [{"id": "q0", "output": "Park"},
                                                                             {"id": "q1", "output": "Stocks"}]}))
    return load_split(tmp_path / "q.json", tmp_path / "o.json", "LaMP-4")


def test_predict_split_np_and_rag_prompts(tiny, tmp_path):
    split = _split(tmp_path)
    np_run = predict_split(tiny.model, tiny.tokenizer, split, PredictConfig(method="np"))
    rag_run = predict_split(tiny.model, tiny.tokenizer, split, PredictConfig(method="rag", k=1))
    assert np_run.ids == ["q0", "q1"] and len(np_run.outputs) == 2
    assert "User History:" not in np_run.prompts[0]
    assert "Article: the mayor opened a park Headline: H0" in rag_run.prompts[0]
    assert "Article: stocks fell Headline: H1" in rag_run.prompts[1]
    assert rag_run.as_lamp_outputs()["golds"][1]["id"] == "q1"
    assert len(predict_split(tiny.model, tiny.tokenizer, split, PredictConfig(limit=1)).ids) == 1


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.slow
def test_default_model_answers_real_prompts(tmp_path):
    loaded = load_model()
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.hidden_size == 576
    split = _split(tmp_path)
    run = predict_split(loaded.model, loaded.tokenizer, split, PredictConfig(method="rag"))
    assert all(isinstance(t, str) and t for t in run.outputs)
    assert run.generation.new_tokens > 0
