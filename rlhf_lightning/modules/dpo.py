"""Direct Preference Optimisation: the policy learns from preference pairs directly, against a
frozen reference, with no reward model and no sampling."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .. import rlhf_math as pm
from ..errors import UserInputError
from ..lora import LoRASettings, check_reference
from ..models import load_causal_lm
from ..forwards import causal_lm_logits
from .base import HFModelModule
from .export import export_at_fit_end


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise :class:`UserInputError` naming the config key of a bad DPO setting."""
    key = "model.init_args"
    if loss_type not in pm.DPO_LOSS_TYPES:
        raise UserInputError(f"{key}.loss_type: unknown DPO loss {loss_type!r}; expected one of {', '.join(pm.DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise UserInputError(f"{key}.beta: must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise UserInputError(f"{key}.label_smoothing: must be in [0, 0.5), got {label_smoothing}")


class DPOModule(HFModelModule):
    """Trains a causal LM with DPO on preference pairs and exports a Hugging Face folder.

    Batches come from :class:`~rlhf_lightning.data.PreferenceDataModule`, the reward stage's data:
    chosen rows then rejected rows, with ``response_mask`` marking each row's response. The
    log-probability of a response is the sum of its tokens' log-probs (their mean for ``ipo``,
    as TRL), under the policy and under the frozen reference, with position ids from the
    attention mask, so either padding side gives the same numbers. The loss and the implicit
    rewards ``beta * (log pi - log pi_ref)`` are :func:`~rlhf_lightning.rlhf_math.dpo_loss`.
    At the first step the policy is the reference: every implicit reward is 0 and the loss is
    log 2 (``sigmoid``, ``robust``). With ``lora`` the policy trains an adapter and the reference
    is its own base model with the adapter disabled (one copy of the base weights).

    Logged (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (ties
    count one half, as the reward stage's accuracy), ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected`` and ``train/loss`` each step; the same under ``val/`` per validation.

    Args:
        model_name_or_path: the policy to train: the SFT export folder, any Hugging Face causal
            LM, or a preset.
        reference_name_or_path: the frozen reference policy (None: ``model_name_or_path``).
        tokenizer_name_or_path: a tokenizer folder to use instead of the model's own; saved
            with the export.
        beta: strength of the pull towards the reference (IPO's tau for ``ipo``).
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``robust`` (robust DPO).
        label_smoothing: the assumed fraction of flipped labels, in [0, 0.5): conservative DPO
            with ``sigmoid``, robust DPO with ``robust``; unused by ``ipo``.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps``.
        lr_scheduler: ``cosine``, ``linear`` or ``constant`` after warmup.
        gradient_checkpointing: trade compute for memory on large models.
        lora: train a LoRA adapter instead of every weight (needs the ``lora`` extra, ``peft``);
            the reference is then the policy's base model (leave ``reference_name_or_path``
            unset) and the export is the merged model (:mod:`rlhf_lightning.lora`). None: full
            fine-tuning.
        export_dir: where to write the Hugging Face folder at the end of fit (None: no export).
        overwrite_export: allow the fit to replace a finished model in ``export_dir`` (off: the
            fit refuses to start).
    """

    def __init__(
        self,
        model_name_or_path: str = "preset:tiny-gpt2",
        reference_name_or_path: str | None = None,
        tokenizer_name_or_path: str | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        lr_scheduler: str = "cosine",
        gradient_checkpointing: bool = False,
        lora: LoRASettings | None = None,
        export_dir: str | None = "outputs/dpo/model",
        overwrite_export: bool = False,
    ) -> None:
        super().__init__()
        check_dpo_settings(beta, loss_type, label_smoothing)
        check_reference(lora, reference_name_or_path, model_name_or_path, "model.init_args.reference_name_or_path")
        self.save_hyperparameters(ignore=["lora"])
        self.use_lora(lora)

    def build_models(self) -> None:
        hp = self.hparams
        model = load_causal_lm(hp.model_name_or_path, self.tokenizer)
        if self.lora is None:
            self.load_frozen_reference(hp.reference_name_or_path or hp.model_name_or_path, model)
        self.model = self.prepare_model(model)
        if self.lora is not None:
            self.use_base_as_reference()

    def response_logps(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log pi(response | prompt)`` ``(2b,)`` of every row under ``model``
        (:func:`~rlhf_lightning.rlhf_math.dpo_sequence_logps`)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        logits = causal_lm_logits(model, input_ids, attention_mask)
        token_logps, predicted = pm.token_log_likelihoods(logits, input_ids, attention_mask)
        response = predicted & batch["response_mask"][:, 1:].bool()
        return pm.dpo_sequence_logps(token_logps, response, self.hparams.loss_type)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch and its statistics under TRL's names."""
        hp = self.hparams
        policy = self.response_logps(self.model, batch)
        with torch.no_grad():
            reference = self.response_logps(self.reference, batch)
        n_pairs = policy.shape[0] // 2
        loss, chosen, rejected = pm.dpo_loss(
            policy[:n_pairs], policy[n_pairs:], reference[:n_pairs], reference[n_pairs:],
            hp.beta, hp.loss_type, hp.label_smoothing,
        )
        stats = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": pm.pair_accuracy(chosen, rejected).mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": policy[:n_pairs].detach().mean(),
            "logps/rejected": policy[n_pairs:].detach().mean(),
        }
        return loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, stats = self._step(batch)
        n_pairs = batch["margin"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n_pairs)
        self.log_dict(stats, batch_size=n_pairs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n_pairs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, stats = self._step(batch)
        # Epoch means weighted by pairs, over every process.
        n_pairs = batch["margin"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n_pairs, sync_dist=True)
        self.log_dict({f"val/{name}": value for name, value in stats.items()}, batch_size=n_pairs, sync_dist=True)

    def on_fit_end(self) -> None:
        export_at_fit_end(self, "export_dir", self.model, self.tokenizer, self.lora)
