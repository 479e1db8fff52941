"""Helpers that the crash tests load into a subprocess (by import path, from YAML or ``-c``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback


class PauseAtIteration(Callback):
    """Before PPO iteration ``iteration + 1`` starts, write ``marker`` and wait to be killed.

    By then the checkpoint of iteration ``iteration`` is on disk (``ModelCheckpoint`` saves at
    the end of a training batch), so the test can SIGKILL the process at a known point.
    """

    def __init__(self, iteration: int, marker: str) -> None:
        self.iteration, self.marker = iteration, marker

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.iteration == self.iteration:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)


def export_and_hang(target: str, marker: str) -> None:
    """Write a tiny model with ``save_hf_folder`` and hang half-way (weights written, tokenizer not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_lightning.models import byte_tokenizer, save_hf_folder

    tokenizer = byte_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2))

    def hang(*args: Any, **kwargs: Any) -> None:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)

    tokenizer.save_pretrained = hang
    save_hf_folder(target, model, tokenizer)


def checkpoint_and_hang(path: str, marker: str) -> None:
    """Save one complete checkpoint at ``path``, then start a second save and hang half-way."""
    import torch

    from rlhf_lightning.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1, "weights": torch.zeros(1000)}, path)
    real_save = torch.save

    def partial_save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        file.write(b"half a checkpoint")
        file.flush()
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)

    torch.save = partial_save
    try:
        io.save_checkpoint({"version": 2, "weights": torch.ones(1000)}, path)
    finally:
        torch.save = real_save
