"""Writing a stage's Hugging Face folder when its fit ends, and refusing, before training
starts, to replace a finished stage's folder by accident."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UserInputError
from ..lora import ADAPTER_SUBFOLDER, LoRASettings, is_adapter_model, merged_model
from ..models import is_complete_hf_folder, save_hf_folder


class ExportExistsError(UserInputError):
    """An export folder already holds a finished stage and ``overwrite_export`` is off."""


def check_export_dirs(module: LightningModule, export_dirs: Mapping[str, str | None], overwrite: bool) -> None:
    """Raise :class:`ExportExistsError` if a folder the fit would export to is already complete.

    ``export_dirs`` maps the config key (``export_dir``, ``policy_export_dir``, ...) to its
    folder. Called from ``on_fit_start``, so a rerun of a finished stage stops before the first
    training step instead of replacing the earlier result at the end. Nothing is refused under
    ``fast_dev_run`` (it exports nothing) or when resuming from a checkpoint (``ckpt_path``:
    the run continues the one that wrote the folder).
    """
    trainer = module.trainer
    if overwrite or trainer.fast_dev_run or trainer.ckpt_path is not None:
        return
    for key, folder in export_dirs.items():
        if folder and is_complete_hf_folder(folder):
            raise ExportExistsError(
                f"model.init_args.{key}: '{folder}' already holds a finished model, which this fit would "
                "replace when it ends; hint: delete the folder, choose another "
                f"{key}, or set model.init_args.overwrite_export: true"
            )


def export_at_fit_end(
    module: LightningModule,
    export_dir: str | None,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoRASettings | None = None,
) -> None:
    """Save ``model`` + ``tokenizer`` to ``export_dir`` on rank zero, atomically.

    A LoRA (peft) model is saved merged, as a plain Hugging Face folder, and with
    ``lora.export_adapter`` its adapter alone goes to the ``adapter`` subfolder too. Skipped under
    ``fast_dev_run`` (a smoke run must not replace a trained model) and when ``export_dir`` is
    None.
    """
    trainer = module.trainer
    if not export_dir:
        return
    if trainer.fast_dev_run:
        rank_zero_info(f"fast_dev_run: not exporting to {export_dir}")
        return
    if trainer.is_global_zero:
        if is_adapter_model(model):
            save_hf_folder(export_dir, merged_model(model), tokenizer)
            if lora is not None and lora.export_adapter:
                save_hf_folder(Path(export_dir) / ADAPTER_SUBFOLDER, model, tokenizer)
        else:
            save_hf_folder(export_dir, model, tokenizer)
        rank_zero_info(f"exported Hugging Face folder: {export_dir}")
    trainer.strategy.barrier("hf_export")
