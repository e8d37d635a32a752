"""Optimizers and learning-rate schedules: lmforge's built-in ``lmforge.optimizers`` and
``lmforge.schedulers`` plugins.

Each optimizer factory takes the model, so it can choose parameter groups: weight decay applies to
the matrices of linear layers only, never to norms, biases or embeddings (a tied output head is the
embedding, so it is not decayed either).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: linear-layer weights (decayed) and everything else (not decayed)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay_ids -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a tied head
    decay, no_decay = [], []
    for p in model.parameters():  # shared tensors are yielded once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _on_cuda(model: nn.Module) -> bool:
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.is_cuda for p in params)


def adamw(
    model: nn.Module,
    lr: float = 6e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on linear matrices only; the fused kernel on CUDA."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=_on_cuda(model) or None
    )


def adam(
    model: nn.Module, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> torch.optim.Adam:
    """Adam without weight decay."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=eps, fused=_on_cuda(model) or None)


def sgd(
    model: nn.Module, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; weight decay on linear matrices only."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else, stepped as one optimizer.

    As in the GPT-2 speedrun records: Muon (orthogonalised momentum, ``torch.optim.Muon``) updates
    the 2-D weights inside the Transformer blocks; embeddings, the output head, norms and biases
    use AdamW. Both inner optimizers share their parameter-group dicts with this one, so an LR
    scheduler scales both, and the checkpoint holds both states.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([{"params": []}], {})
        self.param_groups = [*muon.param_groups, *adamw.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


def muon(
    model: nn.Module,
    lr: float = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    adamw_lr: float = 3e-3,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_weight_decay: float = 0.0,
) -> MuonWithAdamW:
    """Muon on the linear matrices inside the blocks (scaled to match AdamW's update RMS), AdamW elsewhere."""
    head_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_ids |= {id(p) for name, p in model.named_parameters() if name.startswith(("lm_head", "head", "score"))}
    hidden = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in head_ids
    ]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    inner_muon = torch.optim.Muon(
        hidden, lr=lr, momentum=momentum, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    inner_adamw = torch.optim.AdamW(
        [{"params": rest, "weight_decay": adamw_weight_decay}], lr=adamw_lr, betas=tuple(adamw_betas)
    )
    return MuonWithAdamW(inner_muon, inner_adamw)


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Linear warmup, then the peak learning rate for good."""
    return min(1.0, (step + 1) / warmup_steps)


def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.1,
    decay_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` * lr at ``decay_steps`` (default: the run's end)."""
    fn = partial(
        warmup_cosine,
        warmup_steps=max(1, warmup_steps),
        decay_steps=decay_steps or total_steps,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def constant(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (if any), then constant: for schedule-free optimizers and short experiments."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_constant, warmup_steps=max(1, warmup_steps)))
