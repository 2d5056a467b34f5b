"""PiSSA and LoRA-GA starts (Table 4 of the paper), with peft's own initialisers.

Both write the targeted base weights to a residual ``W' = W - s B0 A0`` and start the LoRA at ``(A0, B0)``, so
the model is unchanged at step 0: PiSSA takes ``A0, B0`` from the principal singular components of ``W``,
LoRA-GA from the SVD of the user's own calibration gradient of ``W``. The trained model is ``W' + s B A``;
relative to the *unmodified* base that is ``s (B A - B0 A0)``, the rank-2r LoRA ``[B, -B0] [A; A0]`` (what peft's
``path_initial_model_for_weight_conversion`` builds), so the export stays a plain LoRA of the original model.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from peft import LoraGAConfig, PeftModel
from peft.tuners.lora.loraga import get_target_modules, preprocess_loraga
from torch import nn

from prisp.adapters import LoraPair, LoraSpec, LoraWeights
from prisp.adapters.inject import extract_weights, wrap_peft
from prisp.errors import PrispError

# Strategy init name -> peft's ``init_lora_weights``.
PEFT_INITS = {"pissa": "pissa", "lora-ga": "lora_ga"}


def svd_start(work: nn.Module, spec: LoraSpec, init: str, seed: int = 0,
              calibrate: Callable[[nn.Module], None] | None = None) -> tuple[PeftModel, LoraWeights]:
    """Wrap ``work`` with a LoRA of ``spec`` started by ``init`` (``pissa`` or ``lora-ga``).

    ``work``'s targeted weights are rewritten in place (give it private copies: ``shared_copy(...,
    own_modules=...)``). ``calibrate(model)`` runs the forward and backward passes over the user's examples
    whose gradients LoRA-GA decomposes (required for ``lora-ga``, unused by PiSSA).

    Returns:
        The peft model, and the offset ``-s B0 A0`` as a LoRA (``B0`` negated) to stack onto the export.
    """
    if init not in PEFT_INITS:
        raise PrispError(f"unknown LoRA initialisation {init!r}; expected one of: {', '.join(PEFT_INITS)}")
    extra: dict = {"init_lora_weights": PEFT_INITS[init]}
    if init == "lora-ga":
        if calibrate is None:
            raise PrispError("LoRA-GA needs the user's examples for its calibration gradients")
        extra["lora_ga_config"] = LoraGAConfig()
    config = dataclasses.replace(spec.to_peft_config(), **extra)
    # LoRA-GA's randomised SVD (torch.svd_lowrank) draws from the global generator: seed it privately.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init == "lora-ga":
            with warnings.catch_warnings():
                # peft counts LoRA-GA's backward passes with full backward hooks, which torch notes fire on
                # module outputs when the inputs (frozen activations) need no gradient: all they need here.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                preprocess_loraga(work, config, lambda: calibrate(work))
            missing = [name for name, module in get_target_modules(work, config)
                       if not hasattr(module, "_peft_loraga_grad")]
            if missing:  # peft would fall back to a plain init there without a word
                raise PrispError(f"LoRA-GA: the calibration pass reached no gradient in {missing[0]} "
                                 f"({len(missing)} modules)")
        model = wrap_peft(work, config)
    start = extract_weights(model)
    offset = LoraWeights(spec=start.spec, pairs={key: LoraPair(A=p.A, B=-p.B) for key, p in start.pairs.items()},
                         module_paths=start.module_paths, layers_prefix=start.layers_prefix)
    return model, offset
