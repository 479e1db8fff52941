"""LoRA adapters through ``peft`` (the optional ``lora`` extra): the ``lora:`` key of each stage.

* :func:`add_adapter` wraps a model in a peft model whose only trainable weights are the
  adapter's (plus, for a reward model, its scalar head);
* :class:`AdapterDisabled` is the base model under a LoRA policy: PPO's reference, sharing the
  policy's base weights instead of holding a second copy;
* :func:`merged_model` is what an export writes: a plain ``transformers`` model with the adapter
  merged into the base weights.

peft is imported only when a stage asks for LoRA, so the package works without it.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .errors import UserInputError

#: The subfolder of an export folder that holds the adapter alone (``LoRASettings.export_adapter``).
ADAPTER_SUBFOLDER = "adapter"


@dataclass
class LoRASettings:
    """A LoRA adapter (Hu et al. 2021): each targeted layer computes ``W x + alpha / r * B A x``
    with the base weight ``W`` frozen and ``B`` starting at zero.

    Args:
        r: rank of ``A`` and ``B``.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter's input. PPO requires 0: its recomputed log-probs must
            equal the rollout's (``policy/first_ratio_dev``).
        target_modules: ``all-linear`` (every linear layer but the output head) or a list of
            module names (e.g. ``[q_proj, v_proj]``; GPT-2: ``[c_attn]``).
        export_adapter: besides the merged model, write the adapter alone (peft's
            ``adapter_config.json`` + ``adapter_model.safetensors``) to ``<export_dir>/adapter``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    export_adapter: bool = False


def require_peft(config_key: str) -> Any:
    """The ``peft`` module, or a one-line :class:`UserInputError` naming ``config_key``."""
    try:
        import peft
    except ImportError as err:
        raise UserInputError(
            f"{config_key} needs the peft package, which is not installed; hint: pip install 'rlhf-lightning[lora]'"
        ) from err
    return peft


def add_adapter(model: PreTrainedModel, settings: LoRASettings, config_key: str, task_type: str = "CAUSAL_LM") -> Any:
    """``model`` with a fresh LoRA adapter (a ``peft.PeftModel``; the base weights are frozen).

    ``task_type`` ``SEQ_CLS`` (a reward model) also keeps the scalar head trainable (peft's
    ``modules_to_save``) and out of ``all-linear``.
    """
    peft = require_peft(config_key)
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type=task_type,
    )
    return peft.get_peft_model(model, config)


def is_adapter_model(model: torch.nn.Module) -> bool:
    """True for a peft model (never when peft was not imported: no adapter can exist then)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model itself, under a peft wrapper or an :class:`AdapterDisabled`."""
    if isinstance(model, AdapterDisabled):
        model = model._model[0]
    return model.get_base_model() if is_adapter_model(model) else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a model's head (``model.base_model``), also through a peft wrapper."""
    return transformers_model(model).base_model


def merged_model(model: Any) -> PreTrainedModel:
    """A plain ``transformers`` model: a copy of the peft ``model`` with its adapter merged into
    the base weights (``model`` itself keeps training as it was)."""
    return copy.deepcopy(model).merge_and_unload()


class AdapterDisabled(torch.nn.Module):
    """The base model of a peft ``model``: ``forward`` and ``generate`` run inside
    ``model.disable_adapter()``. As PPO's reference it shares the policy's base weights, one
    copy in memory. The peft model is held in a list, so this module has no parameters of its
    own: nothing in the state dict, the optimiser or ``.to()``, and ``.eval()`` here leaves the
    policy's mode alone."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model = [model]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._model[0].disable_adapter():
            return self._model[0](*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._model[0].disable_adapter():
            return self._model[0].generate(*args, **kwargs)

    @property
    def generation_config(self) -> Any:
        """The base model's: it stops on the same ids as the policy."""
        return self._model[0].generation_config
