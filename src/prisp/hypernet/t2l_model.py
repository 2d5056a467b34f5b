"""Text-to-LoRA's own hypernetwork ("HyperModulator"), re-implemented from its checkpoint layout.

This is our module, written so that its ``state_dict`` has exactly the key names and shapes of a
published T2L ``hypermod.pt`` for the one variant we verified (``training_task: sft``,
``encoder_type: linear``, no ``shared_AB_head``, no ``autoreg_gen``, ``lora`` output space).
With ``D = latent_size`` (task ``latent/2`` + layer ``latent/4`` + module ``latent/4``)::

    task_encoder.mlp          Linear(E, D/2), LayerNorm                     emb [1, E] -> [1, D/2]
    layer_depth_encoder       Embedding(L, D/4), LayerNorm                  layer index -> [L, D/4]
    layer_type_encoder        Embedding(M, D/4), LayerNorm                  module index -> [D/4]
    concat(task, depth, type) [L, D]
    mixer                     Dropout, Linear(D, 4D), SiLU, Dropout, Linear(4D, D), SiLU, Dropout
    mlp1, mlp2 (.mlp)         x + [LayerNorm, Linear(D, 4D), SiLU, Dropout, Linear(4D, D), SiLU, Dropout](x)
    mlp3                      LayerNorm, Linear(D, 4D), SiLU, Dropout, Linear(4D, H), SiLU
    heads[module]             Linear(H, r*in + r*out) (bias only when trained without a multi-task LoRA)
        -> A = out[:r*in] as [r, in];  B = out[r*in:] as [r, out], transposed to [out, r]
    AB_offset.{A,B}.module    [L, r, in] / [L, out, r], added to A / B (zeros unless T2L started from a LoRA)

``mean_recon_target`` / ``std_recon_target`` (reconstruction training only) are not part of this module;
the loader ignores them. Dropout is inactive at inference. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prisp.adapters.config import LoraSpec
from prisp.adapters.weights import LoraWeights
from prisp.errors import AdapterError
from prisp.hypernet.model import lora_weights_in_eval


@dataclass
class T2LConfig:
    """Geometry of a T2L hypernetwork.

    Attributes:
        embed_dim: Description-embedding size E (1024 for gte-large-en-v1.5).
        num_layers: Decoder layers L of the base model.
        modules: ``name -> (in, out)`` in T2L's module-index order (the row of ``layer_type_encoder``).
        latent_size: ``hypernet_latent_size`` D (must be a multiple of 4).
        head_in_size: ``head_in_size`` H.
        head_bias: Whether the heads carry a bias.
        spec: The LoRA the heads emit (rank, scale, dropout recorded in the written adapter).
    """

    embed_dim: int
    num_layers: int
    modules: dict[str, tuple[int, int]]
    latent_size: int = 128
    head_in_size: int = 512
    head_bias: bool = True
    spec: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        for option in ("embed_dim", "num_layers", "latent_size", "head_in_size"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdapterError(f"invalid T2L option {option}={value!r} (a positive integer)")
        if self.latent_size % 4:
            raise AdapterError(f"invalid T2L option hypernet_latent_size={self.latent_size} (a multiple of 4)")
        if not self.modules or set(self.modules) != set(self.spec.target_modules):
            raise AdapterError(f"T2L modules {list(self.modules)} differ from the LoRA's target_modules "
                               f"{list(self.spec.target_modules)}")

    @property
    def rank(self) -> int:
        return self.spec.r


class _TaskEncoder(nn.Module):
    def __init__(self, embed_dim: int, size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, size), nn.LayerNorm(size))


class _Residual(nn.Module):
    """``x + mlp(x)`` with the mlp's layer positions as in T2L (LayerNorm at 0, Linears at 1 and 4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Dropout(0.05),
                                 nn.Linear(4 * dim, dim), nn.SiLU(), nn.Dropout(0.05))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        return x + self.mlp(x)


class T2LHyperModulator(nn.Module):
    """T2L's SFT hypernetwork: description embedding -> LoRA factors for every layer and module."""

    def __init__(self, config: T2LConfig):
        super().__init__()
        self.config = c = config
        D, L, r = c.latent_size, c.num_layers, c.rank
        self.task_encoder = _TaskEncoder(c.embed_dim, D // 2)
        self.layer_depth_encoder = nn.Sequential(nn.Embedding(L, D // 4), nn.LayerNorm(D // 4))
        self.layer_type_encoder = nn.Sequential(nn.Embedding(len(c.modules), D // 4), nn.LayerNorm(D // 4))
        self.mixer = nn.Sequential(nn.Dropout(0.05), nn.Linear(D, 4 * D), nn.SiLU(), nn.Dropout(0.05),
                                   nn.Linear(4 * D, D), nn.SiLU(), nn.Dropout(0.05))
        self.mlp1 = _Residual(D)
        self.mlp2 = _Residual(D)
        self.mlp3 = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.SiLU(), nn.Dropout(0.05),
                                  nn.Linear(4 * D, c.head_in_size), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(c.head_in_size, r * (d_in + d_out), bias=c.head_bias)
                                    for name, (d_in, d_out) in c.modules.items()})
        zeros = {which: nn.ParameterDict({
            name: nn.Parameter(torch.zeros(L, r, d_in) if which == "A" else torch.zeros(L, d_out, r),
                               requires_grad=False)
            for name, (d_in, d_out) in c.modules.items()}) for which in ("A", "B")}
        self.AB_offset = nn.ModuleDict(zeros)

    def factors(self, emb: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """LoRA factors for one description embedding.

        Args:
            emb: ``[E]`` or ``[1, E]`` (already normalised as T2L does: L2 then times ``sqrt(E)``).

        Returns:
            ``name -> (A [L, r, in], B [L, out, r])``, offsets included.
        """
        c = self.config
        emb = emb.reshape(1, -1)
        if emb.shape[1] != c.embed_dim:
            raise AdapterError(f"T2L hypernet expects a {c.embed_dim}-d description embedding, got {emb.shape[1]}-d")
        weight = self.task_encoder.mlp[0].weight
        task = self.task_encoder.mlp(emb.to(weight.dtype)).expand(c.num_layers, -1)  # [L, D/2]
        layers = torch.arange(c.num_layers, device=weight.device)
        depth = self.layer_depth_encoder(layers)  # [L, D/4]
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for index, (name, (d_in, d_out)) in enumerate(c.modules.items()):
            kind = self.layer_type_encoder(torch.tensor([index], device=weight.device)).expand(c.num_layers, -1)
            x = torch.cat([task, depth, kind], dim=-1)  # [L, D]
            flat = self.heads[name](self.mlp3(self.mlp2(self.mlp1(self.mixer(x)))))  # [L, r*(in+out)]
            r = c.rank
            A = flat[:, : r * d_in].reshape(-1, r, d_in)  # [L, r, in]
            B = flat[:, r * d_in:].reshape(-1, r, d_out).transpose(1, 2)  # [L, out, r]
            out[name] = (A + self.AB_offset["A"][name], B + self.AB_offset["B"][name])
        return out

    def to_lora_weights(self, emb: Tensor) -> LoraWeights:
        """The adapter for one embedding, computed in eval mode, as float32 ``LoraWeights``."""
        return lora_weights_in_eval(self, lambda: self.factors(emb), self.config.spec, self.config.num_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
