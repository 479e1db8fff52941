"""The models of a PPO run, loaded together: the policy (or its LoRA adapter), the frozen
reference, the reward source and the critic (:func:`load_ppo_models`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import AdapterDisabled, LoRASettings, add_adapter
from .models import load_causal_lm, load_reference, load_reward_model, load_sequence_scorer, load_tokenizer
from .reward_sources import CallableScorer, RewardModelScorer, TextRewardFn, same_tokenizer


@dataclass
class PPOModels:
    """The models of a PPO run: the trained policy (and critic), the frozen reference and the
    reward source (a frozen reward model's scorer, or a callable's)."""

    policy: PreTrainedModel
    reference: torch.nn.Module
    critic: PreTrainedModel | None
    reward_model: PreTrainedModel | None
    reward_scorer: Any


def load_ppo_models(
    policy: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    reference: str | None = None,
    lora: LoRASettings | None = None,
    reward_model: str | None = None,
    reward_fn: TextRewardFn | None = None,
    critic: str | None = None,
    with_critic: bool = True,
    reward_batch_size: int = 64,
) -> PPOModels:
    """Load what PPO trains against.

    The reference is ``reference`` (default: ``policy``), frozen (:func:`~rlhf_lightning.models.load_reference`); with ``lora``
    (:class:`~rlhf_lightning.lora.LoRASettings`) the policy trains an adapter and the reference is
    its own base model with the adapter disabled (one copy of the base weights). The reward comes
    from the ``reward_model`` folder (frozen) or the ``reward_fn`` callable (neither: no scorer, for
    a subclass that computes scores itself). The critic (only ``with_critic``) starts from
    ``critic``, else the reward model when it shares the policy's tokenizer, else the policy with
    a new scalar head.
    """
    policy_model = load_causal_lm(policy, tokenizer)
    if lora is not None:
        policy_model = add_adapter(policy_model, lora, "model.init_args.lora")
        reference_model: torch.nn.Module = AdapterDisabled(policy_model)
    else:
        reference_model = load_reference(reference or policy, tokenizer, policy, policy_model)
    scorer, scorer_model, critic_source = None, None, critic
    if reward_model is not None:
        reward_tokenizer = load_tokenizer(reward_model)
        scorer_model = load_reward_model(reward_model, reward_tokenizer).eval().requires_grad_(False)
        scorer = RewardModelScorer(scorer_model, reward_tokenizer, tokenizer, reward_batch_size)
        if critic_source is None and same_tokenizer(reward_tokenizer, tokenizer):
            critic_source = reward_model
    elif reward_fn is not None:
        scorer = CallableScorer(reward_fn)
    critic_model = load_sequence_scorer(critic_source or policy, tokenizer, role="critic").train() if with_critic else None
    return PPOModels(policy_model.train(), reference_model, critic_model, scorer_model, scorer)
