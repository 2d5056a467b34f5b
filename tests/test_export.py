"""``prisp export vllm``: per-user adapters that plain peft loads and that reproduce prisp's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import typer
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from prisp.adapters import LoraSpec, attach_lora, random_init
from prisp.batch import DirectoryStore, export_vllm, load_users
from prisp.batch.cli import export_app
from prisp.data.locations import SAMPLE_DIR
from prisp.errors import DataError
from prisp.models import load_model
from prisp.personalize import PersonalizeConfig, personalize

app = typer.Typer()
app.add_typer(export_app, name="export")
app.command("noop")(lambda: None)  # a second command keeps typer from collapsing "export" into the root


@pytest.fixture(scope="module")
def trained_store(tiny_model_dir, tmp_path_factory):
    """Two users personalized in process (live models kept) and written to a directory store."""
    loaded = load_model(str(tiny_model_dir))
    # A non-zero anchor B, so the exported adapter differs from the base in every layer.
    anchor = random_init(loaded.model, LoraSpec(), seed=0)
    for pair in anchor.pairs.values():
        pair.B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    users = load_users(SAMPLE_DIR / "LaMP-4" / "dev_questions.json", "LaMP-4")
    store = DirectoryStore(tmp_path_factory.mktemp("store"))
    live = {}
    for job in users.jobs[:2]:
        result = personalize(loaded.model, loaded.tokenizer, anchor, "LaMP-4", job.items[:4],
                             PersonalizeConfig(max_length=96, progress=False, lr=5e-3), users.labels)
        store.put(job.user_id, result.weights, str(tiny_model_dir), {**result.report(), "job_key": "k"})
        live[job.user_id] = result.model
    return store, live, loaded


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5
def test_exported_adapters_load_in_plain_peft_and_match_prisp(trained_store, tiny_model_dir, tmp_path):
    store, live, loaded = trained_store
    out = tmp_path / "vllm"
    result = CliRunner().invoke(app, ["export", "vllm", "--store", str(store.root), "--out", str(out),
                                      "--base-model-name", "tiny-base"])
    assert result.exit_code == 0, result.output
    assert "2 adapters (max rank 8, base model 'tiny-base')" in result.stdout
    lines = (out / "lora_modules.txt").read_text().splitlines()
    entries = json.loads((out / "lora_modules.json").read_text())
    assert lines == [f"{u}={out / u}" for u in sorted(live)]
    assert entries == [{"name": u, "path": str(out / u), "base_model_name": "tiny-base"} for u in sorted(live)]
    ids = loaded.tokenizer("Generate a headline for the following article: council budget", return_tensors="pt")
    for user, trained in live.items():
        config = json.loads((out / user / "adapter_config.json").read_text())
        # What vLLM's filesystem LoRA resolver checks before it serves OUT/<name>.
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-base"
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        exported = PeftModel.from_pretrained(base, str(out / user)).eval()
        ours = attach_lora(copy.deepcopy(loaded.model), store.get(user).weights).eval()
        got = _logits(exported, ids["input_ids"])
        assert (got - _logits(ours, ids["input_ids"])).abs().max().item() <= 1e-5
        # ... and the folded adapter reproduces the live trained model (bridge C still separate).
        assert (got - _logits(trained.eval(), ids["input_ids"])).abs().max().item() <= 1e-5
        assert (got - _logits(loaded.model, ids["input_ids"])).abs().max().item() > 1e-4  # not a no-op


def test_export_refuses_an_empty_store(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(DataError, match="no finished users"):
        export_vllm(DirectoryStore(tmp_path / "store"), tmp_path / "out")
    result = CliRunner().invoke(app, ["export", "vllm", "--store", str(tmp_path / "missing"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.strip() == \
        f"prisp: error: adapter store {tmp_path / 'missing'} does not exist"
