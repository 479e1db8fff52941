"""Sampling from a causal LM: the one generation routine of every stage.

Used by SFT samples, the PPO rollout and the labelling tool, so that they all sample the same
way: left-padded prompts, explicit sampling settings (the model's own ``generation_config``
defaults, such as ``top_k=50``, never leak in), and responses cut after the first EOS.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .data.encoding import attention_mask_for, encode_prompt, pad
from .terminal import ATTENTION_MASK_ADVICE, held_log_records


def sampling_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> GenerationConfig:
    """A complete :class:`GenerationConfig`: ``top_k=0`` and ``top_p=1.0`` sample the full
    distribution at ``temperature``, which PPO needs for its log-probs to match."""
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # A diverged model's NaN/inf logits would crash sampling; replaced, they give a rollout
        # whose NaN log-probs the PPO module skips (see rlhf_lightning.guards.NonFiniteGuard).
        remove_invalid_values=True,
    )


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Response ids ``(b, r)`` for left-padded ``prompt_ids`` ``(b, p)``.

    After a row's first EOS the remaining positions hold the pad token. ``r`` is at most
    ``config.max_new_tokens`` (shorter when every row stopped early).
    """
    # transformers drops an all-ones mask (prompts of one length) before decoding, then advises
    # passing one when a finished row feeds back the pad token: dropped, the mask was passed.
    # (transformers gives it once per process: after this call a later one would not show either way.)
    with held_log_records("transformers.modeling_utils", ATTENTION_MASK_ADVICE):
        sequences = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **generate_kwargs
        )
    return sequences[:, prompt_ids.shape[1] :]


def decode_responses(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    """Texts of ``(b, t)`` token ids, without special tokens or padding.

    Ids beyond the tokenizer (a model whose embedding matrix is padded past ``len(tokenizer)``
    can sample them) have no text and are dropped instead of failing.
    """
    size = len(tokenizer)
    return tokenizer.batch_decode([[i for i in row if i < size] for row in ids.tolist()], skip_special_tokens=True)


def sample_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    seed: int | None = 0,
    **sampling: Any,
) -> list[str]:
    """Sample one completion per prompt text; with ``seed`` the global RNG is left untouched."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    prompt_ids = pad(ids, tokenizer.pad_token_id, side="left").to(device)
    prompt_mask = attention_mask_for(ids, side="left").to(device)
    config = sampling_config(tokenizer, max_new_tokens, **sampling)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            if seed is not None:
                torch.manual_seed(seed)
            responses = generate_responses(model, prompt_ids, prompt_mask, config)
    finally:
        model.train(was_training)
    return decode_responses(tokenizer, responses)
