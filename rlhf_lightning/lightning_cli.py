"""The package's :class:`LightningCLI`: what ``rlhf-lightning fit|validate|test`` and every stage of
the pipeline and the online loop run. Kept apart from :mod:`rlhf_lightning.cli` (the command's
dispatcher), so that the pipeline imports it without importing the command that imports the
pipeline.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .terminal import lightning_noise_silenced


class EpochProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading "Epoch 4" instead of "Epoch 4/-2" when the run is
    bounded by ``max_steps`` alone (``max_epochs`` -1). For a module that counts iterations
    (PPO: ``iteration`` and ``planned_iterations()``) one bar spans the whole run, "PPO iteration
    N/total" with the run's ETA, instead of one bar per pass over the prompts."""

    planned: int | None = None  # the run's iterations, for a module that counts them

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        planned = getattr(pl_module, "planned_iterations", None)
        self.planned = planned() if callable(planned) and hasattr(pl_module, "iteration") else None
        super().on_train_start(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        return self.planned if self.planned is not None else super().total_train_batches

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.planned is None or self.train_progress_bar_id is None:  # (a new pass over the
            super().on_train_epoch_start(trainer, pl_module)           # prompts keeps the run's bar)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.planned is not None:
            self._update(self.train_progress_bar_id, pl_module.iteration)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.planned is not None:
            return f"{'PPO iteration':{len(self.validation_description)}}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # padded like Lightning's, so that the bar does not jump at validation
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class RLHFCLI(LightningCLI):
    """LightningCLI with the package's defaults: TensorBoard logging, config saving, and the
    :class:`EpochProgressBar` unless the config names a progress bar or turns it off. Lightning's
    messages that a user cannot act on are kept off the terminal
    (:func:`~rlhf_lightning.terminal.lightning_noise_silenced`)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        with lightning_noise_silenced():
            super().__init__(
                model_class=LightningModule,
                datamodule_class=LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,  # each module owns its optimiser and schedule
                trainer_defaults={
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs", "name": "rlhf"},
                    }
                },
                args=args,
                run=run,
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None:
            return super().parse_arguments(parser, args)
        # ``args`` stands for the command line (the pipeline runs each stage in-process, with
        # its own command line in sys.argv): Lightning would warn that both are given.
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        wants_bar = config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
        if wants_bar and not any(isinstance(c, ProgressBar) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, EpochProgressBar()]
        return super()._instantiate_trainer(config, callbacks)
