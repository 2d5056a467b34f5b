"""Reconstruction mode: L1 between generated LoRAs and per-task target LoRAs.

Targets are ordinary LoRAs trained with ``prisp.training.train`` on each of a few training tasks (cached as
peft adapter directories under ``<run>/targets/<task>/`` so a resumed run reuses them). The hypernetwork
then learns to map each of the task's descriptions to its target; a step costs no base-model pass.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from prisp.adapters import LoraPair, LoraSpec, LoraWeights, load_adapter, random_init, save_adapter
from prisp.hypernet.evaluation import HyperLoraModel
from prisp.hypernet.injection import BatchedLora
from prisp.training import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    TrainConfig,
    causal_lm_loss,
    tokenize_examples,
    train,
)

logger = logging.getLogger(__name__)


class _StaticLora(nn.Module):
    """A trainable single LoRA applied through :class:`BatchedLora` (what the loop trains for a target)."""

    def __init__(self, base: nn.Module, spec: LoraSpec, seed: int):
        super().__init__()
        self.base = base
        self.lora = BatchedLora(base, spec)
        init = random_init(self.lora.shapes(), spec, seed)
        self.keys = sorted(init.pairs)
        self.A = nn.ParameterList([nn.Parameter(init.pairs[k].A.clone()) for k in self.keys])  # [r, in] each
        self.B = nn.ParameterList([nn.Parameter(init.pairs[k].B.clone()) for k in self.keys])  # [out, r] each

    def factors(self) -> dict:
        return {k: (A[None], B[None]) for k, A, B in zip(self.keys, self.A, self.B)}

    def weights(self) -> LoraWeights:
        pairs = {k: LoraPair(A=A.detach().clone(), B=B.detach().clone()) for k, A, B in zip(self.keys, self.A, self.B)}
        return LoraWeights(spec=self.lora.spec, pairs=pairs)


def _static_loss(model: _StaticLora, batch: dict[str, Tensor]) -> Tensor:
    with model.lora.use(model.factors()):
        return causal_lm_loss(model.base, batch)


def train_target_lora(base: nn.Module, tokenizer, examples: list[Example], spec: LoraSpec, *, epochs: int,
                      lr: float, max_length: int, seed: int) -> LoraWeights:
    """A plain LoRA for one task, trained with the project's loop (A and B, peft init)."""
    holder = _StaticLora(base, spec, seed)
    try:
        tokenized = tokenize_examples(tokenizer, examples, max_length)
        config = TrainConfig(epochs=epochs, batch_size=4, lr=lr, max_length=max_length, seed=seed, progress=False)
        train(holder, list(holder.A) + list(holder.B), tokenized, config, loss_fn=_static_loss,
              pad_id=tokenizer.pad_token_id or 0)
        return holder.weights()
    finally:
        holder.lora.remove()


def stack_targets(targets: list[LoraWeights], module_names: list[str], num_layers: int) -> dict[str, tuple]:
    """``name -> (A [n, L, r, in], B [n, L, out, r])`` over ``targets``."""
    out = {}
    for name in module_names:
        A = torch.stack([torch.stack([t.pairs[(i, name)].A for i in range(num_layers)]) for t in targets])
        B = torch.stack([torch.stack([t.pairs[(i, name)].B for i in range(num_layers)]) for t in targets])
        out[name] = (A, B)
    return out


def recon_l1(stacked: dict[str, tuple[Tensor, Tensor]], targets: dict[str, tuple[Tensor, Tensor]],
             index: Tensor) -> Tensor:
    """Mean absolute error of A and of B, averaged over module types; ``index [b]`` picks each row's target."""
    terms = []
    for name, (A, B) in stacked.items():
        tA, tB = targets[name]
        terms.append((A - tA[index]).abs().mean() + (B - tB[index]).abs().mean())
    return sum(terms) / len(terms)


class ReconMode:
    """Examples: one per (target task, description); the loss is :func:`recon_l1`."""

    def __init__(self, run):
        self.run = run
        config = run.config
        self.tasks = run.data.split("train")[: config.recon_tasks]
        spec = run.checkpoint.config.spec
        targets = [self._target(task, spec, index) for index, task in enumerate(self.tasks)]
        hyper = run.checkpoint.config
        self.targets = stack_targets(targets, hyper.module_names, hyper.num_layers)
        self.pairs = [(row, t) for t, task in enumerate(self.tasks) for row in run.table.rows[task.name]]
        row_to_target = torch.full((len(run.table.texts),), -1, dtype=torch.long)
        for row, t in self.pairs:
            row_to_target[row] = t
        self.row_to_target = row_to_target

    def _target(self, task, spec: LoraSpec, index: int) -> LoraWeights:
        run = self.run
        path = run.out_dir / "targets" / task.name
        if (path / "adapter_config.json").is_file():
            return load_adapter(path)
        logger.info("training target LoRA %d/%d for %s", index + 1, len(self.tasks) or run.config.recon_tasks,
                    task.name)
        examples = [Example(prompt=i.input, answer=i.output) for i in task.instances]
        weights = train_target_lora(run.wrapper.base, run.tokenizer, examples, spec, epochs=run.config.recon_epochs,
                                    lr=run.config.recon_lr, max_length=run.config.max_length,
                                    seed=run.config.seed + index)
        save_adapter(weights, path, base_model_name=run.checkpoint.base_model)
        return weights

    micro_batch_size = None  # no base-model pass: whole batches are cheap

    def total_steps(self) -> int:
        config = self.run.config
        steps = -(-len(self.pairs) // config.batch_size) * config.epochs
        return min(steps, config.steps_limit or steps)

    def rows(self, epoch: int) -> Tensor:
        return torch.tensor([row for row, _ in self.pairs])

    def examples(self, epoch: int) -> list[TokenizedExample]:
        # A two-token "sequence" carrying its position; the loop needs one scored label to weight it.
        return [TokenizedExample(input_ids=[p, 0], labels=[IGNORE_INDEX, 0]) for p in range(len(self.pairs))]

    def loss_fn(self, model: HyperLoraModel, batch: dict[str, Tensor]) -> Tensor:
        headers = batch["input_ids"][:, 0]  # [b]
        rows = model.rows(headers)
        loss = recon_l1(model.hypernet.stacked(model.embeddings[rows]), self.targets, self.row_to_target[rows])
        model.report(loss, headers)
        return loss
