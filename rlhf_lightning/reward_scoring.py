"""Reward-model maths and scoring: the Bradley-Terry loss, pair accuracy, reading a sequence's
reward, and the auxiliary likelihood-distillation loss.

A reward model here is a Hugging Face ``*ForSequenceClassification`` model with one label
(see :func:`rlhf_lightning.models.load_sequence_scorer`). Its reward for a sequence is the
scalar head applied to the final hidden state of the **last non-padding token**, which in
this package is always the EOS that ends a response.

Hugging Face's own pooling finds that token by looking for ``pad_token_id`` in ``input_ids``,
and a plain GPT-2 forward numbers positions 0..t-1 whatever the mask says. Both are wrong for
left-padded (or PPO's left-and-right padded) batches, so this module never trusts either:

* the last real token is found from the **attention mask** (:func:`last_token_index`);
* position ids are built from the mask (:func:`position_ids_from_mask`) and always passed;
* the backbone (``model.base_model``) is run and the head (``model.score``) applied to the
  gathered hidden state, instead of calling the model's own forward.

The result is the same reward for a sequence whether its batch is padded left, right or both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from .lora import backbone
from . import ppo_math
from .ppo_math import logprobs_from_logits, masked_mean

#: Key in a reward model's ``config`` holding the offset subtracted by :func:`score_sequences`.
REWARD_OFFSET_KEY = "reward_offset"


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    centering_coef: float = 0.0,
) -> Tensor:
    """Pairwise Bradley-Terry loss of a batch of ``b`` preference pairs.

    ``mean(-logsigmoid(r_c - r_r - margin)) + centering_coef * mean((r_c + r_r) ** 2)``

    * ``margin`` ``(b,)`` (optional): how much better "chosen" must score (Llama-2 style);
    * ``centering_coef``: pulls the mean reward of each pair towards 0 (the loss alone is
      invariant to a constant shift of every reward), e.g. 0.01.

    Computed in float32 whatever the rewards' dtype.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(
            f"chosen and rejected rewards must both have shape (b,), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference).mean()
    if centering_coef:
        loss = loss + centering_coef * (chosen + rejected).pow(2).mean()
    return loss


def pair_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Per pair: 1 if chosen scores higher, 0 if lower, 0.5 on an exact tie.

    Ties count one half, the same convention as the ceiling
    :func:`rlhf_lightning.tasks.label_agreement`; a constant reward model scores 0.5. Also DPO's
    ``rewards/accuracies`` on its implicit rewards.
    """
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index ``(b,)`` of the last position whose mask is 1, for any padding side.

    Works for left, right and "both" padding (PPO's left-padded prompt + right-padded
    response). A row without any real token is an error here (a sequence to score has at
    least its EOS); the index itself is :func:`rlhf_lightning.ppo_math.last_token_index`'s.
    """
    if not attention_mask.bool().any(dim=-1).all():
        raise ValueError("attention_mask has a row without any real token (all zeros)")
    return ppo_math.last_token_index(attention_mask)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids ``(b, t)`` counting real tokens only: ``cumsum(mask) - 1``, clamped at 0.

    GPT-2 numbers positions ``0..t-1`` in a plain forward whatever the mask says, so a
    left-padded row would see its first real token at position ``pad_count``; pass these
    instead. Padding positions get 0 (they are masked out anyway).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def scalar_head(model: PreTrainedModel) -> nn.Module:
    """The scalar head of a sequence-classification model (``model.score``: GPT-2, Llama,
    Mistral, Qwen, Gemma, ...), which maps hidden states ``(..., h)`` to ``(..., 1)``."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no 'score' head; reward models must be decoder "
            "*ForSequenceClassification models with num_labels=1 (load them with "
            "rlhf_lightning.models.load_sequence_scorer)"
        )
    return head


def hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The backbone's final hidden states ``(b, t, h)``, with grad, position ids built from the
    mask (any padding side)."""
    return backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def at_last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Rows ``(b, h)`` of ``hidden`` ``(b, t, h)`` at each row's last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)]


def rewards_from_hidden(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """Rewards ``(b,)`` (float32) from the hidden states ``(b, h)`` at the last real token
    (:func:`at_last_token`): the scalar head."""
    return scalar_head(model)(hidden).squeeze(-1).float()


def sequence_rewards(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Rewards ``(b,)`` (float32, with grad) read at each row's last real token.

    The scalar head applied to the backbone's state at that token (the head is linear, so this
    equals the per-token scores read at that position). Raw rewards: ``reward_offset`` is *not*
    subtracted (see :func:`score_sequences`).
    """
    return rewards_from_hidden(model, at_last_token(hidden_states(model, input_ids, attention_mask), attention_mask))


def token_log_likelihoods(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``log p(token_i | tokens before i)`` under a causal LM's ``logits`` ``(b, t, v)``, for
    ``i = 1 .. t-1``: float32 ``(b, t-1)``, and the bool mask ``(b, t-1)`` of the positions
    that count (a real token that follows a real token; the first real token has no
    prediction). Any padding side."""
    logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:]).float()
    predicted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return logprobs, predicted


def likelihood_distillation_loss(predicted: Tensor, log_likelihoods: Tensor, mask: Tensor) -> Tensor:
    """``mean((predicted - z)^2)`` over the positions in ``mask``, where ``z`` is
    ``log_likelihoods`` standardised over those positions (zero mean, unit standard deviation;
    all zeros when they have no spread; the loss is 0 when ``mask`` is empty). All ``(b, t)``.

    The auxiliary loss of :class:`~rlhf_lightning.modules.RewardModule`'s
    ``likelihood_distillation_coef``: a second head on every token's hidden state learns how
    surprised the reference model was by that token, so that the backbone marks the slips the
    reference notices (a doubled, stray or swapped word, a misspelling) where they happen, for
    the reward's token to attend to.
    """
    target = log_likelihoods.float()
    centred = torch.where(mask.bool(), target - masked_mean(target, mask), 0.0)
    # No host sync, no NaN: a spread of 0 gives 0 / tiny = 0 at every position.
    spread = masked_mean(centred.square(), mask).sqrt().clamp(min=torch.finfo(torch.float32).tiny)
    return masked_mean((predicted.float() - centred / spread).square(), mask)


def reward_offset(model: PreTrainedModel) -> float:
    """The normalisation offset stored in ``model.config`` (0.0 when absent)."""
    return float(getattr(model.config, REWARD_OFFSET_KEY, 0.0) or 0.0)


@torch.no_grad()
def score_sequences(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    batch_size: int = 64,
    apply_offset: bool = True,
) -> Tensor:
    """Rewards ``(b,)`` of finished sequences: the scoring API of the PPO stage.

    No grad, eval mode (the model's previous mode is restored), ``batch_size`` rows per
    forward so that a large rollout batch does not blow memory, and ``reward_offset`` from the
    model's config subtracted (``apply_offset=False`` gives raw rewards). Rows may be padded on
    either side; the result is on ``input_ids``'s device, float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = [
            sequence_rewards(model, ids.to(device), mask.to(device))
            for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size))
        ]
    finally:
        model.train(was_training)
    rewards = torch.cat(chunks) if chunks else torch.zeros(0, device=device)
    if apply_offset:
        rewards = rewards - reward_offset(model)
    return rewards.to(input_ids.device)
