"""Stage 2: a Bradley-Terry reward model trained on preference pairs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from ..data.encoding import attention_mask_for, demonstration_pair, encode_preference, pad, prompt_record_text
from ..records import DataFormatError, Record, check_sft, read_jsonl, sft_kind
from ..evaluation import JudgeFn
from ..lora import LoRASettings
from ..models import load_sequence_scorer
from ..forwards import (
    REWARD_OFFSET_KEY,
    at_last_token,
    causal_lm_logits,
    hidden_states,
    rewards_from_hidden,
    score_sequences,
    sequence_rewards,
)
from ..rlhf_math import bradley_terry_loss, likelihood_distillation_loss, pair_accuracy, token_log_likelihoods
from ..terminal import spearman_corrcoef
from .base import HFModelModule
from .export import export_at_fit_end


def _check_demonstration(record: Record, path: str, line: int) -> Record:
    record = check_sft(record, path, line)
    if sft_kind(record) == "text":
        raise DataFormatError(path, line, "text", "normalize_file needs SFT records with a prompt and a response: "
                              "{\"prompt\", \"completion\"} or {\"messages\"}")
    return record


class RewardModule(HFModelModule):
    """Trains a scalar-head reward model on preference pairs and exports a Hugging Face folder.

    Each batch (from :class:`~rlhf_lightning.data.PreferenceDataModule`) holds the chosen rows
    then the rejected rows; both go through the model in one forward. The reward of a row is
    read at its last real token (EOS), found from the attention mask, with position ids from
    the mask, so either padding side gives the same rewards (see
    :mod:`rlhf_lightning.forwards`). The loss is the Bradley-Terry loss with the
    per-pair ``margin`` of the data (0 when the records have none) and an optional centering
    term.

    At the end of fit, with ``normalize``, the mean raw reward of SFT demonstrations (the data
    module's task's SFT val split, or ``normalize_file``) is stored as ``reward_offset`` in the
    model config, so that :func:`~rlhf_lightning.forwards.score_sequences` gives SFT-like
    text a mean reward of 0. The model and tokenizer (right padding, pad token distinct from
    EOS) are then written to ``export_dir``: a folder that plain
    ``AutoModelForSequenceClassification`` loads, and the PPO stage scores with.

    Args:
        model_name_or_path: SFT output folder, any Hugging Face causal-LM or reward-model
            folder, or ``preset:tiny-gpt2``. A causal LM gets a new, untrained scalar head.
        tokenizer_name_or_path: a tokenizer folder to use instead of the model's own, e.g. one
            written by ``rlhf-lightning tokenizer`` for a preset (whose own is byte-level); it
            is saved with the export.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps``.
        lr_scheduler: ``cosine``, ``linear`` or ``constant`` after warmup.
        centering_coef: weight of ``mean((r_c + r_r)^2)`` in the loss (0 disables it).
        likelihood_distillation_coef: weight of an auxiliary training loss (0 disables it): a
            second linear head on every token's hidden state learns the log-probability that
            the *initial* model (``model_name_or_path``, loaded frozen as a causal LM: give it
            the SFT export) gave that token, standardised per batch
            (:func:`~rlhf_lightning.rlhf_math.likelihood_distillation_loss`). It teaches
            the backbone to mark, token by token, the slips the SFT model notices, which the
            reward's token can then attend to. Costs one no-grad forward of the reference per
            step; the auxiliary head is not exported. See docs/reward.md.
        likelihood_teacher: the causal-LM folder whose log-probabilities the auxiliary loss
            distils, when ``model_name_or_path`` is not it (e.g. a reward model trained further,
            as ``rlhf-lightning iterate`` does: give the SFT export). None: ``model_name_or_path``.
        gradient_checkpointing: trade compute for memory on large models.
        lora: train a LoRA adapter, and the scalar head, instead of every weight (needs the
            ``lora`` extra, ``peft``); the export is the merged model (:mod:`rlhf_lightning.lora`).
            None: full fine-tuning.
        export_dir: where to write the Hugging Face folder at the end of fit (None: no export).
        overwrite_export: allow the fit to replace a finished model in ``export_dir`` (off: the
            fit refuses to start).
        judge: a gold judge ``(prompts, completions) -> scores`` (in YAML: its import path, e.g.
            ``rlhf_lightning.tasks.sentiment.judge``): validation then also reports the reward
            model's agreement with the judge's verdict on each pair (``val/gold_accuracy``, judge
            ties skipped) and the Spearman correlation of rewards and judge scores over every
            validation completion (``val/gold_spearman``).
        normalize: store the mean reward of SFT demonstrations as ``reward_offset``.
        normalize_file: JSONL of SFT ``{"prompt", "completion"}`` or ``{"messages"}`` records to
            normalise on (read, and checked, before training starts; a conversation is scored on
            its last assistant turn); None uses the SFT val split of the data
            module's ``task`` when it trains on that task, and leaves the offset at 0.0 (with a
            warning) for user preference files (the pipeline passes the SFT config's own data).
        normalize_max_length: token budget of those sequences (None: the datamodule's
            ``max_length``, else 256).
        score_batch_size: rows per forward when scoring without grad (normalisation).
    """

    def __init__(
        self,
        model_name_or_path: str = "preset:tiny-gpt2",
        tokenizer_name_or_path: str | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 20,
        lr_scheduler: str = "cosine",
        centering_coef: float = 0.0,
        likelihood_distillation_coef: float = 0.0,
        likelihood_teacher: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoRASettings | None = None,
        export_dir: str | None = "outputs/reward/model",
        overwrite_export: bool = False,
        normalize: bool = True,
        normalize_file: str | None = None,
        normalize_max_length: int | None = None,
        score_batch_size: int = 64,
        judge: JudgeFn | None = None,
    ) -> None:
        super().__init__()
        if likelihood_distillation_coef < 0:
            raise ValueError(f"likelihood_distillation_coef must be >= 0, got {likelihood_distillation_coef}")
        self.save_hyperparameters(ignore=["judge", "lora"])
        self.use_lora(lora)
        self.judge = judge
        self.likelihood_head: torch.nn.Linear | None = None
        self.reward_offset: float | None = None
        self._gold_scores: dict[tuple[int, ...], float] | None = None
        self._normalization_records: list[Record] | None = None
        self.train_accuracy = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_reward_chosen = MeanMetric()
        self.val_reward_rejected = MeanMetric()
        self.val_margin = MeanMetric()
        self.val_gold_accuracy = MeanMetric()
        self.val_gold_spearman = spearman_corrcoef()

    def build_models(self) -> None:
        self.model = load_sequence_scorer(self.hparams.model_name_or_path, self.tokenizer)
        # An offset from an earlier reward model would be stale once training changes the model.
        setattr(self.model.config, REWARD_OFFSET_KEY, 0.0)
        self.model = self.prepare_model(self.model, task_type="SEQ_CLS")
        if self.hparams.likelihood_distillation_coef > 0:
            self.load_frozen_reference(self.hparams.likelihood_teacher or self.hparams.model_name_or_path)
            self.likelihood_head = torch.nn.Linear(self.model.config.hidden_size, 1)

    def sharded_models(self) -> list[torch.nn.Module]:
        """The model, the likelihood teacher and the likelihood head (trained: FSDP averages its
        gradients over the ranks)."""
        head = [] if self.likelihood_head is None else [self.likelihood_head]
        return [*super().sharded_models(), *head]

    def optimized_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The model's parameters, and the auxiliary likelihood head's when there is one."""
        yield from self.model.named_parameters()
        if self.likelihood_head is not None:
            yield from self.likelihood_head.named_parameters(prefix="likelihood_head")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards ``(b,)`` of the rows, with grad."""
        return sequence_rewards(self.model, input_ids, attention_mask)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        hidden = hidden_states(self.model, input_ids, attention_mask)  # chosen rows, then rejected rows
        rewards = rewards_from_hidden(self.model, at_last_token(hidden, attention_mask))
        n_pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:n_pairs], rewards[n_pairs:]
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.hparams.centering_coef)
        if self.likelihood_head is not None and self.training:
            distillation = self._likelihood_distillation(input_ids, attention_mask, hidden)
            self.log("train/likelihood_loss", distillation, batch_size=n_pairs)
            loss = loss + self.hparams.likelihood_distillation_coef * distillation
        return loss, chosen.detach(), rejected.detach()

    def _likelihood_distillation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """The auxiliary loss of ``likelihood_distillation_coef`` (see the class docstring), from
        the backbone's hidden states ``hidden`` ``(b, t, h)``."""
        with torch.no_grad():
            logits = causal_lm_logits(self.reference, input_ids, attention_mask)
            log_likelihoods, predicted = token_log_likelihoods(logits, input_ids, attention_mask)
        # The state after token i predicts how surprising token i was (i >= 1).
        surprise = self.likelihood_head(hidden[:, 1:]).squeeze(-1)
        return likelihood_distillation_loss(surprise, log_likelihoods, predicted)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self._step(batch)
        n_pairs = chosen.shape[0]
        self.train_accuracy(pair_accuracy(chosen, rejected))
        self.log("train/loss", loss, prog_bar=True, batch_size=n_pairs)
        self.log("train/accuracy", self.train_accuracy, batch_size=n_pairs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n_pairs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, chosen, rejected = self._step(batch)
        n_pairs = chosen.shape[0]
        self.val_loss.update(loss, weight=n_pairs)
        self.val_accuracy.update(pair_accuracy(chosen, rejected))
        self.val_reward_chosen.update(chosen)
        self.val_reward_rejected.update(rejected)
        self.val_margin.update(chosen - rejected)
        if self.judge is not None:
            self._update_gold_metrics(batch, torch.cat([chosen, rejected]))

    def _update_gold_metrics(self, batch: dict[str, torch.Tensor], rewards: torch.Tensor) -> None:
        """Agreement with the judge's verdict on each pair (judge ties skipped), and Spearman
        between the rewards and the judge's scores of the batch's completions."""
        table = self._gold_score_table()
        rows = [tuple(t for t, real in zip(ids, mask) if real)
                for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
        gold = [table.get(key) for key in rows]
        found = [i for i, g in enumerate(gold) if g is not None]
        if len(found) > 1:
            scores = torch.tensor([gold[i] for i in found], dtype=rewards.dtype, device=rewards.device)
            self.val_gold_spearman.update(rewards[found], scores)
        n_pairs = len(rows) // 2
        decided = [i for i in range(n_pairs) if None not in (gold[i], gold[n_pairs + i]) and gold[i] != gold[n_pairs + i]]
        if decided:
            verdict = torch.tensor([float(gold[i] > gold[n_pairs + i]) for i in decided], device=rewards.device)
            predicted = pair_accuracy(rewards[decided], rewards[[n_pairs + i for i in decided]])
            self.val_gold_accuracy.update(1.0 - (predicted - verdict).abs())

    def _gold_score_table(self) -> dict[tuple[int, ...], float]:
        """The judge's score of each encoded validation sequence, keyed by its token ids.

        Built once from ``trainer.datamodule.val_records`` / ``val_dataset``; keying by ids makes
        it independent of batch order, shuffling and distributed sampling. The judge reads each
        prompt as text (:func:`~rlhf_lightning.data.encoding.prompt_record_text`: a chat prompt
        rendered with the tokenizer's template and generation prompt).
        """
        if self._gold_scores is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            records = getattr(datamodule, "val_records", None) or []
            dataset = [e for e in getattr(datamodule, "val_dataset", None) or [] if e.get("index", len(records)) < len(records)]
            table: dict[tuple[int, ...], float] = {}
            # a chat prompt as the policy continues it: rendered with the template
            prompts = [prompt_record_text(records[e["index"]], self.tokenizer) for e in dataset]
            for side in ("chosen", "rejected"):
                scores = self.judge(prompts, [records[e["index"]][side] for e in dataset]) if dataset else []
                table.update({tuple(e[side]): float(score) for e, score in zip(dataset, scores)})
            self._gold_scores = table
        return self._gold_scores

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log("val/reward_chosen", self.val_reward_chosen.compute())
        self.log("val/reward_rejected", self.val_reward_rejected.compute())
        self.log("val/margin", self.val_margin.compute())
        if self.val_gold_accuracy.update_called:
            self.log("val/gold_accuracy", self.val_gold_accuracy.compute())
        if len(self.val_gold_spearman.preds) and sum(p.numel() for p in self.val_gold_spearman.preds) > 1:
            self.log("val/gold_spearman", self.val_gold_spearman.compute())
        for metric in (
            self.val_loss, self.val_accuracy, self.val_reward_chosen, self.val_reward_rejected,
            self.val_margin, self.val_gold_accuracy, self.val_gold_spearman,
        ):
            metric.reset()

    # --- normalisation and export -------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Read normalize_file now, so that a bad record fails before training, not after.
        if stage == "fit" and self.hparams.normalize and self.hparams.normalize_file:
            self._normalization_records = read_jsonl(self.hparams.normalize_file, _check_demonstration)

    def normalization_records(self) -> list[Record] | None:
        """SFT demonstrations whose mean reward becomes 0: ``normalize_file``, else the data
        module's task's SFT val split when it trains on that task (seeded like the datamodule);
        None for user preference files without a ``normalize_file``."""
        if self.hparams.normalize_file:
            return self._normalization_records or read_jsonl(self.hparams.normalize_file, _check_demonstration)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_file", None) is not None:
            return None
        from ..tasks import get_task, task_records

        return task_records(get_task(getattr(datamodule, "task", "sentiment"), getattr(datamodule, "seed", 0)), "sft", "val")

    def compute_reward_offset(self, records: list[Record]) -> float:
        """Mean raw reward of SFT demonstrations, each encoded as a preference pair's response
        is (:func:`~rlhf_lightning.data.encoding.demonstration_pair`): prompt + completion + EOS,
        or a conversation's last assistant turn after the rest, ending with the end-of-turn token."""
        max_length = self.hparams.normalize_max_length or getattr(getattr(self.trainer, "datamodule", None), "max_length", 256)
        sequences = [encode_preference(demonstration_pair(r), self.tokenizer, max_length)["chosen"] for r in records]
        ids, mask = pad(sequences, self.tokenizer.pad_token_id), attention_mask_for(sequences)
        rewards = score_sequences(self.model, ids, mask, batch_size=self.hparams.score_batch_size, apply_offset=False)
        return rewards.mean().item()

    def on_fit_end(self) -> None:
        trainer = self.trainer
        if self.hparams.normalize and not trainer.fast_dev_run:  # a smoke run exports nothing
            records = self.normalization_records()
            if records is None:
                rank_zero_warn(
                    "normalize=True but there are no SFT demonstrations to normalise on (user preference "
                    "files and no normalize_file): reward_offset stays 0.0"
                )
            else:
                self.reward_offset = self.compute_reward_offset(records)
                setattr(self.model.config, REWARD_OFFSET_KEY, self.reward_offset)
                rank_zero_info(f"reward_offset (mean reward of SFT demonstrations): {self.reward_offset:.4f}")
                for logger in trainer.loggers:
                    logger.log_metrics({"reward_offset": self.reward_offset}, step=trainer.global_step)
        # Plain Hugging Face use (tokenizer(..., padding=True) then model(**batch)) is correct with
        # right padding: HF pools at the rightmost non-pad token and GPT-2 numbers positions 0..t-1.
        self.tokenizer.padding_side = "right"
        export_at_fit_end(self, "export_dir", self.model, self.tokenizer, self.lora)
