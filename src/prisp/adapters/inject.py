"""Putting LoRA weights into a model with peft, and the PRISP bridge ``dW = B C A``.

The bridge is a ``torch.nn.utils.parametrize`` parametrization of each ``lora_B`` weight
that computes ``B @ C``; peft's own forward then uses ``B C`` transparently. Folding
``B' = B C`` gives a plain LoRA, so exported adapters need no prisp code to load.
No I/O here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Collection, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prisp.adapters.config import LoraSpec
from prisp.adapters.weights import DEFAULT_MODULE_PATHS, LoraPair, LoraWeights, ModuleSite, parse_module_name
from prisp.errors import AdapterError


class BridgeParam(nn.Module):
    """Parametrization ``B -> B @ C`` with a trainable ``C`` (r x r), identity at start."""

    def __init__(self, r: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        super().__init__()
        self.C = nn.Parameter(torch.eye(r, dtype=dtype, device=device))  # [r, r]

    def forward(self, B: Tensor) -> Tensor:  # B: [out, r] -> [out, r]
        return B @ self.C


def shared_copy(model: nn.Module, own_modules: Collection[str] = ()) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters are frozen views of the original's storage.

    peft injects its layers in place and training flips ``requires_grad``, so a user's working model needs
    its own module tree, but not its own copy of the weights: a deep copy of SmolLM2-135M costs 540 MB and
    about 0.45 s per user. The parameters here are new, frozen ``Parameter`` objects over the same tensors
    (flags set on the copy never reach ``model``), buffers are shared, and tied weights stay tied. Weights
    written in place must not be shared: modules whose last name is in ``own_modules`` (e.g. ``q_proj``
    before OPPU merges the anchor into it) get private copies of their parameters.
    """
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach(), requires_grad=False)
                               for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    clone = copy.deepcopy(model, memo)
    for name, module in clone.named_modules():
        if name.rsplit(".", 1)[-1] in own_modules:
            for param_name, param in list(module.named_parameters(recurse=False)):
                setattr(module, param_name, nn.Parameter(param.detach().clone(), requires_grad=False))
    return clone


def wrap_peft(model: nn.Module, config: LoraConfig) -> PeftModel:
    """``get_peft_model(model, config)`` (in place, with the LoRA initialisation ``config`` asks for), keeping
    ``model``'s train/eval mode: peft alone would leave it, dropout included, in train mode."""
    was_training = model.training
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that warns about its own deprecation.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.train(was_training)
    return peft_model


def attach_lora(model: nn.Module, weights: LoraWeights) -> PeftModel:
    """Wrap ``model`` with peft LoRA layers holding ``weights``.

    Note that peft injects its layers into ``model`` in place. The returned model keeps
    ``model``'s train/eval mode (peft alone would leave it, dropout included, in train mode).

    Raises:
        AdapterError: The adapter does not fit the model, or peft did not take every tensor.
    """
    weights.check_fits(model)
    peft_model = wrap_peft(model, weights.spec.to_peft_config())
    state = weights.to_peft_state_dict()
    result = set_peft_model_state_dict(peft_model, state)
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise AdapterError(
            f"peft did not load the adapter cleanly: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing_lora[:3]} (of {len(state)} tensors)"
        )
    return peft_model


def _lora_sites(peft_model: nn.Module) -> Iterator[tuple[ModuleSite, LoraLayer, str]]:
    """Yield ``(site, lora_layer, adapter_name)`` for the active adapter, in model order."""
    adapter = _active_adapter(peft_model)
    for qualified, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        site = parse_module_name(qualified)
        if site is None:
            raise AdapterError(f"LoRA module {qualified} is outside the decoder layers")
        yield site, module, adapter


def _active_adapter(peft_model: nn.Module) -> str:
    active = getattr(peft_model, "active_adapter", "default")
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise AdapterError(f"expected one active adapter, found {list(active)}")
        active = active[0]
    return active


def _bridge(lora_B: nn.Linear) -> BridgeParam | None:
    if not parametrize.is_parametrized(lora_B, "weight"):
        return None
    first = lora_B.parametrizations.weight[0]
    return first if isinstance(first, BridgeParam) else None


def _raw_B(lora_B: nn.Linear) -> nn.Parameter:
    """The stored B parameter, under any bridge parametrization."""
    if parametrize.is_parametrized(lora_B, "weight"):
        return lora_B.parametrizations.weight.original
    return lora_B.weight


def add_bridge(peft_model: nn.Module) -> list[nn.Parameter]:
    """Insert an identity ``C`` (r x r) between A and B of every LoRA module.

    Right after this call the model computes exactly what it computed before
    (``B @ I == B`` bit for bit).

    Returns:
        The new ``C`` parameters, in model order.

    Raises:
        AdapterError: The model has no LoRA modules or is already bridged.
    """
    params = []
    for site, module, adapter in _lora_sites(peft_model):
        lora_B = module.lora_B[adapter]
        if _bridge(lora_B) is not None:
            raise AdapterError(f"layer {site.layer} {site.name} already has a bridge")
        B = lora_B.weight
        bridge = BridgeParam(B.shape[1], dtype=B.dtype, device=B.device).train(lora_B.training)
        parametrize.register_parametrization(lora_B, "weight", bridge)
        params.append(bridge.C)
    if not params:
        raise AdapterError("model has no LoRA modules to bridge; call attach_lora first")
    return params


def bridge_params(peft_model: nn.Module) -> list[nn.Parameter]:
    """The ``C`` matrices of a bridged model, in model order (empty if not bridged)."""
    found = (_bridge(module.lora_B[adapter]) for _, module, adapter in _lora_sites(peft_model))
    return [bridge.C for bridge in found if bridge is not None]


def extract_weights(peft_model: nn.Module) -> LoraWeights:
    """The LoRA the model effectively applies (``B C`` where bridged), detached copies.

    Raises:
        AdapterError: The model has no LoRA modules.
    """
    spec = _spec_of(peft_model)
    pairs: dict[tuple[int, str], LoraPair] = {}
    paths: dict[str, str] = {}
    prefixes: set[str] = set()
    with torch.no_grad():
        for site, module, adapter in _lora_sites(peft_model):
            # Reading .weight runs the parametrization: the very B @ C the forward uses.
            A = module.lora_A[adapter].weight.detach().clone()  # [r, in]
            B = module.lora_B[adapter].weight.detach().clone()  # [out, r]
            pairs[(site.layer, site.name)] = LoraPair(A=A, B=B)
            if DEFAULT_MODULE_PATHS.get(site.name) != site.path:
                paths[site.name] = site.path
            prefixes.add(site.layers_prefix)
    if not pairs:
        raise AdapterError("model has no LoRA modules")
    if len(prefixes) != 1:
        raise AdapterError(f"LoRA modules sit under several layer stacks {sorted(prefixes)}")
    return LoraWeights(spec=spec, pairs=pairs, module_paths=paths, layers_prefix=prefixes.pop())


def fold_bridge(peft_model: nn.Module) -> LoraWeights:
    """Plain LoRA weights with ``B' = B C`` for a bridged model; the model is left unchanged.

    Raises:
        AdapterError: The model has no bridge.
    """
    if not bridge_params(peft_model):
        raise AdapterError("model has no bridge to fold; call add_bridge first")
    return extract_weights(peft_model)


def remove_bridge(peft_model: nn.Module) -> None:
    """Fold each bridge into its ``lora_B`` weight in place and drop the parametrization."""
    for _, module, adapter in _lora_sites(peft_model):
        lora_B = module.lora_B[adapter]
        if _bridge(lora_B) is not None:
            parametrize.remove_parametrizations(lora_B, "weight", leave_parametrized=True)


def _spec_of(peft_model: nn.Module) -> LoraSpec:
    config = peft_model.peft_config[_active_adapter(peft_model)]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = tuple(sorted({site.name for site, _, _ in _lora_sites(peft_model)}))
    return LoraSpec(
        r=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=tuple(sorted(targets)),
        use_rslora=config.use_rslora,
    )


def set_trainable(peft_model: nn.Module, train_A: bool, train_B: bool, train_C: bool) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the chosen LoRA factors.

    Call this last: peft's ``set_adapter()`` turns ``requires_grad`` back on for every
    LoRA weight (``lora_A`` and any bridge included), which would silently train A.

    Returns:
        The trainable parameters, in model order (A, B, C per module).

    Raises:
        AdapterError: Nothing selected, or ``train_C`` on a model without a bridge.
    """
    peft_model.requires_grad_(False)
    chosen: list[nn.Parameter] = []
    for site, module, adapter in _lora_sites(peft_model):
        lora_B = module.lora_B[adapter]
        bridge = _bridge(lora_B)
        if train_C and bridge is None:
            raise AdapterError(
                f"train_C needs a bridge but layer {site.layer} {site.name} has none; call add_bridge first"
            )
        selected = [
            (train_A, module.lora_A[adapter].weight),
            (train_B, _raw_B(lora_B)),
            (train_C, bridge.C if bridge is not None else None),
        ]
        chosen += [param for wanted, param in selected if wanted]
    if not chosen:
        raise AdapterError("no trainable parameters selected (no LoRA modules, or all flags are off)")
    for param in chosen:
        param.requires_grad_(True)
    return chosen
