"""The models of a PPO run, loaded together: the policy (or its LoRA adapter), the frozen
reference, the reward source and the critic (:func:`load_ppo_models`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import AdapterCritic, AdapterDisabled, LoRASettings, add_adapter
from .models import (
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reference,
    load_reward_model,
    load_sequence_scorer,
    load_tokenizer,
)
from .errors import UserInputError
from .ppo_settings import ImplicitRewardSettings, reward_folders
from .reward_sources import (CallableScorer, EnsembleScorer, ImplicitRewardScorer, RewardModelScorer, TextRewardFn,
                             same_tokenizer)


@dataclass
class PPOModels:
    """The models of a PPO run: the trained policy (and critic), the frozen reference and the
    reward source (a frozen reward model's scorer, an ensemble's, a DPO implicit reward's, or a
    callable's). ``reward_models`` are the frozen reward models: one, an ensemble's members, or
    none; ``implicit_reward_models`` the implicit reward's frozen DPO policy and its reference,
    less ``reference`` when that serves as both."""

    policy: PreTrainedModel
    reference: torch.nn.Module
    critic: torch.nn.Module | None  # a sequence-classification model, or an AdapterCritic
    reward_models: list[PreTrainedModel]
    reward_scorer: Any
    implicit_reward_models: list[torch.nn.Module] = field(default_factory=list)


def load_reward_scorer(folder: str, policy_tokenizer: PreTrainedTokenizerBase, batch_size: int = 64) -> RewardModelScorer:
    """The scorer of the reward model in ``folder``, frozen (eval mode, no gradients)."""
    reward_tokenizer = load_tokenizer(folder)
    model = load_reward_model(folder, reward_tokenizer).eval().requires_grad_(False)
    return RewardModelScorer(model, reward_tokenizer, policy_tokenizer, batch_size)


def check_implicit_reward_tokenizer(folder: str, policy_tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    """Refuse, naming ``key``, a model of the implicit reward whose tokenizer is not the policy's:
    it reads the policy's token ids, and log-probs of re-tokenized text would be another reward."""
    if not same_tokenizer(load_tokenizer(folder), policy_tokenizer):
        raise UserInputError(f"{key}: the tokenizer of {folder} differs from the policy's; the implicit reward reads "
                             "the policy's token ids, so DPO must start from the PPO policy's tokenizer")


def load_implicit_reward(
    settings: ImplicitRewardSettings, policy: str, tokenizer: PreTrainedTokenizerBase, reference_folder: str,
    reference_model: torch.nn.Module, batch_size: int = 64,
) -> ImplicitRewardScorer:
    """The scorer of DPO's implicit reward, its models frozen (:func:`~rlhf_lightning.models.
    load_reference`). Its reference (``settings.reference``, default ``policy``) is PPO's own
    ``reference_model`` when it names the same ``reference_folder`` (one copy)."""
    key = "model.init_args.implicit_reward"
    check_implicit_reward_tokenizer(settings.policy, tokenizer, f"{key}.policy")
    dpo_policy = load_reference(settings.policy, tokenizer)
    folder = settings.reference or policy
    if folder == reference_folder:
        return ImplicitRewardScorer(dpo_policy, reference_model, settings.beta, batch_size)
    check_implicit_reward_tokenizer(folder, tokenizer, f"{key}.reference")
    return ImplicitRewardScorer(dpo_policy, load_reference(folder, tokenizer), settings.beta, batch_size)


def load_ppo_models(
    policy: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    reference: str | None = None,
    lora: LoRASettings | None = None,
    reward_model: str | list[str] | None = None,
    reward_fn: TextRewardFn | None = None,
    implicit_reward: ImplicitRewardSettings | None = None,
    critic: str | None = None,
    with_critic: bool = True,
    reward_batch_size: int = 64,
    ensemble_penalty: float = 0.0,
    gradient_checkpointing: bool = False,
    on_loaded: Callable[[torch.nn.Module], None] | None = None,
) -> PPOModels:
    """Load what PPO trains against.

    The reference is ``reference`` (default: ``policy``), frozen (:func:`~rlhf_lightning.models.load_reference`); with ``lora``
    (:class:`~rlhf_lightning.lora.LoRASettings`) the policy trains an adapter and the reference is
    its own base model with the adapter disabled (one copy of the base weights). The reward comes
    from the ``reward_model`` folder (frozen), a list of folders (an :class:`~rlhf_lightning.
    reward_sources.EnsembleScorer` of frozen members with ``ensemble_penalty``), DPO's
    ``implicit_reward`` (:func:`load_implicit_reward`), or the ``reward_fn`` callable (none of
    them: no scorer, for a subclass that computes scores itself).
    The critic (only ``with_critic``) starts from ``critic``, else the (first) reward model when it
    shares the policy's tokenizer, else the policy with a new scalar head; with ``lora.critic``
    ``adapter`` it is a second adapter and a new value head on the policy's base model
    (:class:`~rlhf_lightning.lora.AdapterCritic`). With
    ``gradient_checkpointing`` the models that train (policy, critic) recompute their activations
    in the backward (:func:`~rlhf_lightning.models.enable_gradient_checkpointing`).

    ``on_loaded`` is called once on each model that is loaded (not on the LoRA reference and
    critic, which are views of the policy), as soon as nothing else is built from it: under FSDP2
    it shards the model (:func:`~rlhf_lightning.sharding.shard_models`), so that a process holds
    at most two models whole at any time instead of all of them.
    """
    loaded = on_loaded or (lambda model: None)
    policy_model = load_causal_lm(policy, tokenizer)
    reference_folder = reference or policy
    if lora is not None:
        policy_model = add_adapter(policy_model, lora, "model.init_args.lora")
        reference_model: torch.nn.Module = AdapterDisabled(policy_model)
    else:
        reference_model = load_reference(reference_folder, tokenizer, policy, policy_model)
        loaded(reference_model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(policy_model)
    if lora is None:
        loaded(policy_model)
    folders = reward_folders(reward_model)
    members = []
    for folder in folders:
        members.append(load_reward_scorer(folder, tokenizer, reward_batch_size))
        loaded(members[-1].model)
    scorer: Any = None
    implicit_models: list[torch.nn.Module] = []  # the implicit reward's models, but PPO's own reference
    if len(members) > 1:
        scorer = EnsembleScorer(members, ensemble_penalty)
    elif members:
        scorer = members[0]
    elif implicit_reward is not None:
        scorer = load_implicit_reward(implicit_reward, policy, tokenizer, reference_folder, reference_model,
                                      reward_batch_size)
        implicit_models = [m for m in (scorer.model, scorer.reference) if m is not reference_model]
        for model in implicit_models:
            loaded(model)
    elif reward_fn is not None:
        scorer = CallableScorer(reward_fn)
    critic_model: torch.nn.Module | None = None
    if with_critic and lora is not None and lora.critic == "adapter":
        critic_model = AdapterCritic(policy_model, lora, "model.init_args.lora").train()
    elif with_critic:
        critic_source = critic
        if critic_source is None and members and members[0].shares_tokens:
            critic_source = folders[0]
        critic_model = load_sequence_scorer(critic_source or policy, tokenizer, role="critic").train()
    if critic_model is not None and gradient_checkpointing:
        enable_gradient_checkpointing(critic_model)
    if critic_model is not None and not isinstance(critic_model, AdapterCritic):
        loaded(critic_model)
    if lora is not None:
        loaded(policy_model)
    return PPOModels(policy_model.train(), reference_model, critic_model, [m.model for m in members], scorer,
                     implicit_models)
