"""AdamW with decoupled weight decay and a warmup + decay schedule, shared by every stage."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import get_scheduler

SCHEDULERS = ("cosine", "linear", "constant")


def adamw(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW that leaves biases and norm weights (1-d tensors) undecayed."""
    decay, no_decay = [], []
    for _, parameter in named_parameters:
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_steps``, then ``name`` decay until ``total_steps``."""
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {name!r}")
    scheduler = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(
        scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
