"""Writing a stage's Hugging Face folder when its fit ends."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models import save_hf_folder


def export_at_fit_end(
    module: LightningModule, export_dir: str | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Save ``model`` + ``tokenizer`` to ``export_dir`` on rank zero, atomically.

    Skipped under ``fast_dev_run`` (a smoke run must not replace a trained model) and when
    ``export_dir`` is None.
    """
    trainer = module.trainer
    if not export_dir:
        return
    if trainer.fast_dev_run:
        rank_zero_info(f"fast_dev_run: not exporting to {export_dir}")
        return
    if trainer.is_global_zero:
        save_hf_folder(export_dir, model, tokenizer)
        rank_zero_info(f"exported Hugging Face folder: {export_dir}")
    trainer.strategy.barrier("hf_export")
