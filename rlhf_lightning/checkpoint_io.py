"""Checkpoint files that are either complete or absent, also after a SIGKILL.

Lightning's default writer stages a checkpoint in the system temp folder and then *moves* it
to the checkpoint folder; across filesystems that move is a copy, and a kill during it leaves
a truncated ``last.ckpt`` that the next ``--ckpt_path`` fails on. This writer stages the file
next to its destination, syncs it to disk and renames it into place (an atomic step on POSIX),
so a resumed run always finds the previous complete checkpoint.

A checkpoint also holds only the weights that train: frozen ones are loaded again from their
folders on resume (:func:`drop_frozen_weights`, :func:`restore_frozen_weights`), except under
``ModelParallelStrategy`` (FSDP2), whose checkpoints must hold every weight
(:func:`keeps_frozen_weights`). By default that strategy writes a distributed checkpoint folder
itself, not through this writer, and not atomically.

:class:`IterationCheckpoint` checkpoints PPO every N iterations.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import UserInputError, check_minimum
from .sharding import uses_fsdp2


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder staging, fsync and rename for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
        try:
            with open(staging, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, target)
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # make the rename itself durable
            finally:
                os.close(directory)
        finally:
            if staging.exists():
                staging.unlink()


def use_atomic_checkpoints(trainer: Any) -> None:
    """Swap Lightning's default checkpoint writer for :class:`AtomicCheckpointIO`; a writer the
    user chose (or a strategy's own, e.g. DeepSpeed's) is left alone."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _frozen_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``module``'s frozen parameters by state-dict key (tied copies included)."""
    return {
        name: value for name, value in module.state_dict(keep_vars=True).items()
        if isinstance(value, torch.nn.Parameter) and not value.requires_grad
    }


def keeps_frozen_weights(module: torch.nn.Module) -> bool:
    """Whether ``module``'s checkpoints must keep its frozen weights: under Lightning's
    ``ModelParallelStrategy`` (FSDP2), which loads every weight of the module from the checkpoint
    itself, before any hook runs (``torch.distributed.checkpoint.load``, or strict loading of a
    full checkpoint), and fails on a weight the checkpoint lacks."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and uses_fsdp2(trainer.strategy)


def drop_frozen_weights(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Leave the frozen parameters (a LoRA base model, PPO's reference and reward model) out of
    ``checkpoint["state_dict"]``: ``configure_model`` loads them again from their folders, so a
    checkpoint holds only what is trained (all of them are kept where :func:`keeps_frozen_weights`).
    Call from ``on_save_checkpoint``."""
    if keeps_frozen_weights(module):
        return
    frozen = _frozen_parameters(module)
    checkpoint["state_dict"] = {name: value for name, value in checkpoint["state_dict"].items() if name not in frozen}


def restore_frozen_weights(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Fill in the frozen parameters that :func:`drop_frozen_weights` left out with the ones
    ``configure_model`` loaded, so that strict loading still checks every trained weight. Call
    from ``on_load_checkpoint``."""
    if keeps_frozen_weights(module):  # the strategy loaded them already
        return
    for name, value in _frozen_parameters(module).items():
        checkpoint["state_dict"].setdefault(name, value.detach())


class IterationCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with its cadence in PPO iterations: a checkpoint after every
    ``every_n_iterations``-th iteration, whatever ``ppo.epochs * ppo.num_minibatches`` (the
    optimiser steps per iteration, which ``every_n_train_steps`` would count) is. Every other
    argument is ``ModelCheckpoint``'s (``dirpath``, ``save_last``, ``save_top_k``, ...).

    For a module with ``ppo`` settings (``PPOModule`` and its subclasses); a skipped update still
    makes its optimiser steps (empty ones), so the cadence holds.
    """

    def __init__(self, every_n_iterations: int = 1, **kwargs: Any) -> None:
        for key in ("every_n_train_steps", "every_n_epochs", "train_time_interval"):
            if kwargs.pop(key, None) is not None:  # (a config parser passes them all, as None)
                raise UserInputError(f"IterationCheckpoint counts PPO iterations: give every_n_iterations, not {key}")
        check_minimum("IterationCheckpoint every_n_iterations", every_n_iterations, 1)
        super().__init__(every_n_train_steps=1, **kwargs)  # the steps are known in setup()
        self.every_n_iterations = every_n_iterations

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        settings = getattr(pl_module, "ppo", None)
        if not hasattr(settings, "steps_per_iteration"):
            raise UserInputError(f"IterationCheckpoint is for PPO modules (with ppo settings); {type(pl_module).__name__} "
                                 "has none: use lightning.pytorch.callbacks.ModelCheckpoint")
        # before Lightning restores callback states, whose key includes the cadence
        self._every_n_train_steps = self.every_n_iterations * settings.steps_per_iteration
        super().setup(trainer, pl_module, stage)
