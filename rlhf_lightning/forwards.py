"""Every forward pass of the package, in one place: logits, response log-probs, critic values and
reward-model scores, all under position ids built from the attention mask.

A causal LM here sees left-padded prompts followed by right-padded responses (PPO's rollout), or
right-padded sequences (the reward stage). Hugging Face's own pooling finds a sequence's last
token by looking for ``pad_token_id`` in ``input_ids``, and a plain GPT-2 forward numbers
positions 0..t-1 whatever the mask says. Both are wrong for such batches, so this module never
trusts either:

* position ids are built from the mask (:func:`position_ids_from_mask`) and always passed;
* the last real token is found from the mask
  (:func:`~rlhf_lightning.rlhf_math.last_token_index`, the one rule for it);
* a scalar model (reward model, critic: a ``*ForSequenceClassification`` with one label, see
  :func:`rlhf_lightning.models.load_sequence_scorer`) runs its backbone (``model.base_model``)
  and applies its head (``model.score``) to the hidden states it needs, instead of calling the
  model's own forward.

The result is the same for a sequence whether its batch is padded left, right or both. Rollout,
evaluation, the reward stage, DPO and the critic all call these functions.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from .lora import adapter_context, backbone, transformers_model
from .rlhf_math import last_token_index, logprobs_from_logits

#: Key in a reward model's ``config`` holding the offset subtracted by :func:`score_sequences`.
REWARD_OFFSET_KEY = "reward_offset"


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids ``(b, t)`` counting real tokens only: ``cumsum(mask) - 1``, clamped at 0.

    GPT-2 numbers positions ``0..t-1`` in a plain forward whatever the mask says, so a
    left-padded row would see its first real token at position ``pad_count``; pass these
    instead. Padding positions get 0 (they are masked out anyway).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def causal_lm_logits(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, last: int = 0) -> Tensor:
    """Logits ``(b, s, v)`` with position ids built from the mask (left padding is safe).

    With ``last > 0``, the logits of the last ``last`` positions only, ``(b, last, v)``: a model
    whose forward takes transformers' ``logits_to_keep`` (GPT-2, Llama, Qwen2, ..., also under a
    peft wrapper) applies its output head to those positions alone, which saves the
    ``(b, s, v)`` tensor; any other model's full logits are sliced.
    """
    position_ids = position_ids_from_mask(attention_mask)
    keep = {"logits_to_keep": last} if last > 0 and takes_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **keep).logits
    return logits[:, -last:] if last > 0 else logits


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the ``transformers`` model under ``model`` takes ``logits_to_keep`` in its forward."""
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters


def predicting_response(states: Tensor, response_length: int) -> Tensor:
    """The rows ``(b, r, ...)`` of ``states`` ``(b, t, ...)`` (logits, hidden states) at the
    positions that predict the last ``response_length`` tokens: position ``i`` predicts token
    ``i + 1``, so the ``r`` positions before the last one. They lie within the last ``r + 1``
    positions, so ``states`` may hold only those."""
    return states[:, -response_length - 1 : -1]


def response_logprobs(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_length: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Log-probs ``(b, r)`` of the last ``response_length`` tokens, and the logits that gave them
    (:func:`predicting_response`; only the last ``r + 1`` positions get logits)."""
    logits = causal_lm_logits(model, input_ids, attention_mask, last=response_length + 1)
    response_logits = predicting_response(logits, response_length)
    return logprobs_from_logits(response_logits, input_ids[:, -response_length:], temperature), response_logits


def token_values(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """Critic values ``(b, r)``: the scalar head on each position that predicts a response token
    (:func:`predicting_response`)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    return scalar_head(model)(predicting_response(hidden, response_length)).squeeze(-1).float()


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
    mask (any padding side); a critic adapter on a shared base runs with its adapter active
    (:func:`~rlhf_lightning.lora.adapter_context`)."""
    with adapter_context(model):
        return backbone(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state


def at_last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Rows ``(b, h)`` of ``hidden`` ``(b, t, h)`` at each row's last real token, for any padding
    side (:func:`~rlhf_lightning.rlhf_math.last_token_index`). A row without any real token is an
    error here: a sequence to score has at least its EOS."""
    if not attention_mask.bool().any(dim=-1).all():
        raise ValueError("attention_mask has a row without any real token (all zeros)")
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
