"""LoRA adapters through ``peft`` (the optional ``lora`` extra): the ``lora:`` key of each stage.

* :func:`add_adapter` wraps a model in a peft model whose only trainable weights are the
  adapter's (plus, for a reward model, its scalar head);
* :class:`AdapterDisabled` is the base model under a LoRA policy: PPO's reference, sharing the
  policy's base weights instead of holding a second copy;
* :class:`AdapterCritic` is PPO's critic as a second adapter and a value head on that same base
  (``lora.critic: adapter``);
* :func:`merged_model` is what an export writes: a plain ``transformers`` model with the adapter
  merged into the base weights.

peft is imported only when a stage asks for LoRA, so the package works without it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .errors import UserInputError

#: The subfolder of an export folder that holds the adapter alone (``LoRASettings.export_adapter``).
ADAPTER_SUBFOLDER = "adapter"
#: The choices of ``LoRASettings.critic``.
LORA_CRITICS = ("separate", "adapter")
#: The name of PPO's critic adapter (``lora.critic: adapter``) on the policy's peft model, whose
#: own adapter keeps peft's default name.
CRITIC_ADAPTER = "critic"


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
        critic: PPO only (the other stages refuse any value but ``separate``: :func:`check_no_lora_critic`).
            ``separate`` (default): the critic is a model of its own, trained in
            full. ``adapter``: the critic is a second adapter (same ``r``, ``alpha``,
            ``target_modules``) on the policy's base model plus a new value head
            (:class:`AdapterCritic`), so policy, reference and critic share one copy of the base
            weights.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    export_adapter: bool = False
    critic: str = "separate"


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
    return require_peft(config_key).get_peft_model(model, lora_config(settings, config_key, task_type))


def lora_config(settings: LoRASettings, config_key: str, task_type: str = "CAUSAL_LM") -> Any:
    """peft's ``LoraConfig`` of ``settings``."""
    return require_peft(config_key).LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type=task_type,
    )


def check_reference(lora: LoRASettings | None, reference: str | None, policy: str, reference_key: str) -> None:
    """Refuse a reference model other than the policy's with ``lora`` (a :class:`UserInputError`
    naming ``reference_key``): the reference is then the policy's own base model with the adapter
    disabled (:class:`AdapterDisabled`), so a separate one would be ignored."""
    if lora is not None and reference not in (None, policy):
        raise UserInputError(f"{reference_key}: with lora the reference is the policy's base model; leave "
                             f"{reference_key.rpartition('.')[2]} unset")


def check_lora_critic(lora: LoRASettings | None, critic: str | None, gradient_checkpointing: bool, key: str) -> None:
    """Refuse (a one-line :class:`UserInputError` naming the ``key.*`` setting) an unknown
    ``lora.critic``, and with ``adapter`` a ``critic`` folder (the critic adapter starts on the
    policy's base model, so it would be ignored) or ``gradient_checkpointing`` (the recompute in
    the backward would run with whichever adapter is active then, not the one of the forward)."""
    if lora is None:
        return
    if lora.critic not in LORA_CRITICS:
        raise UserInputError(f"{key}.lora.critic must be one of {LORA_CRITICS}, got {lora.critic!r}")
    if lora.critic == "adapter" and critic is not None:
        raise UserInputError(f"{key}.critic: with lora.critic adapter the critic is an adapter on the policy's base "
                             "model; leave critic unset")
    if lora.critic == "adapter" and gradient_checkpointing:
        raise UserInputError(f"{key}.gradient_checkpointing is not supported with lora.critic adapter yet; set "
                             "lora.critic separate or gradient_checkpointing false")


def check_no_lora_critic(lora: LoRASettings | None, stage: str, key: str) -> None:
    """Refuse (a one-line :class:`UserInputError` naming ``key.critic``) a ``lora.critic`` other
    than the default ``separate`` for ``stage``, a stage without a critic (all but PPO)."""
    if lora is not None and lora.critic != "separate":
        raise UserInputError(f"{key}.critic is for PPO's critic only; {stage} has none: leave it unset (separate), "
                             f"got {lora.critic!r}")


def is_adapter_model(model: torch.nn.Module) -> bool:
    """True for a peft model (never when peft was not imported: no adapter can exist then)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model itself, under a peft wrapper, an :class:`AdapterDisabled` or an
    :class:`AdapterCritic`."""
    if isinstance(model, SharesPeftModel):
        model = model.peft_model
    return model.get_base_model() if is_adapter_model(model) else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a model's head (``model.base_model``), also through a peft wrapper."""
    return transformers_model(model).base_model


def merged_model(model: Any) -> PreTrainedModel:
    """A plain ``transformers`` model: a copy of the peft ``model`` with its active adapter merged
    into the base weights, or an :class:`AdapterCritic`'s :func:`merged_critic` (``model`` itself
    keeps training as it was)."""
    if isinstance(model, AdapterCritic):
        return merged_critic(model)
    return copy.deepcopy(model).merge_and_unload()


def merged_critic(critic: AdapterCritic) -> PreTrainedModel:
    """A plain ``*ForSequenceClassification`` model (``num_labels=1``) that gives ``critic``'s
    values: a copy of the base with the critic adapter merged, and the value head as ``score``."""
    from transformers import AutoModelForSequenceClassification

    causal_lm = copy.deepcopy(critic.peft_model).merge_and_unload(adapter_names=[CRITIC_ADAPTER])
    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.architectures = 1, None
    with torch.device("meta"):  # both of its parts are replaced: allocate neither
        model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, causal_lm.base_model)
    model.score = copy.deepcopy(critic.score)
    return model


def adapter_parameters(model: Any, adapter: str) -> list[torch.nn.Parameter]:
    """The weights of the peft ``model``'s adapter named ``adapter`` (each adapted layer's
    ``lora_A``, ``lora_B``, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        parameter for layer in model.modules() if isinstance(layer, BaseTunerLayer)
        for weights in layer.adapter_layer_names
        for key, parameter in getattr(layer, weights).named_parameters() if key.split(".")[0] == adapter
    ]


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights an optimiser trains in ``model``: an :class:`AdapterCritic`'s adapter and value
    head, else every weight with ``requires_grad``."""
    if isinstance(model, AdapterCritic):
        return [*adapter_parameters(model.peft_model, CRITIC_ADAPTER), *model.score.parameters()]
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def adapter_switched(model: Any, adapter: str | None) -> Iterator[None]:
    """Run the block with the peft ``model``'s adapter named ``adapter`` active (None: every
    adapter disabled), then switch back to the adapter active before.

    peft's switches also set ``requires_grad`` (on for the adapter they activate, off for the
    others): every weight gets back the flag it had before, also when the block raises, so that
    the optimiser, checkpoints (which leave out frozen weights) and the guards see each adapter
    as trained, or as frozen, as before.
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    active = model.active_adapter
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield
    finally:
        if adapter is not None:
            model.set_adapter(active)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


def adapter_context(model: torch.nn.Module) -> Any:
    """The context in which ``model``'s backbone runs: an :class:`AdapterCritic`'s adapter active;
    none for any other model."""
    return adapter_switched(model.peft_model, CRITIC_ADAPTER) if isinstance(model, AdapterCritic) else nullcontext()


class SharesPeftModel(torch.nn.Module):
    """A model that PPO runs besides the policy on the policy's own peft ``model`` (one copy of
    the base weights in memory). The peft model is held in a list, so this module does not own
    its parameters: they are in the state dict, the optimiser and ``.to()`` once, as the
    policy's, and ``.eval()`` here leaves the policy's mode alone."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model = [model]

    @property
    def peft_model(self) -> Any:
        return self._model[0]


class AdapterDisabled(SharesPeftModel):
    """The base model of a peft ``model``, PPO's reference: ``forward`` and ``generate`` run with
    every adapter disabled (:func:`adapter_switched`). It has no parameters of its own."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_switched(self.peft_model, None):
            return self.peft_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_switched(self.peft_model, None):
            return self.peft_model.generate(*args, **kwargs)

    @property
    def generation_config(self) -> Any:
        """The base model's: it stops on the same ids as the policy."""
        return self.peft_model.generation_config


class AdapterCritic(SharesPeftModel):
    """PPO's critic with ``lora.critic: adapter``: a second adapter (:data:`CRITIC_ADAPTER`, the
    ``settings`` of the policy's) on the policy's peft ``model``, and a value head ``score``.

    The head is new, ``Linear(hidden, 1, bias=False)`` initialised as transformers initialises a
    new ``*ForSequenceClassification`` head of the policy's architecture (the separate critic's
    start on a causal LM). It does not start from the reward model's head, as a separate critic
    does: that head reads the reward model's hidden states, not the policy's base model's. The
    adapter's ``B`` starts at zero, so the critic's backbone starts as the base model.

    :func:`~rlhf_lightning.forwards.hidden_states` runs the backbone with the critic adapter
    active (:func:`adapter_context`), and switches back to the policy's after the forward. This
    module's own parameters are the head's; the adapter's are in the policy's state dict, and
    :func:`trained_parameters` gives both to the critic's optimiser.
    """

    def __init__(self, model: Any, settings: LoRASettings, config_key: str) -> None:
        super().__init__(model)
        model.add_adapter(CRITIC_ADAPTER, lora_config(settings, config_key))
        for parameter in adapter_parameters(model, CRITIC_ADAPTER):  # peft leaves an inactive adapter frozen
            parameter.requires_grad_(True)
        base = model.get_base_model()
        embeddings = base.get_input_embeddings().weight
        self.score = torch.nn.Linear(base.config.hidden_size, 1, bias=False, dtype=embeddings.dtype,
                                     device=embeddings.device)
        base._init_weights(self.score)
