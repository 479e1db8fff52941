"""What the SFT, reward and DPO stages share: one Hugging Face model named by
``model_name_or_path`` (and maybe a frozen reference), its tokenizer, AdamW with a warmup
schedule, and FSDP2 sharding under ``ModelParallelStrategy``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint_io import drop_frozen_weights, restore_frozen_weights
from ..lora import AdapterDisabled, LoRASettings, add_adapter, check_no_lora_critic
from ..models import ModelLoadError, enable_gradient_checkpointing, load_reference, load_tokenizer
from ..optim import adamw, warmup_schedule
from ..sharding import shard_models
from .export import ExportingModule


class HFModelModule(ExportingModule):
    """Base of a stage that fine-tunes ``self.model`` (built in :meth:`build_models`).

    Under ``ModelParallelStrategy`` (FSDP2) ``configure_model`` shards the models
    (:meth:`sharded_models`) and the export is gathered whole to rank 0.

    Subclasses call ``save_hyperparameters()`` with at least ``model_name_or_path``,
    ``tokenizer_name_or_path``, ``learning_rate``, ``weight_decay``, ``adam_betas``,
    ``warmup_steps``, ``lr_scheduler``, ``gradient_checkpointing``, ``export_dir`` and
    ``overwrite_export`` (guarded while the fit runs: :class:`~.export.ExportingModule`);
    :meth:`use_lora` sets ``lora``.
    """

    _tokenizer: PreTrainedTokenizerBase | None = None

    def __init__(self) -> None:
        super().__init__()
        self.model: PreTrainedModel | None = None
        # filled by load_frozen_reference or use_base_as_reference (a list: out of the state dict,
        # the optimiser and .to())
        self._reference: list[PreTrainedModel | AdapterDisabled] = []

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """``tokenizer_name_or_path``'s, else the model's own; loaded on first use, so that
        building the module from a config stays cheap."""
        if self._tokenizer is None:
            name = self.hparams.tokenizer_name_or_path
            if name is not None and not Path(name).expanduser().is_dir():
                raise ModelLoadError(
                    f"tokenizer folder '{name}' (tokenizer_name_or_path) does not exist; hint: train one with "
                    f"`rlhf-lightning tokenizer --output_dir {name}`, or fix the path"
                )
            self._tokenizer = load_tokenizer(name or self.hparams.model_name_or_path)
        return self._tokenizer

    def use_lora(self, lora: LoRASettings | None) -> None:
        """Train a LoRA adapter (``lora``) instead of every weight; None: full fine-tuning.
        ``lora.critic`` is PPO's: any value but the default is refused
        (:func:`~rlhf_lightning.lora.check_no_lora_critic`)."""
        check_no_lora_critic(lora, type(self).__name__, "model.init_args.lora")
        self.lora = lora
        self.hparams.update(lora=None if lora is None else asdict(lora))

    def prepare_model(self, model: PreTrainedModel, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
        """Apply the module-wide model options (gradient checkpointing, a LoRA adapter for
        ``task_type``); use the model it returns. The model is put in training mode:
        ``from_pretrained`` returns it in eval mode, Lightning keeps a module's mode, and
        transformers checkpoints gradients only in training mode."""
        model.train()
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.lora is not None:
            model = add_adapter(model, self.lora, "model.init_args.lora", task_type)
        return model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.build_models()
        shard_models(self.device_mesh, self.sharded_models())

    def build_models(self) -> None:
        """Set ``self.model`` (and load a frozen reference if the stage has one): called once,
        from ``configure_model``, before any sharding."""
        raise NotImplementedError

    def sharded_models(self) -> list[torch.nn.Module]:
        """The modules sharded under FSDP2 (:func:`~rlhf_lightning.sharding.shard_models`): the
        model and the frozen reference. A stage that trains another module adds it: without DDP,
        FSDP is what averages its gradients over the ranks."""
        return [self.model, *self._reference]

    def load_frozen_reference(self, name_or_path: str, policy: PreTrainedModel | None = None) -> None:
        """Load the frozen causal LM that :attr:`reference` returns (DPO's reference, the reward
        stage's likelihood teacher; :func:`~rlhf_lightning.models.load_reference`, ``policy``: the
        model as loaded from ``model_name_or_path``, before :meth:`prepare_model`). It is kept in a
        list, so it stays out of the state dict, the optimiser and ``.to()``."""
        self._reference = [load_reference(name_or_path, self.tokenizer, self.hparams.model_name_or_path, policy)]

    def use_base_as_reference(self) -> None:
        """With LoRA: make :attr:`reference` the adapter model's own base with the adapter disabled
        (:class:`~rlhf_lightning.lora.AdapterDisabled`, as PPO's), one copy of the base weights
        instead of two. Call after :meth:`prepare_model` set ``self.model``."""
        self._reference = [AdapterDisabled(self.model)]

    @property
    def reference(self) -> PreTrainedModel | AdapterDisabled:
        """The frozen reference of :meth:`load_frozen_reference` (on the model's device) or of
        :meth:`use_base_as_reference` (the model's own weights)."""
        reference = self._reference[0]
        if not isinstance(reference, AdapterDisabled) and reference.device != self.model.device:
            reference.to(self.model.device)
        return reference

    def optimized_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Named parameters the optimiser trains (default: the model's)."""
        return self.model.named_parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = adamw(self.optimized_parameters(), hp.learning_rate, hp.weight_decay, hp.adam_betas)
        scheduler = warmup_schedule(optimizer, hp.lr_scheduler, hp.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen_weights(self, checkpoint)
