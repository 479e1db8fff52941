"""Stage 1: supervised fine-tuning of a causal LM on demonstrations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from ..data.encoding import IGNORE_INDEX
from ..generation import sample_texts
from ..lora import LoRASettings
from ..models import load_causal_lm
from ..sharding import is_sharded
from ..text_logging import log_text_samples
from .base import HFModelModule
from .export import export_at_fit_end


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``.

    ``logits`` ``(b, t, v)`` predict ``labels`` ``(b, t)`` shifted by one: position ``i``
    predicts token ``i + 1``.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


class SFTModule(HFModelModule):
    """Fine-tunes ``model_name_or_path`` on demonstrations and exports a Hugging Face folder.

    The loss covers completion tokens only (prompt tokens and non-assistant chat turns carry
    label -100; see :mod:`rlhf_lightning.data.encoding`). At the end of fit the model and
    tokenizer are written with ``save_pretrained`` to ``export_dir``, which is what the
    reward-model and PPO stages load.

    Args:
        model_name_or_path: hub id, local folder or ``preset:tiny-gpt2``.
        tokenizer_name_or_path: a tokenizer folder to use instead of the model's own, e.g. one
            written by ``rlhf-lightning tokenizer`` for a preset (whose own is byte-level); it
            is saved with the export.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps``.
        lr_scheduler: ``cosine``, ``linear`` or ``constant`` after warmup.
        gradient_checkpointing: trade compute for memory on large models.
        lora: train a LoRA adapter instead of every weight (needs the ``lora`` extra, ``peft``);
            the export is the merged model (:mod:`rlhf_lightning.lora`). None: full fine-tuning.
        export_dir: where to write the Hugging Face folder at the end of fit (None: no export).
        overwrite_export: allow the fit to replace a finished model in ``export_dir`` (off: the
            fit refuses to start).
        sample_prompts: prompts to sample from at each validation (logged to TensorBoard);
            None takes the first ``num_samples`` prompts of the validation data.
    """

    def __init__(
        self,
        model_name_or_path: str = "preset:tiny-gpt2",
        tokenizer_name_or_path: str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        lr_scheduler: str = "cosine",
        gradient_checkpointing: bool = False,
        lora: LoRASettings | None = None,
        export_dir: str | None = "outputs/sft/model",
        overwrite_export: bool = False,
        sample_prompts: list[str] | None = None,
        num_samples: int = 4,
        sample_max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lora"])
        self.use_lora(lora)
        self.val_loss = MeanMetric()

    def build_models(self) -> None:
        self.model = load_causal_lm(self.hparams.model_name_or_path, self.tokenizer)
        self.model = self.prepare_model(self.model)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.train_accuracy = MulticlassAccuracy(vocab, average="micro", ignore_index=IGNORE_INDEX)
        self.val_accuracy = MulticlassAccuracy(vocab, average="micro", ignore_index=IGNORE_INDEX)
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training and validation loss of a batch: override for another objective."""
        return causal_lm_loss(logits, labels)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        return self.loss(logits, labels), logits[:, :-1], labels[:, 1:]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, targets = self._step(batch)
        self.train_accuracy(logits.argmax(-1), targets)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/token_accuracy", self.train_accuracy, batch_size=batch_size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch)
        n_tokens = (targets != IGNORE_INDEX).sum()
        self.val_loss.update(loss, weight=n_tokens)
        self.val_accuracy.update(logits.argmax(-1), targets)
        self.val_perplexity.update(logits.float(), targets)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/token_accuracy", self.val_accuracy.compute())
        self.log("val/perplexity", self.val_perplexity.compute())
        for metric in (self.val_loss, self.val_accuracy, self.val_perplexity):
            metric.reset()
        if not self.trainer.sanity_checking:
            self.log_samples()

    def sample_prompts(self) -> list[str]:
        """Prompts for the samples logged each validation."""
        if self.hparams.sample_prompts:
            return list(self.hparams.sample_prompts)
        records = getattr(self.trainer.datamodule, "val_records", None) or []
        prompts = [r["prompt"] for r in records if isinstance(r.get("prompt"), str)]
        return prompts[: self.hparams.num_samples]

    def log_samples(self) -> None:
        prompts = self.sample_prompts()
        # A sharded model's forwards are collectives: then every rank samples (rank 0 logs).
        if not prompts or not (self.trainer.is_global_zero or is_sharded(self.model)):
            return
        completions = sample_texts(self.model, self.tokenizer, prompts, self.hparams.sample_max_new_tokens)
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        log_text_samples(self.trainer, "samples/sft", rows)

    def on_fit_end(self) -> None:
        export_at_fit_end(self, "export_dir", self.model, self.tokenizer, self.lora)
