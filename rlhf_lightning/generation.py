"""Sampling from a causal LM: the one generation routine of every stage.

Used by SFT samples, the PPO rollout and the labelling tool, so that they all sample the same
way: left-padded prompts, explicit sampling settings (the model's own ``generation_config``
defaults, such as ``top_k=50``, never leak in), and responses cut after the first stop token
(EOS, or a chat model's end-of-turn token: :func:`~rlhf_lightning.stop_tokens.stop_token_ids`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from transformers import (
    GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from .data.encoding import attention_mask_for, encode_prompt, pad
from .rlhf_math import first_eos_mask
from .stop_tokens import stop_token_ids
from .terminal import ATTENTION_MASK_ADVICE, held_log_records


@dataclass
class GenerationSettings:
    """How responses are sampled; PPO's log-probs use the same ``temperature``.

    Args:
        max_new_tokens: the longest response in tokens (>= 1); a response that reaches it
            without a stop token (EOS, a chat model's end of turn) is "missing EOS".
        min_new_tokens: EOS is forbidden before this many tokens (>= 0).
        temperature: logits are divided by it before sampling and before every log-prob (> 0).
        top_k: sample among the k most likely tokens only (0: all). PPO's log-probs are those of
            the full distribution, so anything but 0 makes them differ from the sampler's (the
            PPO module warns when it is built with such settings).
        top_p: nucleus sampling mass (1.0: all); the same caveat as ``top_k``.
    """

    max_new_tokens: int = 48
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Responses:
    """Sampled responses: token ids with masks, and the decoded texts (what a reward source sees).

    ``prompt_ids``/``prompt_mask`` ``(b, p)`` are left-padded; ``response_ids``/``response_mask``
    ``(b, r)`` hold the response up to and including its first stop token, one of ``stop_ids``
    (those of the model that sampled it). ``prompts`` and ``completions`` (the texts, without
    special tokens or padding) are decoded on first use, so a reward that reads only ids never
    pays for decoding.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]

    @cached_property
    def prompts(self) -> list[str]:
        return decode_responses(self.tokenizer, self.prompt_ids)

    @cached_property
    def completions(self) -> list[str]:
        return decode_responses(self.tokenizer, self.response_ids)

    @property
    def input_ids(self) -> Tensor:
        """Prompt and response ids side by side ``(b, p + r)``."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """1 on real prompt and response tokens; padding on both sides is 0."""
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)


def sampling_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> GenerationConfig:
    """A complete :class:`GenerationConfig`: ``top_k=0`` and ``top_p=1.0`` sample the full
    distribution at ``temperature``, which PPO needs for its log-probs to match. Generation
    stops at any of ``stop_ids`` (default: the tokenizer's own, ``stop_token_ids(None, tokenizer)``)."""
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        eos_token_id=list(stop_token_ids(None, tokenizer) if stop_ids is None else stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # A diverged model's NaN/inf logits would crash sampling; replaced, they give a rollout
        # whose NaN log-probs the PPO module skips (see rlhf_lightning.guards.NonFiniteGuard).
        remove_invalid_values=True,
    )


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from ``softmax(scores)`` and returns scores that are 0 at the
    drawn token and ``-inf`` elsewhere, so that greedy selection takes it.

    The draw inverts the cumulative distribution (summed in float64, so that even a token of
    probability 1e-12 at the end of a large vocabulary keeps its share): the first token whose
    cumulative probability exceeds ``u * total``, ``u ~ U[0, 1)`` from torch's global generator.
    It is the distribution ``torch.multinomial`` samples, at a fraction of its cost on CPU,
    where ``torch.multinomial`` draws an exponential variate for every vocabulary entry
    (33-34 ms against 2-5 ms for 32 rows of a 50257-token vocabulary on 2 cores,
    ``benchmarks/sampler.py``). Tokens of probability 0 (masked by top-k or top-p) are never
    drawn.

    A row without a distribution (its softmax is NaN: every score ``-inf``, or a ``+inf`` that
    temperature made of the largest float ``remove_invalid_values`` left) takes its largest
    score, the limit of its distribution, where ``torch.multinomial`` would raise: a diverged
    model's rollout then reaches :class:`~rlhf_lightning.guards.NonFiniteGuard`, which skips it.
    """

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1, dtype=torch.float64)
        total = cdf[:, -1:]
        u = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * total
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        undefined = ~(total.isfinite() & (total > 0))
        if undefined.any():
            largest = scores.float().nan_to_num(nan=float("-inf")).argmax(dim=-1, keepdim=True)
            drawn = torch.where(undefined, largest, drawn)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


def _reproducible_by_sampler(config: GenerationConfig) -> bool:
    """Whether :func:`drawn_by_inverse_cdf` reproduces ``config``'s sampling exactly: one
    sequence per prompt, no beams, and no warper but temperature, top-k (given) and top-p."""
    others = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}
    return (
        config.num_beams in (None, 1) and config.num_return_sequences in (None, 1) and config.top_k is not None
        and all(getattr(config, key, default) in (None, default) for key, default in others.items())
    )


def drawn_by_inverse_cdf(config: GenerationConfig) -> tuple[GenerationConfig, LogitsProcessorList]:
    """The sampling of ``config`` (a :func:`sampling_config`), done by :class:`InverseCDFSampler`:
    a greedy copy of ``config``, and the processors that sample, in transformers' own order
    (temperature, top-k, top-p, then the draw). A greedy ``config``, and one with settings the
    sampler does not reproduce (beams, several sequences per prompt, min-p and the other
    warpers, top-k left to transformers' default), is returned as it is: transformers samples it."""
    if not config.do_sample or not _reproducible_by_sampler(config):
        return config, LogitsProcessorList()
    processors = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    processors.append(InverseCDFSampler())
    greedy = copy.deepcopy(config)
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, None, None, None
    return greedy, processors


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Response ids ``(b, r)`` for left-padded ``prompt_ids`` ``(b, p)``.

    After a row's first stop token the remaining positions hold the pad token. ``r`` is at most
    ``config.max_new_tokens`` (shorter when every row stopped early). A sampling ``config`` draws
    its tokens with :class:`InverseCDFSampler` (:func:`drawn_by_inverse_cdf`), after any
    ``logits_processor`` given in ``generate_kwargs``.
    """
    config, sampler = drawn_by_inverse_cdf(config)
    generate_kwargs["logits_processor"] = LogitsProcessorList([*generate_kwargs.get("logits_processor", []), *sampler])
    if sampler and getattr(model.generation_config, "do_sample", False):
        # transformers 4.x fills a config's default-valued fields (do_sample=False) from the
        # model's generation config (a chat model's often samples); a keyword argument is applied
        # after that. Only then: transformers 5 keeps the config's own value and warns about it.
        generate_kwargs["do_sample"] = False
    # transformers drops an all-ones mask (prompts of one length) before decoding, then advises
    # passing one when a finished row feeds back the pad token: dropped, the mask was passed.
    # (transformers gives it once per process: after this call a later one would not show either way.)
    with held_log_records("transformers.modeling_utils", ATTENTION_MASK_ADVICE):
        sequences = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **generate_kwargs
        )
    return sequences[:, prompt_ids.shape[1] :]


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: GenerationSettings,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    seed: int | None = None,
) -> Responses:
    """Sample one response per left-padded prompt with ``settings``, in eval mode (the model's
    mode is restored). Generation stops at the model's stop ids
    (:func:`~rlhf_lightning.stop_tokens.stop_token_ids`); tokens after a response's first stop
    token become padding and are masked out.

    With ``seed`` the sampling is reproducible and the global RNG is left as it was, so that
    evaluating never changes what training samples next; without it the global RNG is used.
    """
    stop_ids = stop_token_ids(model, tokenizer)
    config = sampling_config(tokenizer, **asdict(settings), stop_ids=stop_ids)
    was_training = model.training
    model.eval()
    try:
        devices = [] if prompt_ids.device.type == "cpu" else [prompt_ids.device]
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            response_ids = generate_responses(model, prompt_ids, prompt_mask, config)
    finally:
        model.train(was_training)
    response_mask = first_eos_mask(response_ids, stop_ids, tokenizer.pad_token_id)
    response_ids = response_ids.masked_fill(~response_mask, tokenizer.pad_token_id)
    return Responses(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, stop_ids)


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
    """Sample one completion per prompt text (:func:`sample`); ``sampling``: the other fields of
    :class:`GenerationSettings`."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    prompt_ids = pad(ids, tokenizer.pad_token_id, side="left").to(device)
    prompt_mask = attention_mask_for(ids, side="left").to(device)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, **sampling)
    return sample(model, tokenizer, settings, prompt_ids, prompt_mask, seed).completions
