"""The Text-to-LoRA hypernetwork: a task-description embedding in, a LoRA for every layer out.

Architecture (DESIGN.md §3, after Text-to-LoRA)::

    emb [T, d] ──Linear+LayerNorm──► task [T, t]
    layer-index emb [L, p] ⊕ module-type emb [p] ──LayerNorm──► pos [L, 2p]
    concat(task, pos) [T, L, t+2p] ──mixer (Linear, SiLU, Dropout)──► [T, L, h]
        ──residual blocks (LN, Linear, SiLU, Dropout, Linear) x n──► LN, Linear, SiLU ──► [T, L, k]
        ──head[module] (Linear k -> r*in + out*r, batched over layers)──► A [T, L, r, in], B [T, L, out, r]

Each head's weight starts at zero and its bias at a peft LoRA init (A kaiming-uniform, B zero), so the
untrained network emits a valid LoRA with ``dW = 0`` for every description.

Size for the default model (SmolLM2-135M: 30 layers, q_proj 576->576, v_proj 576->192) with the default
config and the 384-d MiniLM embedding: 2,337,984 parameters (the two heads hold 1,981,440 of them),
9.4 MB as fp32 safetensors. No I/O in this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from prisp.adapters.config import LoraSpec
from prisp.adapters.weights import LoraPair, LoraWeights
from prisp.errors import AdapterError

_DEFAULT_SPEC = LoraSpec()


@dataclass
class HyperNetConfig:
    """Shape of a hypernetwork and of the LoRA it emits.

    Attributes:
        embed_dim: Size of the description embedding it reads.
        num_layers: Decoder layers of the base model.
        modules: ``name -> (in_features, out_features)`` of each target module (same in every layer).
        rank: LoRA rank r.
        task_dim: Output of the task encoder (Linear + LayerNorm).
        pos_dim: Size of each of the layer-index and module-type embeddings.
        hidden_dim: Width of the MLP trunk.
        num_blocks: Residual blocks in the trunk.
        head_in_dim: Trunk output size, the input of every head (keeps the heads small).
        dropout: Dropout inside the trunk.
        lora_alpha: peft ``lora_alpha`` of the emitted adapter.
        lora_dropout: peft ``lora_dropout`` recorded in the emitted adapter (and used in SFT).
        use_rslora: Scale by ``alpha / sqrt(r)``.
    """

    embed_dim: int
    num_layers: int
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    rank: int = _DEFAULT_SPEC.r
    task_dim: int = 64
    pos_dim: int = 32
    hidden_dim: int = 256
    num_blocks: int = 2
    head_in_dim: int = 128
    dropout: float = 0.05
    lora_alpha: float = _DEFAULT_SPEC.alpha
    lora_dropout: float = _DEFAULT_SPEC.dropout
    use_rslora: bool = _DEFAULT_SPEC.use_rslora

    def __post_init__(self) -> None:
        self.modules = {str(k): (int(v[0]), int(v[1])) for k, v in dict(self.modules).items()}
        positive = ("embed_dim", "num_layers", "rank", "task_dim", "pos_dim", "hidden_dim", "head_in_dim")
        for option in positive:
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1:
                raise AdapterError(f"invalid hypernet option {option}={value!r} (a positive integer)")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise AdapterError(f"invalid hypernet option num_blocks={self.num_blocks!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"invalid hypernet option dropout={self.dropout!r} (in [0, 1))")
        if not self.modules or any(d < 1 for shape in self.modules.values() for d in shape):
            raise AdapterError(f"invalid hypernet option modules={self.modules!r} (name -> (in, out))")
        self.spec  # noqa: B018 -- validates the LoRA options

    @property
    def spec(self) -> LoraSpec:
        """The LoRA spec of every adapter this network emits."""
        return LoraSpec(r=self.rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                        target_modules=tuple(self.modules), use_rslora=self.use_rslora)

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    def to_dict(self) -> dict:
        """JSON-ready dict (module shapes as lists)."""
        data = asdict(self)
        data["modules"] = {k: list(v) for k, v in self.modules.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> HyperNetConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            AdapterError: Unknown or missing options.
        """
        if not isinstance(data, dict):
            raise AdapterError(f"hypernet config must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"hypernet config has unknown options {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise AdapterError(f"hypernet config is incomplete: {exc}") from None

    @classmethod
    def for_shapes(cls, embed_dim: int, shapes: dict[tuple[int, str], tuple[int, int]], **options) -> HyperNetConfig:
        """Config for a base model given its ``(layer, module) -> (in, out)`` shapes.

        Raises:
            AdapterError: A module's shape differs between layers, or layers are not ``0..L-1``.
        """
        modules: dict[str, tuple[int, int]] = {}
        layers = sorted({layer for layer, _ in shapes})
        if layers != list(range(len(layers))):
            raise AdapterError(f"base model layers are not numbered 0..{len(layers) - 1}: {layers[:5]}...")
        for (layer, name), shape in sorted(shapes.items()):
            if modules.setdefault(name, tuple(shape)) != tuple(shape):
                raise AdapterError(f"module {name} changes shape at layer {layer}; one head per module type "
                                   "needs one shape")
        return cls(embed_dim=embed_dim, num_layers=len(layers), modules=modules, **options)

    def shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        """``(layer, module) -> (in, out)`` this network emits, as ``shapes_for_model`` reports them."""
        return {(i, name): shape for i in range(self.num_layers) for name, shape in self.modules.items()}


@torch.no_grad()
def lora_weights_in_eval(net: nn.Module, factors, spec: LoraSpec, num_layers: int) -> LoraWeights:
    """Run ``factors()`` (``name -> (A [L, r, in], B [L, out, r])``) with ``net`` in eval mode and unpack the
    result into float32 ``LoraWeights``; ``net``'s training flag is restored. Shared by every hypernetwork."""
    was_training = net.training
    net.eval()
    try:
        stacked = factors()
    finally:
        net.train(was_training)
    pairs = {(layer, name): LoraPair(A=A[layer].float().contiguous().clone(), B=B[layer].float().contiguous().clone())
             for name, (A, B) in stacked.items() for layer in range(num_layers)}
    return LoraWeights(spec=spec, pairs=dict(sorted(pairs.items())))


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., dim]
        return x + self.mlp(self.norm(x))


class HyperNet(nn.Module):
    """Description embedding -> LoRA factors for every (layer, module). See the module docstring."""

    def __init__(self, config: HyperNetConfig):
        super().__init__()
        self.config = config
        c = config
        self.task_encoder = nn.Sequential(nn.Linear(c.embed_dim, c.task_dim), nn.LayerNorm(c.task_dim))
        self.layer_embedding = nn.Embedding(c.num_layers, c.pos_dim)
        self.module_embedding = nn.Embedding(len(c.modules), c.pos_dim)
        self.pos_norm = nn.LayerNorm(2 * c.pos_dim)
        self.mixer = nn.Sequential(nn.Linear(c.task_dim + 2 * c.pos_dim, c.hidden_dim), nn.SiLU(),
                                   nn.Dropout(c.dropout))
        self.blocks = nn.Sequential(*[_ResidualBlock(c.hidden_dim, c.dropout) for _ in range(c.num_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(c.hidden_dim), nn.Linear(c.hidden_dim, c.head_in_dim), nn.SiLU())
        self.heads = nn.ModuleDict({
            name: nn.Linear(c.head_in_dim, c.rank * d_in + d_out * c.rank) for name, (d_in, d_out) in c.modules.items()
        })
        self.reset_heads()

    @torch.no_grad()
    def reset_heads(self, seed: int = 0) -> None:
        """Zero head weights; biases = a peft LoRA init (A kaiming-uniform(a=sqrt(5)), B zeros)."""
        generator = torch.Generator().manual_seed(seed)
        r = self.config.rank
        for name, (d_in, _) in self.config.modules.items():
            head = self.heads[name]
            head.weight.zero_()
            A = torch.empty(r, d_in)  # [r, in]
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            head.bias.zero_()
            head.bias[: r * d_in] = A.flatten()

    def features(self, emb: Tensor, module_index: int) -> Tensor:
        """Trunk output for one module type: ``emb [T, d] -> [T, L, head_in_dim]``."""
        c = self.config
        task = self.task_encoder(emb)  # [T, t]
        layers = self.layer_embedding.weight  # [L, p]
        module = self.module_embedding.weight[module_index].expand(c.num_layers, -1)  # [L, p]
        pos = self.pos_norm(torch.cat([layers, module], dim=-1))  # [L, 2p]
        x = torch.cat([task[:, None, :].expand(-1, c.num_layers, -1),
                       pos[None].expand(task.shape[0], -1, -1)], dim=-1)  # [T, L, t+2p]
        return self.out(self.blocks(self.mixer(x)))  # [T, L, k]

    def forward(self, emb: Tensor) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """LoRA factors per task row.

        Args:
            emb: Description embeddings ``[T, embed_dim]``.

        Returns:
            ``(layer, module) -> (A [T, r, in], B [T, out, r])``.
        """
        stacked = self.stacked(emb)
        return {(layer, name): (A[:, layer], B[:, layer]) for name, (A, B) in stacked.items()
                for layer in range(self.config.num_layers)}

    def stacked(self, emb: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Like :meth:`forward` but per module type: ``name -> (A [T, L, r, in], B [T, L, out, r])``."""
        if emb.dim() != 2 or emb.shape[1] != self.config.embed_dim:
            raise AdapterError(f"hypernet expects embeddings [T, {self.config.embed_dim}], got {list(emb.shape)}")
        r = self.config.rank
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for index, (name, (d_in, d_out)) in enumerate(self.config.modules.items()):
            flat = self.heads[name](self.features(emb, index))  # [T, L, r*in + out*r]
            T, L = flat.shape[:2]
            A = flat[..., : r * d_in].reshape(T, L, r, d_in)
            B = flat[..., r * d_in:].reshape(T, L, d_out, r)
            out[name] = (A, B)
        return out

    def to_lora_weights(self, emb: Tensor) -> LoraWeights:
        """The adapter for one description embedding ``[embed_dim]`` (or ``[1, embed_dim]``), in eval mode."""
        def one_row() -> dict[str, tuple[Tensor, Tensor]]:
            stacked = self.stacked(emb.reshape(1, -1).to(next(self.parameters()).dtype))
            return {name: (A[0], B[0]) for name, (A, B) in stacked.items()}

        return lora_weights_in_eval(self, one_row, self.config.spec, self.config.num_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
