"""The one atomic write, directory swap and JSONL log every writer in prisp uses."""

import json
import os
import stat

import pytest

from prisp.files import JsonlLog, swap_into_place, write_atomic, write_json_atomic


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole_and_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})  # fails before anything touches the disk
    with pytest.raises(TypeError):
        write_atomic(target, 42)
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_private_writes_are_0600_in_0700_folders_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "secret" / "k", b"x", private=True)
        write_atomic(tmp_path / "public" / "p", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "secret") == 0o700 and _mode(tmp_path / "secret" / "k") == 0o600
    assert _mode(tmp_path / "public" / "p") == 0o644  # an ordinary output follows the umask


def test_write_json_atomic_round_trips_unicode(tmp_path):
    write_json_atomic(tmp_path / "o.json", {"title": "Café — naïve"})
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8")) == {"title": "Café — naïve"}


def test_swap_into_place_replaces_a_directory_and_restores_it_on_failure(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    swap_into_place(new, out)
    assert (out / "f").read_text() == "new" and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy is gone

    again = tmp_path / "again"
    again.mkdir()
    real_replace = os.replace

    def refuse_second(src, dst):
        if str(src) == str(again):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_second)
    with pytest.raises(OSError, match="disk full"):
        swap_into_place(again, out)
    assert (out / "f").read_text() == "new"


def test_jsonl_log_skips_a_torn_line_and_appends_on_a_fresh_one(tmp_path):
    log = JsonlLog(tmp_path / "sub" / "log.jsonl")
    assert log.records() == []
    log.append({"n": 1, "text": "é"})
    with log.path.open("a") as handle:
        handle.write('{"n": 2, "te')  # a crash in the middle of a write
    log.append({"n": 3}, sync=False)
    assert [r["n"] for r in log] == [1, 3]
    assert log.path.read_text(encoding="utf-8").splitlines()[-1] == '{"n": 3}'
    log.rewrite(r for r in log.records() if r["n"] > 1)
    assert log.records() == [{"n": 3}]


def test_jsonl_log_ignores_lines_that_are_json_but_not_records(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1}\n[1, 2]\n\n\xff\xfe\n{"n": 2}\n')
    assert JsonlLog(path).records() == [{"n": 1}, {"n": 2}]


def test_default_data_locations_follow_env_then_working_directory(tmp_path, monkeypatch):
    from prisp.data.locations import SAMPLE_DIR, default_data_dir, default_sni_file

    monkeypatch.delenv("PRISP_DATA", raising=False)
    monkeypatch.delenv("PRISP_SNI", raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    assert default_data_dir() == SAMPLE_DIR and (SAMPLE_DIR / "LaMP-4").is_dir()
    shared = tmp_path / "shared" / "data" / "lamp-offline"
    # The benchmark looks beside the working directory, never beside the installed package.
    assert default_data_dir(benchmark=True).resolve() == shared
    assert default_data_dir(benchmark=True, sample_if_missing=True) == SAMPLE_DIR
    shared.mkdir(parents=True)
    assert default_data_dir(benchmark=True, sample_if_missing=True).resolve() == shared
    assert default_sni_file().resolve() == tmp_path / "shared" / "data" / "sni" / "tasks.jsonl"
    monkeypatch.setenv("PRISP_DATA", str(tmp_path / "mine"))
    monkeypatch.setenv("PRISP_SNI", str(tmp_path / "sni.jsonl"))
    assert default_data_dir() == default_data_dir(benchmark=True) == tmp_path / "mine"
    assert default_sni_file() == tmp_path / "sni.jsonl"


def test_read_jsonl_names_the_bad_line_and_skips_blank_ones(tmp_path):
    from prisp.errors import DataError
    from prisp.files import read_jsonl

    good = tmp_path / "in.jsonl"
    good.write_text('{"a": 1}\n\n[2]\n')
    assert list(read_jsonl(good)) == [(f"{good}:1", {"a": 1}), (f"{good}:3", [2])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_jsonl(bad))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_jsonl(latin))
