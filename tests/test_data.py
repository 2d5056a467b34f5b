"""LaMP loading, validation errors, the few-shot protocol, prompts and retrieval."""

from __future__ import annotations

import json

import pytest

from prisp.data.lamp import ProfileItem, Query, group_by_user, load_history, load_split, load_task_split
from prisp.data.prompts import parse_input, query_prompt, render_item, retrieval_query, with_context
from prisp.data.protocol import per_pcs_split, recent_items, sample_task_queries
from prisp.data.tasks import LAMP2N_OFFICIAL_CATEGORIES, get_task, label_set, normalize_task_name
from prisp.errors import DataError
from prisp.retrieval import Bm25Retriever

LAMP4_INPUT = "Generate a headline for the following article: The mayor opened a new park on Sunday."


def _item(i: int, date: str | None = "2020-01-01", **fields) -> dict:
    out = {"id": f"q0-p{i}", "text": f"article number {i}", "title": f"Headline {i}", **fields}
    if date:
        out["date"] = date
    return out


def _write(tmp_path, questions, outputs, name="dev"):
    qp, op = tmp_path / f"{name}_questions.json", tmp_path / f"{name}_outputs.json"
    qp.write_text(json.dumps(questions) if not isinstance(questions, str) else questions)
    op.write_text(json.dumps(outputs) if not isinstance(outputs, str) else outputs)
    return qp, op


def _valid():
    questions = [{"id": "q0", "input": LAMP4_INPUT, "profile": [_item(1), _item(2)]},
                 {"id": "q1", "input": LAMP4_INPUT, "profile": [_item(1), _item(2)]}]
    outputs = {"task": "LaMP_4", "golds": [{"id": "q0", "output": "Park opens"}, {"id": "q1", "output": "New park"}]}
    return questions, outputs


def test_valid_split_loads_typed_records_and_groups_users(tmp_path):
    qp, op = _write(tmp_path, *_valid())
    split = load_split(qp, op, "LaMP-4")
    assert [q.id for q in split.queries] == ["q0", "q1"]
    assert split.queries[0].gold == "Park opens"
    assert split.queries[0].profile[0] == ProfileItem("q0-p1", {"text": "article number 1", "title": "Headline 1"},
                                                      "2020-01-01")
    assert list(split.users) == ["q0"] and len(split.users["q0"]) == 2


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda q, o: q[1].pop("input"), ["dev_questions.json", "'q1'", "'input'"]),
        (lambda q, o: q[0].pop("profile"), ["'q0'", "'profile'"]),
        (lambda q, o: q[0].__setitem__("profile", {"a": 1}), ["'q0'", "'profile' must be a list"]),
        (lambda q, o: q[0]["profile"].__setitem__(0, "text"), ["'q0'", "profile item must be an object"]),
        (lambda q, o: q[0]["profile"][1].pop("title"), ["'q0'", "'q0-p2'", "'title'", "LaMP-4"]),
        (lambda q, o: q[0]["profile"][0].__setitem__("text", ["x"]), ["'q0-p1'", "'text' must be a string"]),
        (lambda q, o: q[0]["profile"][0].pop("id"), ["'q0'", "missing field 'id'"]),
        (lambda q, o: o["golds"].pop(), ["'q1'", "has no gold", "dev_outputs.json"]),
        (lambda q, o: o.__setitem__("task", "LaMP_9"), ["dev_outputs.json", "unknown task"]),
        (lambda q, o: o.__setitem__("task", "LaMP_5"), ["for 'LaMP_5'", "'LaMP-4' was requested"]),
        (lambda q, o: o.pop("golds"), ["dev_outputs.json", "'golds'"]),
        (lambda q, o: q.append(dict(q[0])), ["'q0'", "duplicate id"]),
    ],
)
def test_malformed_inputs_give_one_line_errors_naming_file_record_and_field(tmp_path, mutate, expected):
    questions, outputs = _valid()
    mutate(questions, outputs)
    qp, op = _write(tmp_path, questions, outputs)
    with pytest.raises(DataError) as info:
        load_split(qp, op, "LaMP-4")
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_invalid_json_and_missing_files(tmp_path):
    qp, op = _write(tmp_path, '[{"id": "q0", "input": ', {"task": "LaMP-4", "golds": []})
    with pytest.raises(DataError, match=r"dev_questions.json: not valid JSON \(line 1"):
        load_split(qp, op, "LaMP-4")
    with pytest.raises(DataError, match="file not found"):
        load_split(tmp_path / "nope.json", op, "LaMP-4")
    with pytest.raises(DataError, match="unknown task 'LaMP-9'"):
        load_split(qp, op, "LaMP-9")


def test_task_split_layouts_and_missing_golds(tmp_path):
    questions, outputs = _valid()
    (tmp_path / "LaMP_4" / "dev").mkdir(parents=True)
    _write(tmp_path / "LaMP_4" / "dev", questions, outputs)
    assert len(load_task_split(tmp_path, "LaMP-4", "dev").queries) == 2
    (tmp_path / "LaMP_4" / "dev" / "dev_outputs.json").unlink()
    with pytest.raises(DataError, match="golds"):
        load_task_split(tmp_path, "LaMP-4", "dev")
    assert load_task_split(tmp_path, "LaMP-4", "dev", require_golds=False).queries[0].gold is None
    with pytest.raises(DataError, match="no test_questions.json for LaMP-4"):
        load_task_split(tmp_path, "LaMP-4", "test")


def test_history_file(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps([_item(1), _item(2)]))
    assert [i.id for i in load_history(path, "LaMP-4")] == ["q0-p1", "q0-p2"]
    path.write_text(json.dumps({"profile": []}))
    with pytest.raises(DataError, match="must be a list"):
        load_history(path, "LaMP-4")


def test_task_names_and_label_sets():
    assert normalize_task_name("LaMP_4") == normalize_task_name("lamp-4") == "LaMP-4"
    assert normalize_task_name("LaMP_2N") == "LaMP-2N"
    assert label_set("LaMP-1") == ("[1]", "[2]")
    assert label_set("LaMP-3") == ("1", "2", "3", "4", "5")
    assert len(label_set("LaMP-2")) == 15 and "true story" in label_set("LaMP-2")
    assert label_set("LaMP-2N", ["x categories: [sports, u.s. news] article: y"]) == ("sports", "u.s. news")
    assert label_set("LaMP-2N", ["no list here"]) == LAMP2N_OFFICIAL_CATEGORIES


def test_recent_items_sorts_by_date_and_falls_back_to_file_order():
    items = [ProfileItem(f"p{i}", {}, d) for i, d in enumerate(["2021-05-01", "2020-01-01", "2022-01-01",
                                                                 "2020-01-01"])]
    assert [i.id for i in recent_items(items, 3)] == ["p3", "p0", "p2"]  # same-day tie keeps file order
    undated = [ProfileItem(f"p{i}", {}) for i in range(12)]
    assert [i.id for i in recent_items(undated, 10)] == [f"p{i}" for i in range(2, 12)]
    assert len(recent_items(undated[:4], 10)) == 4
    with pytest.raises(DataError):
        recent_items(undated, 0)


def test_per_pcs_split_is_disjoint_seeded_and_sized():
    users = [f"u{i}" for i in range(40)]
    split = per_pcs_split(users, seed=3, n_targets=20)
    assert len(split.task_adaptive) == 10 and len(split.targets) == 20 and len(split.sharers) == 10
    assert set(split.task_adaptive) | set(split.targets) | set(split.sharers) == set(users)
    assert not set(split.task_adaptive) & set(split.targets)
    assert per_pcs_split(users, seed=3, n_targets=20) == split
    assert per_pcs_split(users, seed=4, n_targets=20) != split


def test_sample_task_queries_is_seeded_and_bounded():
    queries = [Query(f"q{i}", "x", ()) for i in range(80)]
    first = sample_task_queries(queries, 50, seed=1)
    assert len(first) == 50 and len({q.id for q in first}) == 50
    assert first == sample_task_queries(queries, 50, seed=1)
    assert len(sample_task_queries(queries[:5], 50)) == 5


def test_group_by_user_keys_by_identical_profiles():
    a, b = ProfileItem("a", {}), ProfileItem("b", {})
    users = group_by_user([Query("1", "", (a,)), Query("2", "", (a,)), Query("3", "", (b,))])
    assert {k: [q.id for q in v] for k, v in users.items()} == {"1": ["1", "2"], "3": ["3"]}


OFFICIAL_INPUTS = {
    "LaMP-1": ('For an author who has written the paper with the title "Deep Parsing", which reference is related? '
               'Just answer with "[1]" or "[2]" without explanation. [1]: "Shallow Parsing" [2]: "Fish Farming"'),
    "LaMP-2": ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
               "further explanation. tags: [sci-fi, comedy] description: A robot learns to love."),
    "LaMP-2N": ("Which category does this article relate to among the following categories? Just answer with the "
                "category name without further explanation. categories: [sports, crime] article: Team wins cup."),
    "LaMP-3": ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
               "without further explanation. review: Great blender."),
    "LaMP-4": LAMP4_INPUT,
    "LaMP-5": "Generate a title for the following abstract of a paper: We propose a parser.",
    "LaMP-7": "Paraphrase the following tweet without any explanation before or after it: I like rain.",
}


@pytest.mark.parametrize("task", list(OFFICIAL_INPUTS))
def test_official_inputs_parse_into_table16_prompts(task):
    parts = parse_input(task, OFFICIAL_INPUTS[task])
    assert parts.parsed
    prompt = query_prompt(task, OFFICIAL_INPUTS[task])
    assert prompt.startswith("User Instruction: ")
    assert OFFICIAL_INPUTS[task] not in prompt  # rebuilt from parts, not echoed


def test_prompt_parts_are_the_right_ones():
    p1 = parse_input("LaMP-1", OFFICIAL_INPUTS["LaMP-1"])
    assert p1.fields == {"title": "Deep Parsing", "reference_1": "Shallow Parsing", "reference_2": "Fish Farming"}
    assert query_prompt("LaMP-1", OFFICIAL_INPUTS["LaMP-1"]).endswith(
        "Paper Title: Deep Parsing Reference: [1] - Shallow Parsing [2] - Fish Farming Answer:")
    assert query_prompt("LaMP-4", LAMP4_INPUT) == ("User Instruction: Generate a headline for the following "
                                                    "article. Article: The mayor opened a new park on Sunday. Headline:")
    assert "categories: [sports, crime] Article: Team wins cup. Category:" in query_prompt(
        "LaMP-2N", OFFICIAL_INPUTS["LaMP-2N"])
    assert parse_input("LaMP-2", OFFICIAL_INPUTS["LaMP-2"]).labels == ("sci-fi", "comedy")


def test_unparseable_input_is_kept_verbatim():
    assert query_prompt("LaMP-4", "Summarize: cats") == "User Instruction: Summarize: cats Answer:"


def test_context_rendering_and_long_fields_are_clipped():
    item = ProfileItem("p", {"text": "word " * 400, "title": "T"})
    rendered = render_item("LaMP-4", item)
    assert rendered.endswith("... Headline: T") and len(rendered) < 700
    prompt = with_context("PROMPT", "LaMP-4", [item], profile_text="likes puns")
    assert prompt.startswith("User Profile: likes puns\nUser History:\nArticle: ") and prompt.endswith("\nPROMPT")
    assert with_context("PROMPT", "LaMP-4") == "PROMPT"


def test_bm25_retrieves_the_overlapping_item_and_handles_empty_history():
    spec = get_task("LaMP-4")
    items = [ProfileItem(str(i), {"text": t, "title": ""}) for i, t in
             enumerate(["stocks fell sharply today", "the mayor opened a park", "rain expected tomorrow"])]
    retriever = Bm25Retriever(spec.name, items)
    assert [i.id for i in retriever.top_k(retrieval_query("LaMP-4", LAMP4_INPUT), 1)] == ["1"]
    assert len(retriever.top_k("nothing matches", 2)) == 2  # ties keep chronological order
    assert Bm25Retriever(spec.name, []).top_k("anything", 1) == []


def test_snap_to_label_accepts_only_answers_that_start_with_a_label():
    from prisp.data.tasks import LAMP1_LABELS, LAMP3_LABELS, snap_to_label

    assert snap_to_label("1", LAMP1_LABELS) == "[1]"
    assert snap_to_label("[2] - SimCSE: Simple", LAMP1_LABELS) == "[2]"
    assert snap_to_label("1. The most relevant", LAMP1_LABELS) == "[1]"
    assert snap_to_label("The most relevant is [1]", LAMP1_LABELS) == "The most relevant is [1]"
    assert snap_to_label("12", LAMP1_LABELS) == "12"
    assert snap_to_label("4 stars", LAMP3_LABELS) == "4" and snap_to_label("10", LAMP3_LABELS) == "10"
    news = ("politics", "u.s. news", "world news")
    assert snap_to_label(" Politics.", news) == "politics"
    assert snap_to_label("U.S. News", news) == "u.s. news"
    assert snap_to_label("This article is about politics", news) == "This article is about politics"
    assert snap_to_label("anything", ()) == "anything"
