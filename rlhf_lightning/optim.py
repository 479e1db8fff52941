"""AdamW with decoupled weight decay and a warmup + decay schedule, shared by every stage, the
precisions it refuses to train in (:func:`check_precision`), and the optimiser step of manual
optimisation (PPO): clip, step, and an empty step for a skipped one."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import LightningModule
from transformers import get_scheduler

from .errors import UserInputError

SCHEDULERS = ("cosine", "linear", "constant")

#: ``trainer.precision`` values that keep the trained weights themselves in 16 bits (no float32 copy).
HALF_WEIGHT_PRECISIONS = ("bf16-true", "16-true")


def check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` that stores the trained weights in 16 bits, with a one-line
    error naming ``trainer.precision``: AdamW then updates 16-bit weights in place, and steps below
    half a weight's resolution round away (see docs/scaling.md#precision). Every stage's ``setup``
    calls it, before any model loads."""
    if precision in HALF_WEIGHT_PRECISIONS:
        raise UserInputError(f"trainer.precision: {precision} keeps the trained weights in 16 bits, where most of AdamW's "
                             "small steps round away; use bf16-mixed (16-bit compute, float32 weights) or 32-true "
                             "(see docs/scaling.md)")


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


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The L2 norm of all gradients the optimiser would apply; 0 under a strategy that keeps
    gradients off the parameters (DeepSpeed), where no step is skipped. FSDP2's sharded (DTensor)
    gradients give the norm over every rank's shard, as a plain tensor (a collective then)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2


def loss_scaled(module: LightningModule) -> bool:
    """Whether the Trainer's precision uses a loss scaler (fp16), which skips a step with
    non-finite gradients and backs off by itself."""
    return getattr(module.trainer.precision_plugin, "scaler", None) is not None


def clipped_step(module: LightningModule, max_grad_norm: float) -> torch.Tensor:
    """One optimiser step under manual optimisation, after the backward passes: clip the
    gradient norm to ``max_grad_norm`` (Lightning's ``clip_gradients``), step the optimiser and
    the schedule, and return the norm measured before clipping (so it exceeds ``max_grad_norm``
    whenever clipping happened).

    A non-finite norm (a NaN loss gives NaN gradients, and DDP's all-reduce hands them to every
    rank, so all ranks decide alike) drops the gradients: the step is then empty. It changes no
    weight and no optimiser state, but Lightning's ``global_step`` and the schedule advance, so
    checkpoints keep their cadence. Under fp16 the loss scaler skips it instead.
    """
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    # Measured here, not taken from clipping: Lightning's clip_gradients returns no norm, and the
    # norm must decide whether the step is kept before anything is clipped.
    grad_norm = gradient_norm(optimizer)
    if torch.isfinite(grad_norm) or loss_scaled(module):
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    else:
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm


def empty_steps(module: LightningModule, count: int) -> None:
    """``count`` empty optimiser steps (see :func:`clipped_step`) for an update that is skipped
    as a whole; none under a loss scaler, which refuses a step without gradients."""
    if loss_scaled(module):
        return
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(count):
        optimizer.step()
        scheduler.step()
