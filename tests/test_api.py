"""The public Python API (``prisp.load_base`` ... ``prisp.generate``) end to end: the tiny model in the fast
lane, the real default model (the docs/python-api.md example, run verbatim) in the slow lane."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prisp
from prisp.adapters import LoraWeights, attach_lora, load_adapter, shared_copy
from prisp.data.locations import SAMPLE_DIR
from prisp.scoring import score_labels

ROOT = Path(__file__).resolve().parents[1]
SMALL_HYPERNET = {"task_dim": 8, "pos_dim": 4, "hidden_dim": 16, "num_blocks": 1, "head_in_dim": 8}


def _questions(task):
    return json.loads((SAMPLE_DIR / task / "dev_questions.json").read_text())


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return prisp.load_base(str(tiny_model_dir), threads=1)


@pytest.fixture(scope="module")
def hypernet_dir(tiny_hypernet_dir):
    return tiny_hypernet_dir


def test_import_prisp_is_light_and_lists_the_verbs():
    code = "import sys, prisp; assert 'torch' not in sys.modules; print(sorted(prisp.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for verb in ("load_base", "load_task", "make_anchor", "personalize_user", "generate", "Personalized"):
        assert verb in out
    with pytest.raises(AttributeError):
        prisp.no_such_verb


def test_load_task_accepts_spellings_and_refuses_unknown_ones():
    task = prisp.load_task("lamp_4")
    assert (task.name, task.kind) == ("LaMP-4", "generation") and task.description
    assert prisp.load_task(task) is task
    with pytest.raises(prisp.DataError, match="unknown task"):
        prisp.load_task("LaMP-9")


def test_anchor_personalize_save_generate_round_trip(base, hypernet_dir, tmp_path):
    task = prisp.load_task("LaMP-4")
    anchor = prisp.make_anchor(base, task, hypernet=hypernet_dir)
    assert isinstance(anchor, LoraWeights)
    anchor.check_fits(base.model)
    other = prisp.make_anchor(base, task, description="Write a one-line title.", hypernet=hypernet_dir)
    theirs = other.to_peft_state_dict()
    assert any(not torch.equal(t, theirs[k]) for k, t in anchor.to_peft_state_dict().items())  # text matters

    question = _questions("LaMP-4")[0]
    result = prisp.personalize_user(base, anchor, task, question["profile"], epochs=1, batch_size=4)
    assert result.report["strategy"] == "prisp" and result.report["task"] == "LaMP-4"
    out = result.save(tmp_path / "users" / "u0")
    assert (out / "adapter_config.json").is_file()
    assert len(json.loads((out / "personalization.json").read_text())["items_used"]) == 10  # the k most recent
    saved = load_adapter(out)
    assert all(torch.equal(t, saved.to_peft_state_dict()[k]) for k, t in result.weights.to_peft_state_dict().items())

    inputs = [question["input"], _questions("LaMP-4")[1]["input"]]
    from_dir = prisp.generate(base, out, task, inputs, max_new_tokens=4)
    assert from_dir == prisp.generate(base, result, task, inputs, max_new_tokens=4)
    assert len(from_dir) == 2 and all(isinstance(a, str) for a in from_dir)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    prisp.generate(base, anchor, task, inputs[:1], max_new_tokens=2)
    prisp.generate(base, None, task, inputs[:1], max_new_tokens=2)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())  # base never touched


def test_label_answers_come_from_the_personalized_adapter(base, hypernet_dir):
    task = prisp.load_task("LaMP-2N")
    questions = _questions("LaMP-2N")
    anchor = prisp.make_anchor(base, task, hypernet=hypernet_dir)
    result = prisp.personalize_user(base, anchor, task, questions[0]["profile"], strategy="oppu", epochs=1)
    inputs = [q["input"] for q in questions[:3]]
    answers = prisp.generate(base, result, task, inputs)
    from prisp.data.tasks import label_set

    labels = label_set("LaMP-2N", inputs)
    assert all(a in labels for a in answers)
    model = attach_lora(shared_copy(base.model), result.weights).eval()
    from prisp.data.prompts import query_prompt

    expected = score_labels(model, base.tokenizer, [query_prompt("LaMP-2N", t, labels) for t in inputs], labels)
    assert answers == list(expected.choices)


def test_bad_input_gets_one_line_errors(base, hypernet_dir):
    task = prisp.load_task("LaMP-4")
    anchor = prisp.make_anchor(base, task, hypernet=hypernet_dir)
    with pytest.raises(prisp.DataError, match="profile item"):
        prisp.personalize_user(base, anchor, task, [{"id": "1", "text": "no title"}])
    with pytest.raises(prisp.DataError, match="list of items"):
        prisp.personalize_user(base, anchor, task, "not a list")
    with pytest.raises(prisp.DataError, match="empty"):
        prisp.personalize_user(base, anchor, task, [])
    with pytest.raises(prisp.PrispError, match="strategy"):
        prisp.personalize_user(base, anchor, task, _questions("LaMP-4")[0]["profile"], strategy="magic")
    with pytest.raises(prisp.DataError, match="non-empty list"):
        prisp.generate(base, None, task, "one string, not a list")
    with pytest.raises(prisp.DataError, match="decode"):
        prisp.generate(base, None, task, ["x"], decode="beam")
    with pytest.raises(prisp.DataError, match="generation task"):
        prisp.generate(base, None, task, ["x"], decode="labels")


@pytest.mark.slow
def test_the_python_api_doc_example_runs_on_the_default_model(tmp_path):
    """docs/python-api.md's example, extracted and run as written (real model, shipped hypernetwork)."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "users" / "u0" / "personalization.json").is_file()
    assert "personalized:" in done.stdout and "anchor:" in done.stdout


def test_the_api_docstring_examples_run():
    """prisp.api's docstring examples (those that need the real model are marked +SKIP there and run verbatim
    in docs/python-api.md's test instead)."""
    import doctest

    import prisp.api

    failed, attempted = doctest.testmod(prisp.api, optionflags=doctest.ELLIPSIS)
    assert attempted >= 3 and failed == 0
