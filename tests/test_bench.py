"""``prisp bench``: the quick profile end to end, resuming, the report's numbers, the PRISP anchor hook and
``--workers`` (personal methods on a process pool give the sequential run's rows)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, random_init, shapes_for_model
from prisp.batch import available_cores
from prisp.bench import Anchor, BenchConfig, grid, profile_config, run_bench
from prisp.bench.cli import bench_command
from prisp.bench.report import adaptability, cost_summary, data_size_lines, data_size_series
from prisp.bench.results import ResultStore, row_key
from prisp.cli import app as prisp_app
from prisp.data.tasks import get_task
from prisp.errors import PrispError
from prisp.models import load_model
from prisp.personalize import STRATEGIES

PNG = b"\x89PNG\r\n\x1a\n"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench_command)

    @app.callback()
    def _root() -> None:  # keeps "bench" a subcommand, as in prisp's app
        pass

    return app


def _bench(out: Path, model_dir: Path, *extra: str):
    result = CliRunner().invoke(
        _app(),
        [
            "bench",
            "--profile",
            "quick",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    """One quick-profile run (tiny model, packaged sample, 2 users) shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "quick"
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test PRISP_HOME fixture
        mp.setenv("PRISP_HOME", str(tmp_path_factory.getbasetemp() / "prisp-home"))
        result = _bench(out, tiny_model_dir)
    return out, result.output


@pytest.fixture(scope="module")
def pooled_run(tiny_model_dir, tmp_path_factory):
    """The personal methods of LaMP-2N (main grid and data-size sweep) again, on two workers."""
    out = tmp_path_factory.mktemp("bench") / "pooled"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRISP_HOME", str(tmp_path_factory.getbasetemp() / "prisp-home"))
        result = _bench(out, tiny_model_dir, "--tasks", "LaMP-2N", "--methods", "oppu,prisp",
                        "--workers", "2")
    return out, result.output


@pytest.mark.encoder  # the quick grid picks Per-Pcs/PriME sharers with MiniLM
def test_quick_profile_writes_every_row_the_report_and_the_figures(quick_run, tiny_model_dir):
    out, output = quick_run
    config = profile_config("quick", model=str(tiny_model_dir), out=out)
    expected = sum(len(grid(config, task)) for task in config.tasks)
    rows = _rows(out)
    assert len(rows) == expected and f"{expected} rows written" in output
    assert len({row_key(r) for r in rows}) == len(rows)
    by = {(r["task"], r["method"], r["variant"], r["items"]): r for r in rows}
    for task in config.tasks:
        assert {(m, v) for (t, m, v, i) in by if t == task and i == 10} >= {
            ("np", "np"),
            ("prisp", "rag+pag"),
            ("prime", "pag"),
            ("per-pcs", "rag"),
        }
    for row in rows:
        assert set(row["metrics"]) and row["git_revision"] and row["config"]["profile"] == "quick"
    prime, prisp, np_row = (
        by[("LaMP-2N", "prime", "np", 10)],
        by[("LaMP-2N", "prisp", "np", 10)],
        by[("LaMP-2N", "np", "np", 10)],
    )
    assert prime["shared_params"] and not prisp["shared_params"] and not np_row["shared_params"]
    assert prime["details"]["sharer_seconds"] > 0 and prime["seconds"] > prime["details"]["own_seconds"]
    assert prisp["trainable_params"] > 0 and prisp["peak_memory_mb"] > 0 and np_row["seconds"] == 0
    assert (
        "task-adapted" in prisp["anchor"] and prisp["requires_task_data"]
    )  # tiny model: no hypernet, fallback
    assert {(r["method"], r["items"]) for r in rows if r["items"] in (1, 5)} == {
        (m, i) for m in ("per-pcs", "prime", "oppu", "prisp") for i in (1, 5)
    }
    users_of = {(r["task"], r["users"], r["items"]): {q["user"] for q in r["predictions"]} for r in rows}
    for row in rows:  # every query's answer is kept with its user and gold, in the row's score order
        records = row["predictions"]
        users = {r["user"] for r in records}
        assert len(records) == row["queries"] and len(users) == row["n_users"]
        assert users == users_of[(row["task"], row["users"], row["items"])]  # every method, the same users
        assert all(r["gold"] is not None and isinstance(r["output"], str) for r in records)
        assert (row["labels"] is not None) == (row["task"] == "LaMP-2N")
    report = (out / "report.md").read_text()
    assert "Shared Params" in report and "Requires Task Data" in report and "Avg." in report
    paired = report.split("## How much the differences mean")[1].split("##")[0]
    for name in ("NP", "OPPU", "Per-Pcs", "PriME"):
        assert f"| {name} | {', '.join(config.tasks)} | " in paired
        for task in config.tasks:  # and one row per task, so an average cannot hide a task
            assert f"| {name} | {task} | " in paired.split("Per task, best variant:")[1]
    for name in ("fig3_cost.png", "fig4_tradeoff.png", "fig6_data_size.png"):
        assert f"]({name})" in report and (out / name).read_bytes().startswith(PNG)


@pytest.mark.encoder  # the quick grid picks Per-Pcs/PriME sharers with MiniLM
def test_resumed_run_skips_done_rows_and_adds_no_duplicates(quick_run, tiny_model_dir, tmp_path):
    src, _ = quick_run
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    total = len(_rows(out))
    again = _bench(out, tiny_model_dir)
    assert f"0 rows written, {total} already done" in again.output
    lines = (out / "results.jsonl").read_text().splitlines()
    # Simulate a crash: the last three rows never made it, the one before was cut mid-line.
    (out / "results.jsonl").write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:40])
    resumed = _bench(out, tiny_model_dir)
    assert "4 rows written" in resumed.output
    rows = ResultStore(out).rows
    assert len(rows) == total and len({row_key(r) for r in rows}) == total


def test_composite_cost_is_max_normalised_per_task_then_averaged():
    def row(method, task, seconds, memory, score):
        return {
            "method": method,
            "task": task,
            "variant": "np",
            "seconds": seconds,
            "peak_memory_mb": memory,
            "score": score,
            "trainable_params": 1,
            "details": {},
        }

    config = BenchConfig(tasks=("LaMP-4", "LaMP-5"), methods=("oppu", "prisp"))
    rows = [
        row("oppu", "LaMP-4", 10.0, 200.0, 0.2),
        row("prisp", "LaMP-4", 5.0, 100.0, 0.3),
        row("oppu", "LaMP-5", 4.0, 50.0, 0.4),
        row("prisp", "LaMP-5", 8.0, 100.0, 0.5),
    ]
    summary = cost_summary(config, rows)
    assert summary["oppu"]["composite"] == pytest.approx(((1 + 1) / 2 + (0.5 + 0.5) / 2) / 2)
    assert summary["prisp"]["composite"] == pytest.approx(((0.5 + 0.5) / 2 + (1 + 1) / 2) / 2)
    assert summary["prisp"]["score"] == pytest.approx(0.4) and summary["oppu"]["seconds"] == pytest.approx(
        7.0
    )


def test_prisp_anchor_comes_from_the_pluggable_provider(tiny_model_dir, tmp_path):
    calls = []

    def provider(request):
        calls.append(request.task)
        return Anchor(
            random_init(request.base, LoraSpec(), seed=7), "test-hypernet", requires_task_data=False
        )

    config = profile_config(
        "quick",
        model=str(tiny_model_dir),
        out=tmp_path,
        tasks=("LaMP-4",),
        methods=("prisp",),
        variants=("np",),
        data_sizes=(),
        users=1,
        progress=False,
    )
    outcome = run_bench(config, prisp_anchor=provider)
    (row,) = _rows(tmp_path)
    assert calls == ["LaMP-4"] and outcome.written == 1
    assert row["anchor"] == "test-hypernet" and row["requires_task_data"] is False
    assert not (tmp_path / "cache" / "LaMP-4" / "anchors").exists()  # no task data touched


def test_table4_starts_are_bench_rows_with_their_cost(tiny_model_dir, tmp_path):
    """PiSSA and LoRA-GA run as personal methods: rows with A and B trainable (App. D), time and memory, in the
    report's main and cost tables; they take no task data (the anchor gives only the LoRA's shape)."""
    def provider(request):
        return Anchor(random_init(request.base, LoraSpec(), seed=7), "test-hypernet", requires_task_data=False)

    config = profile_config("quick", model=str(tiny_model_dir), out=tmp_path, tasks=("LaMP-4",),
                            methods=("pissa", "lora-ga"), variants=("np",), data_sizes=(), users=1,
                            progress=False)
    outcome = run_bench(config, prisp_anchor=provider)
    rows = {row["method"]: row for row in _rows(tmp_path)}
    assert outcome.written == 2 and set(rows) == {"pissa", "lora-ga"}
    shapes = shapes_for_model(load_model(str(tiny_model_dir)).model)
    expected = sum(STRATEGIES["pissa"].trainable_formula(d_in, d_out, 8) for d_in, d_out in shapes.values())
    for row in rows.values():
        assert row["trainable_params"] == expected and row["requires_task_data"] is False
        assert row["seconds"] > 0 and row["peak_memory_mb"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| PiSSA |" in report and "| LoRA-GA |" in report


def test_bad_options_are_one_line_errors():
    with pytest.raises(PrispError, match="unknown profile"):
        profile_config("huge")
    with pytest.raises(PrispError, match="unknown benchmark method"):
        profile_config("quick", methods=("np", "magic"))
    with pytest.raises(PrispError, match="protocol"):
        profile_config("quick", protocol="zero-shot")


@pytest.mark.encoder  # the quick grid picks Per-Pcs/PriME sharers with MiniLM
def test_report_only_computes_nothing_and_lists_missing_cells(quick_run, tiny_model_dir, tmp_path):
    src, _ = quick_run
    out = tmp_path / "partial"
    shutil.copytree(src, out)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    dropped = [json.loads(line) for line in lines[-2:]]
    result = _bench(out, tiny_model_dir, "--report-only")
    assert "(2 grid cells not run yet)" in result.output
    assert len(_rows(out)) == len(lines) - 2  # nothing was computed
    report = (out / "report.md").read_text()
    assert "## Not run (2 cells)" in report
    for row in dropped:
        assert f"| {row['task']} | {row['method']} | {row['variant']} | {row['items']} |" in report


# What must not depend on where users ran (costs such as seconds and memory may).
SAME_ON_ANY_POOL = ("metrics", "score", "predictions", "queries", "n_users", "labels", "trainable_params",
                    "cached_users", "anchor", "requires_task_data")


@pytest.mark.encoder  # the quick grid picks Per-Pcs/PriME sharers with MiniLM
def test_two_workers_write_the_rows_of_the_sequential_run(quick_run, pooled_run):
    (sequential_out, _), (pooled_out, output) = quick_run, pooled_run
    pooled = {row_key(r): r for r in _rows(pooled_out)}
    sequential = {row_key(r): r for r in _rows(sequential_out) if row_key(r) in pooled}
    assert f"{len(pooled)} rows written" in output
    assert {(r["method"], r["items"]) for r in pooled.values()} == {
        (m, i) for m in ("oppu", "prisp") for i in (1, 5, 10)
    }
    assert sequential.keys() == pooled.keys()
    for key, row in pooled.items():
        assert {f: row[f] for f in SAME_ON_ANY_POOL} == {f: sequential[key][f] for f in SAME_ON_ANY_POOL}, key
        assert row["config"]["workers"] == 2 and sequential[key]["config"]["workers"] == 1
        host = row["host"]
        assert host["workers"] == 2 and host["threads_per_worker"] == max(1, available_cores() // 2)
        assert sequential[key]["host"]["workers"] == 1
        assert set(row["details"]["workers"]) == {q["user"] for q in row["predictions"]}
    # Every cell of the task ran on the same two processes: the model was loaded once per worker.
    assert 1 <= len({w for r in pooled.values() for w in r["details"]["workers"].values()}) <= 2
    assert all(r["cached_users"] == r["n_users"] for r in pooled.values() if r["variant"] != "np")


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_below_one_are_refused_with_one_line(workers, tmp_path):
    result = CliRunner().invoke(prisp_app, ["bench", "--profile", "quick", "--workers", workers,
                                            "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"prisp: error: --workers must be a positive integer, got {workers}"
    assert not (tmp_path / "out").exists()


def test_rows_are_keyed_by_schedule_and_old_rows_read_as_paper(tmp_path):
    from prisp.bench.results import Cell
    from prisp.bench.runner import cell_key

    cell = Cell("LaMP-4", "prisp", "np", 10, 4)
    paper = cell_key(profile_config("quick", tasks=("LaMP-4",)), cell)
    tuned = cell_key(profile_config("quick", tasks=("LaMP-4",), schedule="tuned"), cell)
    assert paper != tuned
    config = profile_config("quick", tasks=("LaMP-4",))
    old_row = {"model": config.model, "protocol": config.protocol, "split": config.split, "task": "LaMP-4",
               "method": "prisp", "variant": "np", "items": 10, "users": 4}
    assert row_key(old_row) == paper
    result = CliRunner().invoke(prisp_app, ["bench", "--profile", "quick", "--schedule", "fast",
                                            "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and "--schedule must be one of paper, tuned" in result.stderr
    assert not (tmp_path / "out").exists()


def test_tuned_schedule_run_trains_with_the_tuned_rows(tiny_model_dir, tmp_path, monkeypatch):
    """``--schedule tuned`` end to end: its rows carry the schedule and the adapters the tuned hyperparameters."""
    from prisp.personalize.hyperparams import TUNED

    monkeypatch.setenv("PRISP_HOME", str(tmp_path / "home"))
    out = tmp_path / "tuned"
    _bench(out, tiny_model_dir, "--tasks", "LaMP-4", "--methods", "np,anchor,prisp", "--variants", "np",
           "--schedule", "tuned")
    rows = [r for r in _rows(out) if r["method"] == "prisp"]
    assert rows and all(r["schedule"] == "tuned" for r in _rows(out))
    # The Stage-1-only row: PRISP's own anchor, nothing trained per user.
    (anchor_row,) = [r for r in _rows(out) if r["method"] == "anchor" and r["items"] == rows[0]["items"]]
    assert anchor_row["kind"] == "anchor" and anchor_row["anchor"] == rows[0]["anchor"]
    assert anchor_row["trainable_params"] in (0, None) and not anchor_row["cached_users"]
    reports = list((out / "cache").rglob("personalization.json"))
    assert reports
    for path in reports:
        used = json.loads(path.read_text())["hyperparameters"]
        tuned = TUNED["prisp"]["LaMP-4"]
        assert (used["schedule"], used["lr"], used["epochs"]) == ("tuned", tuned.lr, tuned.epochs)
    assert "Stage-2 schedule `tuned`" in (out / "report.md").read_text()


def test_data_sizes_none_skips_the_sweep_and_bad_sizes_are_one_line(tmp_path):
    from prisp.bench.cli import _data_sizes
    from prisp.bench.runner import grid

    config = profile_config("quick", data_sizes=_data_sizes("none"))
    assert config.data_sizes == () and all(cell.items == config.items for cell in grid(config, "LaMP-2N"))
    assert {cell.items for cell in grid(profile_config("quick"), "LaMP-2N")} > {config.items}
    result = CliRunner().invoke(prisp_app, ["bench", "--profile", "quick", "--data-sizes", "1,five",
                                            "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "prisp: error: --data-sizes takes item counts such as 1,5,10 or none, got '1,five'"
    assert not (tmp_path / "out").exists()


def test_data_size_tasks_and_users_shape_the_sweep_and_a_stray_task_is_one_line(tmp_path):
    config = profile_config("quick", tasks=("LaMP-2N", "LaMP-4"), data_size_tasks=("LaMP-2N", "LaMP-4"),
                            data_size_users=3)
    for task in config.tasks:
        swept = [cell for cell in grid(config, task) if cell.items != config.items]
        assert {(cell.items, cell.users) for cell in swept} == {(size, 3) for size in config.data_sizes}
    result = CliRunner().invoke(prisp_app, ["bench", "--profile", "quick", "--tasks", "LaMP-2N",
                                            "--data-size-tasks", "LaMP-2N,LaMP-4", "--out", str(tmp_path / "out"),
                                            "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "prisp: error: --data-size-tasks LaMP-4 not among --tasks (LaMP-2N)"
    assert not (tmp_path / "out").exists()


def test_data_size_section_reads_each_task_their_mean_and_the_rise(tmp_path):
    config = profile_config("quick", tasks=("LaMP-2N", "LaMP-4"), methods=("oppu", "prisp"),
                            data_sizes=(1, 10), data_size_tasks=("LaMP-2N", "LaMP-4"))
    scores = {("LaMP-2N", "prisp"): (0.2, 0.6), ("LaMP-2N", "oppu"): (0.3, 0.3),
              ("LaMP-4", "prisp"): (0.1, 0.2), ("LaMP-4", "oppu"): (0.1, None)}
    rows = [{"task": task, "method": method, "items": size, "score": score}
            for (task, method), pair in scores.items() for size, score in zip((1, 10), pair) if score is not None]
    series = data_size_series(config, rows)
    assert series["LaMP-2N"] == {"OPPU": [0.3, 0.3], "PRISP (Ours)": [0.2, 0.6]}
    assert series["LaMP-4"]["OPPU"] == [0.1, None]
    assert series["mean"]["PRISP (Ours)"] == pytest.approx([0.15, 0.4]) and series["mean"]["OPPU"] == pytest.approx([0.2, 0.3])
    lines = data_size_lines(config, rows, tmp_path)
    assert "| LaMP-2N | PRISP (Ours) | 0.200 | 0.600 | 0.400 |" in lines
    assert "| LaMP-4 | OPPU | 0.100 | – | – |" in lines  # one size measured: no rise to read
    assert (tmp_path / "fig6_data_size.png").read_bytes().startswith(PNG)


@pytest.mark.encoder  # Per-Pcs picks sharers with MiniLM
def test_cross_task_cells_reuse_the_source_pool_and_the_report_divides(tiny_model_dir, tmp_path):
    """Figure 7: with --cross-task each sharer method also runs on every task with the other task's pool (its
    sharers, trained on that task's sharer users); the main tables keep own-pool rows only, and the report's
    adaptability is source-pool score / own-pool score on the same users, with a heat map."""
    config = profile_config("quick", model=str(tiny_model_dir), out=tmp_path, methods=("per-pcs",),
                            variants=("np",), data_sizes=(), users=1, cross_task=True, progress=False)
    assert sorted((c.task, c.source) for c in grid(config, "LaMP-4")) == [("LaMP-4", ""), ("LaMP-4", "LaMP-2N")]
    outcome = run_bench(config)
    rows = {(r["task"], r["source"]): r for r in _rows(tmp_path)}
    assert outcome.written == 4 and set(rows) == {("LaMP-2N", ""), ("LaMP-2N", "LaMP-4"), ("LaMP-4", ""),
                                                  ("LaMP-4", "LaMP-2N")}
    for task, other in (("LaMP-2N", "LaMP-4"), ("LaMP-4", "LaMP-2N")):
        # The reused pool is the other task's: the same sharers its own cell used, and its anchor.
        assert rows[task, other]["details"]["pool_sharers"] == rows[other, ""]["details"]["pool_sharers"]
        assert rows[task, other]["details"]["pool_task"] == other and rows[task, ""]["details"]["pool_task"] == task
    report = (tmp_path / "report.md").read_text()
    table2 = report.split("## Every prompt variant")[0]
    assert f"{rows['LaMP-4', '']['score']:.3f}" in report and "Cross-task adaptability (Figure 7)" in report
    pairs = adaptability(config, list(rows.values()))["per-pcs"]
    for task, other in (("LaMP-2N", "LaMP-4"), ("LaMP-4", "LaMP-2N")):
        expected = rows[task, other]["score"] / rows[task, ""]["score"] if rows[task, ""]["score"] else None
        assert pairs[other, task]["ratio"] == expected
    assert "main rows" in table2 and "2 main rows" in report  # the two cross rows stay out of the main grid
    assert (tmp_path / "fig7_adaptability.png").read_bytes().startswith(PNG)
    assert run_bench(config).written == 0  # resumable: every cell, cross ones included, is keyed


def test_description_robustness_rows_anchor_from_each_wording(tiny_model_dir, tiny_hypernet_dir, tmp_path):
    """Figure 8: --descriptions adds Stage 1 (anchor) and Stage 2 (prisp) rows per wording beside the reference's;
    the paraphrase is the spec's, the imprecise one the nearest SNI train description under the hypernetwork's
    own encoder; each anchor really differs, and the report tabulates and draws them."""
    sni = tmp_path / "tasks.jsonl"
    records = [{"task": f"task{k}", "split": split, "definition": f"Definition {k}.",
                "descriptions": [text], "instances": [{"input": "q", "output": "a"}]}
               for k, (split, text) in enumerate([("train", "Write a headline for a news story."),
                                                  ("train", "Count the vowels in a word."),
                                                  ("heldout", "Generate a headline for an article.")])]
    sni.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bench"
    config = profile_config("quick", model=str(tiny_model_dir), out=out, tasks=("LaMP-4",), methods=("np",),
                            variants=("np",), data_sizes=(), users=1, descriptions=("paraphrase", "imprecise"),
                            sni=sni, hypernet=tiny_hypernet_dir, progress=False)
    outcome = run_bench(config)
    rows = {(r["method"], r["description"]): r for r in _rows(out)}
    assert outcome.written == 7 and set(rows) == {("np", ""), *{(m, d) for m in ("anchor", "prisp")
                                                                for d in ("", "paraphrase", "imprecise")}}
    wording = {d: rows["anchor", d]["details"]["description"] for d in ("paraphrase", "imprecise")}
    assert wording["paraphrase"]["text"] == dict(get_task("LaMP-4").alt_descriptions)["paraphrase"]
    assert wording["imprecise"]["text"] in {"Write a headline for a news story.", "Count the vowels in a word."}
    assert "nearest SNI train description" in wording["imprecise"]["origin"]
    assert rows["prisp", "imprecise"]["details"]["description"] == wording["imprecise"]
    adapters = {p.name for p in (out / "cache" / "LaMP-4" / "adapters").iterdir()}
    assert len(adapters) == 3  # one user's Stage 2 from three different anchors
    report = (out / "report.md").read_text()
    assert "## Description robustness (Figure 8)" in report and wording["paraphrase"]["text"] in report
    assert "1 main rows" in report  # the wording rows stay out of the main grid
    assert (out / "fig8_descriptions.png").read_bytes().startswith(PNG)
    with pytest.raises(PrispError, match="--descriptions takes"):
        profile_config("quick", descriptions=("vague",))
