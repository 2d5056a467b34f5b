"""Plain LoRA weights as data: a ``(layer, module) -> (A, B)`` mapping plus its spec.

This is the currency between the hypernetwork, the bridge training and the exported peft
adapter. It converts to and from peft's state-dict naming so that anything we write is a
standard peft LoRA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prisp.adapters.config import LoraSpec
from prisp.errors import AdapterError

ModuleKey = tuple[int, str]  # (layer index, short module name such as "q_proj")
Shapes = dict[ModuleKey, tuple[int, int]]  # (in_features, out_features)

# Where each short name lives inside a decoder layer (Llama, Qwen, Gemma, Mistral ...).
DEFAULT_MODULE_PATHS: dict[str, str] = {
    **{name: f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")},
}
DEFAULT_LAYERS_PREFIX = "base_model.model.model.layers"

# peft names: "<prefix>.<i>.<path>.lora_A.weight"; tolerate an adapter name before ".weight".
_KEY_RE = re.compile(
    r"^(?P<prefix>.*layers)\.(?P<layer>\d+)\.(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)
_MODULE_RE = re.compile(r"^(?:(?P<prefix>.*)\.)?layers\.(?P<layer>\d+)\.(?P<path>.+)$")


@dataclass(frozen=True)
class ModuleSite:
    """Where a module sits: ``<layers_prefix>.<layer>.<path>``, e.g. path ``self_attn.q_proj``."""

    layers_prefix: str
    layer: int
    path: str

    @property
    def name(self) -> str:
        """Short module name, e.g. ``q_proj``."""
        return self.path.rsplit(".", 1)[-1]


def parse_module_name(qualified: str) -> ModuleSite | None:
    """Split a qualified module name at its decoder-layer index, or None outside the layers."""
    match = _MODULE_RE.match(qualified)
    if match is None:
        return None
    prefix = f"{match['prefix']}.layers" if match["prefix"] else "layers"
    return ModuleSite(layers_prefix=prefix, layer=int(match["layer"]), path=match["path"])


@dataclass
class LoraPair:
    """One module's low-rank factors; the update is ``scale * B @ A``.

    Attributes:
        A: Down projection, ``[r, in_features]``.
        B: Up projection, ``[out_features, r]``.
    """

    A: Tensor
    B: Tensor


@dataclass
class LoraWeights:
    """A complete LoRA adapter held in memory.

    Attributes:
        spec: Rank, scale and target modules.
        pairs: ``(layer_idx, module_name) -> LoraPair``.
        module_paths: Path of a short module name inside a decoder layer, when it differs
            from ``DEFAULT_MODULE_PATHS`` (filled in when parsed from a peft state dict).
        layers_prefix: peft key prefix up to and including ``layers``.
    """

    spec: LoraSpec
    pairs: dict[ModuleKey, LoraPair]
    module_paths: dict[str, str] = field(default_factory=dict)
    layers_prefix: str = DEFAULT_LAYERS_PREFIX

    def __post_init__(self) -> None:
        r = self.spec.r
        for (layer, name), pair in self.pairs.items():
            if pair.A.dim() != 2 or pair.B.dim() != 2 or pair.A.shape[0] != r or pair.B.shape[1] != r:
                raise AdapterError(
                    f"adapter layer {layer} {name} has A {list(pair.A.shape)} and B {list(pair.B.shape)}, "
                    f"expected A [{r}, in] and B [out, {r}]"
                )
            if name not in self.spec.target_modules:
                raise AdapterError(
                    f"adapter layer {layer} {name} is not in target_modules {self.spec.target_modules}"
                )

    def module_path(self, name: str) -> str:
        """Path of ``name`` inside a decoder layer, e.g. ``self_attn.q_proj``."""
        path = self.module_paths.get(name) or DEFAULT_MODULE_PATHS.get(name)
        if path is None:
            raise AdapterError(f"do not know where module {name} lives in a decoder layer")
        return path

    def num_parameters(self) -> int:
        """Total number of LoRA parameters (A and B)."""
        return sum(p.A.numel() + p.B.numel() for p in self.pairs.values())

    def to_peft_state_dict(self) -> dict[str, Tensor]:
        """Keys as ``get_peft_model_state_dict`` returns them (no adapter name)."""
        state: dict[str, Tensor] = {}
        for (layer, name), pair in sorted(self.pairs.items()):
            stem = f"{self.layers_prefix}.{layer}.{self.module_path(name)}"
            state[f"{stem}.lora_A.weight"] = pair.A
            state[f"{stem}.lora_B.weight"] = pair.B
        return state

    @classmethod
    def from_peft_state_dict(cls, state: Mapping[str, Tensor], spec: LoraSpec) -> LoraWeights:
        """Parse peft LoRA keys back into weights.

        Raises:
            AdapterError: On a key that is not a LoRA A/B weight or an unpaired factor.
        """
        factors: dict[ModuleKey, dict[str, Tensor]] = {}
        paths: dict[str, str] = {}
        prefixes: set[str] = set()
        for key, tensor in state.items():
            match = _KEY_RE.match(key)
            if match is None:
                raise AdapterError(f"adapter has an unexpected tensor {key} (only LoRA A/B weights are read)")
            path = match["path"]
            name = path.rsplit(".", 1)[-1]
            paths[name] = path
            prefixes.add(match["prefix"])
            factors.setdefault((int(match["layer"]), name), {})[match["which"]] = tensor
        if len(prefixes) > 1:
            raise AdapterError(f"adapter mixes key prefixes {sorted(prefixes)}")
        pairs = {}
        for (layer, name), ab in sorted(factors.items()):
            if set(ab) != {"A", "B"}:
                only = next(iter(ab))
                raise AdapterError(f"adapter layer {layer} {name} has lora_{only} but not its partner")
            pairs[(layer, name)] = LoraPair(A=ab["A"], B=ab["B"])
        custom = {n: p for n, p in paths.items() if DEFAULT_MODULE_PATHS.get(n) != p}
        prefix = prefixes.pop() if prefixes else DEFAULT_LAYERS_PREFIX
        return cls(spec=spec, pairs=pairs, module_paths=custom, layers_prefix=prefix)

    def check_fits(self, model: nn.Module) -> None:
        """Check this adapter has exactly the modules and shapes ``model`` expects.

        Raises:
            AdapterError: One line naming the first mismatch (and how many others).
        """
        expected = shapes_for_model(model, self.spec.target_modules)
        problems = [
            f"layer {layer} {name} is missing from the adapter"
            for layer, name in sorted(expected.keys() - self.pairs.keys())
        ]
        problems += [
            f"layer {layer} {name} is not in the model"
            for layer, name in sorted(self.pairs.keys() - expected.keys())
        ]
        r = self.spec.r
        for key in sorted(expected.keys() & self.pairs.keys()):
            d_in, d_out = expected[key]
            pair = self.pairs[key]
            for label, got, want in (("A", pair.A.shape, [r, d_in]), ("B", pair.B.shape, [d_out, r])):
                if list(got) != want:
                    problems.append(f"layer {key[0]} {key[1]} {label} is {list(got)}, model expects {want}")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise AdapterError(f"adapter does not fit the base model: {problems[0]}{more}")


def shapes_for_model(model: nn.Module, target_modules: tuple[str, ...] = LoraSpec.target_modules) -> Shapes:
    """``(layer, module) -> (in_features, out_features)`` for every target module of ``model``.

    Works on a bare transformers model and on a peft-wrapped one (peft's LoRA layers keep
    ``in_features``/``out_features`` of the layer they wrap).
    """
    shapes: Shapes = {}
    for qualified, module in model.named_modules():
        site = parse_module_name(qualified)
        if site is None or site.name not in target_modules:
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes[(site.layer, site.name)] = (int(module.in_features), int(module.out_features))
    if not shapes:
        raise AdapterError(f"base model has no decoder-layer modules named {list(target_modules)}")
    return shapes


def shapes_for_config(config: object, target_modules: tuple[str, ...] = LoraSpec.target_modules) -> Shapes:
    """Expected shapes from a transformers decoder config, without building the model."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    table = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }
    unknown = [m for m in target_modules if m not in table]
    if unknown:
        raise AdapterError(f"cannot infer shapes of {unknown} from a config; pass the model instead")
    return {(i, m): table[m] for i in range(config.num_hidden_layers) for m in target_modules}


def random_init(
    model_config_or_shapes: nn.Module | Mapping | object, spec: LoraSpec, seed: int = 0
) -> LoraWeights:
    """A fresh LoRA initialised as peft does: A kaiming-uniform(a=sqrt(5)), B zeros.

    Args:
        model_config_or_shapes: A model, a transformers config, or a ``Shapes`` mapping.
        spec: LoRA spec; its ``target_modules`` select the modules.
        seed: Seed of a private generator, so global RNG state is untouched.
    """
    if isinstance(model_config_or_shapes, nn.Module):
        shapes = shapes_for_model(model_config_or_shapes, spec.target_modules)
    elif isinstance(model_config_or_shapes, Mapping):
        shapes = dict(model_config_or_shapes)
    else:
        shapes = shapes_for_config(model_config_or_shapes, spec.target_modules)
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for key, (d_in, d_out) in sorted(shapes.items()):
        A = torch.empty(spec.r, d_in)  # [r, in]
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        pairs[key] = LoraPair(A=A, B=torch.zeros(d_out, spec.r))  # B: [out, r]
    return LoraWeights(spec=spec, pairs=pairs)
