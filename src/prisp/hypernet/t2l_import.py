"""Use a published Text-to-LoRA checkpoint (``hypermod.pt`` + ``args.yaml``) to generate anchors.

T2L (SakanaAI/text-to-lora) publishes one directory per base model (e.g. ``trained_t2l/mistral_7b_t2l``)
holding ``hypermod.pt`` (a plain ``state_dict`` written with ``torch.save``), ``args.yaml`` (the training
arguments: ``model_dir`` = base model, ``emb_model``, ``target_modules``, ``hypernet_latent_size``,
``head_in_size``, ``training_task`` ...) and ``adapter_config.json`` (the peft LoRA config: r 8,
alpha 16, rsLoRA; without it we use T2L's training defaults, alpha 2r, rsLoRA, dropout 0.05, and say so).
This module reads that layout without T2L's code and without network access:

* ``hypermod.pt`` is read with ``torch.load(weights_only=True)`` only, so a file holding pickled Python
  objects is refused before any of them is built; every tensor's name and shape is then checked against
  the layout of :mod:`prisp.hypernet.t2l_model` and the base model's shapes (its config alone).
* Supported: the variant T2L's released checkpoints use -- ``training_task: sft``, ``encoder_type:
  linear``, LoRA output, no ``shared_AB_head`` / ``autoreg_gen`` / one-hot task embeddings. Anything else
  is refused with one line (reconstruction-trained checkpoints rescale their output in ways we have not
  verified).
* The description encoder is a separate model (``Alibaba-NLP/gte-large-en-v1.5``, CLS pooling, for the
  released checkpoints); the user must have it locally (``encoder_dir``). We format and pool as T2L does
  (trailing full stop, CLS for ``gte`` models, last token otherwise, L2-normalised times ``sqrt(dim)``),
  in float32 (T2L runs non-gte encoders in bfloat16, so the last bits can differ). Without ``encoder_dir``
  we use the base model when T2L did (empty ``emb_model``), else the packaged MiniLM encoder, refused when
  its 384-d output does not match the checkpoint.
* T2L numbers its module types in the iteration order of peft's ``target_modules`` *set*, which Python
  randomises per process for strings; we use the order listed in ``args.yaml`` unless told otherwise
  (``module_order``). Only the module-type embedding row depends on it.

The result is a standard peft LoRA (:class:`prisp.adapters.LoraWeights`), written with ``save_adapter``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from prisp.adapters import LoraSpec, save_adapter
from prisp.adapters.io import read_spec
from prisp.errors import AdapterError, DataError, ModelNotFoundError
from prisp.hypernet.anchor import AnchorResult, model_shapes, timed_generation
from prisp.hypernet.checkpoint import check_fits
from prisp.hypernet.encoders import DescriptionEncoder
from prisp.hypernet.t2l_model import T2LConfig, T2LHyperModulator

WEIGHTS_FILE = "hypermod.pt"
ARGS_FILE = "args.yaml"
PEFT_CONFIG_FILE = "adapter_config.json"
MINILM_DIM = 384
_IGNORED_PREFIXES = ("mean_recon_target.", "std_recon_target.")  # reconstruction training only
# args.yaml option -> the value our re-implementation supports (T2L's defaults when absent).
_REQUIRED_OPTIONS = {"training_task": "sft", "encoder_type": "linear", "shared_AB_head": False,
                     "autoreg_gen": False, "use_one_hot_task_emb": False}


@dataclass
class T2LCheckpoint:
    """A loaded T2L hypernetwork (eval mode, float32) and what its directory says about it.

    Attributes:
        hypernet: The network.
        base_model: ``model_dir`` from ``args.yaml`` (the base model it was trained for).
        emb_model: ``emb_model`` from ``args.yaml`` (empty: the base model embedded the descriptions).
        pooling: ``cls`` or ``last_token``, as T2L picks it from ``emb_model``.
        path: The checkpoint directory.
        lora_source: Where the LoRA rank/scale came from (``adapter_config.json`` or T2L's defaults).
    """

    hypernet: T2LHyperModulator
    base_model: str
    emb_model: str
    pooling: str
    path: Path
    lora_source: str

    @property
    def config(self) -> T2LConfig:
        return self.hypernet.config


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(hypermod.pt, directory holding args.yaml)`` for a T2L directory or a ``hypermod.pt`` path.

    Intermediate checkpoints live in ``<run>/checkpoints/it_<step>/hypermod.pt`` with ``args.yaml`` in
    ``<run>``, as T2L saves them.

    Raises:
        AdapterError: Nothing there.
    """
    path = Path(path)
    if path.is_file():
        weights, run = path, path.parent
        if not (run / ARGS_FILE).is_file() and run.parent.name == "checkpoints":
            run = run.parent.parent
        return weights, run
    if not path.is_dir():
        raise AdapterError(f"T2L checkpoint {path} does not exist")
    return path / WEIGHTS_FILE, path


def read_args(run_dir: Path) -> dict:
    """``args.yaml`` parsed with ``yaml.safe_load`` and checked for the supported variant.

    Raises:
        AdapterError: Missing, not YAML, not a mapping, lacking ``model_dir``/``target_modules``, or a
            variant we do not support (one line naming the option).
    """
    file = run_dir / ARGS_FILE
    if not file.is_file():
        raise AdapterError(f"T2L checkpoint {run_dir} has no {ARGS_FILE} (T2L's training arguments)")
    try:
        args = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise AdapterError(f"{file} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(args, dict):
        raise AdapterError(f"{file} must be a mapping of T2L options, got {type(args).__name__}")
    if not isinstance(args.get("model_dir"), str) or not args["model_dir"]:
        raise AdapterError(f"{file} lacks model_dir (the base model T2L was trained for)")
    targets = args.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets) \
            or len(set(targets)) != len(targets):
        raise AdapterError(f"{file}: target_modules must be a list of distinct module names, got {targets!r}")
    for option, supported in _REQUIRED_OPTIONS.items():
        value = args.get(option, supported)
        if value != supported and not (supported is False and value is None):
            raise AdapterError(f"{file}: {option}={value!r} is not supported (only {supported!r}; prisp "
                               "re-implements the variant of T2L's released checkpoints)")
    if args.get("exp_setup", "hyper_lora") not in ("hyper_lora", None):
        raise AdapterError(f"{file}: exp_setup={args['exp_setup']!r} is not supported (only 'hyper_lora')")
    if not isinstance(args.get("emb_model") or "", str):
        raise AdapterError(f"{file}: emb_model must be a model name, got {args['emb_model']!r}")
    return args


def pooling_for(emb_model: str) -> str:
    """T2L's pooling for an embedding model name: CLS for ``gte`` models, the last token otherwise.

    Raises:
        AdapterError: SFR models (T2L wraps their input in a template we have not verified).
    """
    if "SFR" in emb_model:
        raise AdapterError(f"description encoder {emb_model} (SFR) is not supported: T2L wraps its input in a "
                           "template prisp does not re-implement")
    return "cls" if "gte" in emb_model else "last_token"


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``hypermod.pt``; nothing but tensors (and their containers) is ever unpickled."""
    if not file.is_file():
        raise AdapterError(f"T2L checkpoint {file.parent} has no {file.name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: (\S+ \S+)", str(exc))
        why = f"it holds pickled Python objects ({found.group(1)})" if found else "it is not a tensor checkpoint"
        raise AdapterError(f"refusing {file}: {why}; only plain tensor state dicts are read "
                           "(torch.load weights_only=True)") from None
    except Exception as exc:  # noqa: BLE001 -- corrupt zip, truncated file ...: one line, never a traceback
        first = (str(exc).splitlines() or [""])[0][:200]
        raise AdapterError(f"T2L weights {file} are not a complete torch checkpoint (truncated or corrupt; "
                           f"{type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise AdapterError(f"{file} is not a state dict (a mapping of names to tensors)")
    return state


def _lora_spec(run_dir: Path, targets: list[str], rank: int) -> tuple[LoraSpec, str]:
    """The emitted LoRA's spec: ``adapter_config.json`` when present, else T2L's training defaults."""
    file = run_dir / PEFT_CONFIG_FILE
    if not file.is_file():
        # T2L's get_peft_config: lora_alpha = 2 r, rsLoRA, dropout 0.05 (r from the weights).
        return LoraSpec(r=rank, alpha=2 * rank, dropout=0.05, target_modules=tuple(targets), use_rslora=True), \
            "T2L's defaults (no adapter_config.json): alpha 2r, rsLoRA"
    spec = read_spec(file)
    if set(spec.target_modules) != set(targets):
        raise AdapterError(f"{file}: target_modules {list(spec.target_modules)} differ from args.yaml's {targets}")
    if spec.r != rank:
        raise AdapterError(f"{file} says r={spec.r} but {WEIGHTS_FILE} holds rank-{rank} factors")
    return LoraSpec(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=tuple(targets),
                    use_rslora=spec.use_rslora), PEFT_CONFIG_FILE


def _geometry(state: dict, targets: list[str], file: Path) -> tuple[int, int, int, dict[str, tuple[int, int]]]:
    """``(embed_dim, num_layers, rank, module shapes)`` read off the tensors that define them."""
    def shape(key: str, dims: int) -> list[int]:
        if key not in state:
            raise AdapterError(f"{file} lacks {key} (not a T2L SFT hypernetwork)")
        if state[key].dim() != dims:
            raise AdapterError(f"{file}: {key} has shape {list(state[key].shape)}, expected {dims} dimensions")
        return list(state[key].shape)

    embed_dim = shape("task_encoder.mlp.0.weight", 2)[1]
    num_layers = shape("layer_depth_encoder.0.weight", 2)[0]
    modules, ranks = {}, set()
    for name in targets:
        _, rank, d_in = shape(f"AB_offset.A.{name}", 3)
        _, d_out, rank_b = shape(f"AB_offset.B.{name}", 3)
        ranks |= {rank, rank_b}
        modules[name] = (d_in, d_out)
    if len(ranks) != 1:
        raise AdapterError(f"{file}: LoRA offsets disagree on the rank ({sorted(ranks)})")
    return embed_dim, num_layers, ranks.pop(), modules


def load_t2l(path: str | os.PathLike, shapes: dict | None = None, module_order: list[str] | None = None
             ) -> T2LCheckpoint:
    """Load and validate a T2L checkpoint directory (or a ``hypermod.pt`` inside a T2L run).

    Args:
        path: Directory with ``hypermod.pt`` and ``args.yaml`` (``adapter_config.json`` optional).
        shapes: The base model's ``(layer, module) -> (in, out)``; when given, a checkpoint made for other
            shapes is refused.
        module_order: T2L's module-type numbering (default: ``args.yaml``'s ``target_modules`` order).

    Raises:
        AdapterError: Missing/malformed files, unsupported variant, or a key or shape that does not match
            (one line each).
    """
    weights_file, run_dir = locate(path)
    args = read_args(run_dir)
    targets = list(args["target_modules"])
    if module_order is not None:
        if sorted(module_order) != sorted(targets):
            raise AdapterError(f"module order {module_order} is not a permutation of target_modules {targets}")
        targets = list(module_order)
    pooling = pooling_for(args.get("emb_model") or "")
    state = _load_state(weights_file)
    embed_dim, num_layers, rank, modules = _geometry(state, targets, weights_file)
    spec, lora_source = _lora_spec(run_dir, targets, rank)
    config = T2LConfig(embed_dim=embed_dim, num_layers=num_layers, modules=modules,
                       latent_size=args.get("hypernet_latent_size", 128), head_in_size=args.get("head_in_size", 512),
                       head_bias=args.get("mt_lora_path") is None, spec=spec)
    if shapes is not None:
        check_fits(config, shapes, where=f"T2L checkpoint {run_dir}")
    hypernet = T2LHyperModulator(config)
    _check_state(hypernet, state, weights_file)
    with torch.no_grad():
        hypernet.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)},
                                 strict=True)
    hypernet.eval()
    return T2LCheckpoint(hypernet=hypernet, base_model=args["model_dir"], emb_model=args.get("emb_model") or "",
                         pooling=pooling, path=run_dir, lora_source=lora_source)


def _check_state(hypernet: T2LHyperModulator, state: dict, file: Path) -> None:
    """Every expected tensor present with its shape, nothing unexpected, all floating point and finite."""
    expected = hypernet.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise AdapterError(f"{file} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(_IGNORED_PREFIXES))
    if unexpected:
        raise AdapterError(f"{file} has an unexpected tensor {unexpected[0]} (not in the supported T2L SFT layout)")
    for key, want in expected.items():
        got = state[key]
        if list(got.shape) != list(want.shape):
            raise AdapterError(f"{file}: {key} has shape {list(got.shape)}, expected {list(want.shape)} "
                               "(args.yaml, adapter_config.json and the base model disagree with the weights)")
        if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
            raise AdapterError(f"{file}: {key} is not finite floating point ({got.dtype})")


def add_full_stop(text: str) -> str:
    """T2L's description formatting: strip, then end with a full stop when the text ends in a letter."""
    text = text.strip()
    return text + "." if text and text[-1].isalpha() else text


class T2LEncoder(DescriptionEncoder):
    """A local copy of T2L's description encoder (any ``AutoModel`` directory), pooled as T2L pools it."""

    max_length = 8192  # T2L's tokenizer limit for descriptions

    def __init__(self, path: str | os.PathLike, pooling: str, trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("cls", "last_token"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.name, self.pooling = f"t2l:{Path(path).name}", pooling
        options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), **options)
            self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32, **options).eval()
        except (OSError, ValueError) as exc:
            text = str(exc)
            if "trust_remote_code" in text:
                raise ModelNotFoundError(f"description encoder {path} needs its own modelling code; pass "
                                         "--trust-remote-code if you trust that directory") from None
            raise ModelNotFoundError(f"cannot load the description encoder from {path}: "
                                     f"{(text.splitlines() or [type(exc).__name__])[0]}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def _pooled(self, texts: list[str]) -> torch.Tensor:  # [T, dim]
        batch = self.tokenizer([add_full_stop(t) for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # [T, n, dim]
        if self.pooling == "cls":
            return hidden[:, 0]
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.shape[0]), last]


def make_t2l_encoder(checkpoint: T2LCheckpoint, encoder_dir: str | os.PathLike | None, model_name: str,
                     trust_remote_code: bool = False) -> tuple[DescriptionEncoder, list[str]]:
    """The description encoder for ``checkpoint`` and notes worth telling the user.

    Raises:
        AdapterError: The encoder's embedding size differs from what the checkpoint reads.
    """
    want, trained_with = checkpoint.config.embed_dim, checkpoint.emb_model or "the base model"
    notes: list[str] = []
    if encoder_dir is not None:
        encoder: DescriptionEncoder = T2LEncoder(encoder_dir, checkpoint.pooling, trust_remote_code)
    elif not checkpoint.emb_model:
        from prisp.models import resolve_model

        encoder = T2LEncoder(resolve_model(model_name)[0], checkpoint.pooling, trust_remote_code)
    else:
        if want != MINILM_DIM:
            raise AdapterError(f"the T2L checkpoint reads {want}-d descriptions from {trained_with} but the packaged "
                               f"minilm encoder gives {MINILM_DIM}-d; pass --encoder-dir with a local copy of "
                               f"{trained_with}")
        from prisp.hypernet.encoders import make_encoder

        encoder = make_encoder("minilm")
        if "minilm" not in checkpoint.emb_model.lower():
            notes.append(f"using the packaged minilm encoder although the checkpoint was trained with "
                         f"{trained_with}; pass --encoder-dir for meaningful anchors")
    if encoder.dim != want:
        raise AdapterError(f"the T2L checkpoint reads {want}-d descriptions (trained with {trained_with}) but the "
                           f"description encoder gives {encoder.dim}-d")
    return encoder, notes


@dataclass
class T2LAnchorer:
    """A loaded T2L checkpoint and its description encoder; same interface as :class:`Anchorer`."""

    checkpoint: T2LCheckpoint
    encoder: DescriptionEncoder
    model_name: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike, model_name: str | None = None,
             encoder_dir: str | os.PathLike | None = None, trust_remote_code: bool = False,
             module_order: list[str] | None = None) -> T2LAnchorer:
        """Load ``path`` for ``model_name`` (default: its ``args.yaml`` ``model_dir``), checked against the
        base model's config (no base weights are loaded unless the base model is the encoder)."""
        args = read_args(locate(path)[1])
        model_name = model_name or args["model_dir"]
        checkpoint = load_t2l(path, shapes=model_shapes(model_name, tuple(args["target_modules"])),
                              module_order=module_order)
        notes = [f"LoRA scale from {checkpoint.lora_source}"] if checkpoint.lora_source != PEFT_CONFIG_FILE else []
        encoder, more = make_t2l_encoder(checkpoint, encoder_dir, model_name, trust_remote_code)
        return cls(checkpoint, encoder, model_name, notes + more)

    @torch.no_grad()
    def generate(self, description: str) -> AnchorResult:
        """The LoRA T2L generates for ``description`` (deterministic).

        Raises:
            DataError: Empty description.
        """
        text = description.strip().strip("\"'").strip() if isinstance(description, str) else ""
        if not text:
            raise DataError("the task description is empty; describe the task in a sentence or two")
        return timed_generation(self.encoder, self.checkpoint.hypernet, text)

    def write(self, description: str, out_dir: str | os.PathLike) -> AnchorResult:
        """Generate and write the adapter atomically as a standard peft LoRA directory."""
        result = self.generate(description)
        report = {"generator": "text-to-lora", "checkpoint": str(self.checkpoint.path), "description": description,
                  "emb_model": self.checkpoint.emb_model, "encoder": self.encoder.name,
                  "lora_source": self.checkpoint.lora_source}
        result.out_dir = save_adapter(result.weights, out_dir, base_model_name=self.model_name,
                                      extra_files={"t2l_anchor.json": json.dumps(report, indent=1) + "\n"})
        return result

