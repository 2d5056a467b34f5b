"""The package as users get it: a wheel built with ``python -m build``, installed into a fresh virtual
environment (not editable), runs ``prisp demo`` and the custom-task example from a directory that has no
checkout around it, so nothing can come from the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real default model, a build and a venv: minutes


def run(args, cwd, timeout=900, env=None):
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv that sees this machine's packages (torch, transformers ...) but gets prisp only from the wheel."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs",
                                                                  "cache", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist", source], cwd=work)
    wheel = next((work / "dist").glob("prisp-*.whl"))
    run([sys.executable, "-m", "venv", "--system-site-packages", work / "venv"], cwd=work)
    python = work / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=work)
    return work, python


def test_the_installed_wheel_is_what_runs(venv):
    work, python = venv
    where = run([python, "-c", "import prisp, prisp.data.tasks as t; print(prisp.__file__); print(len(t.TASKS))"],
                cwd=work).stdout.split()
    assert where[0].startswith(str(work / "venv")) and where[1] == "8"  # 7 LaMP + LongLaMP-2


def test_prisp_demo_runs_from_the_wheel(venv, tmp_path):
    work, python = venv
    env = {k: v for k, v in os.environ.items() if k not in ("PRISP_DATA", "PYTHONPATH")}
    done = run([work / "venv" / "bin" / "prisp", "demo", "--tasks", "LaMP-2N"], cwd=tmp_path, env=env)
    assert "LaMP-4" in done.stdout and "PRISP" in done.stdout


def test_the_custom_task_example_runs_from_the_wheel(venv, tmp_path):
    work, python = venv
    example = tmp_path / "support_reply"
    shutil.copytree(ROOT / "examples" / "support_reply", example)
    env = {k: v for k, v in os.environ.items() if k not in ("PRISP_DATA", "PYTHONPATH")}
    prisp = work / "venv" / "bin" / "prisp"
    spec = example / "task.toml"
    run([prisp, "anchor", "--task", spec, "--out", tmp_path / "anchor"], cwd=tmp_path, env=env)
    run([prisp, "personalize", "--task", spec, "--anchor", tmp_path / "anchor", "--history",
         example / "history.jsonl", "--out", tmp_path / "maya"], cwd=tmp_path, env=env)
    answer = run([prisp, "generate", "--task", spec, "--adapter", tmp_path / "maya", "--input",
                  '{"ticket": "Can I pay by bank transfer?"}', "--max-new-tokens", "24"], cwd=tmp_path, env=env)
    assert answer.stdout.strip()
    run([prisp, "predict", "--task", spec, "--data", example / "data", "--method", "np", "--out",
         tmp_path / "preds.json"], cwd=tmp_path, env=env)
    scored = run([prisp, "eval", "--task", spec, "--golds", example / "data" / "support-reply" / "dev_outputs.json",
                  "--preds", tmp_path / "preds.json"], cwd=tmp_path, env=env)
    assert "rouge-1" in scored.stdout
    assert json.loads((tmp_path / "maya" / "personalization.json").read_text())["task"] == "support-reply"
