"""RLHF math as pure functions on tensors (torch + stdlib only): PPO, the critic-free advantage
estimators (GRPO, RLOO, REINFORCE++), the DPO losses and the reward model's Bradley-Terry loss.
Every formula of the package is here, named as in its paper (the references below).

Shapes: ``b`` = batch of responses, ``t`` = response length, ``v`` = vocabulary size.
``mask`` arguments are bool or float (b, t) tensors: nonzero = real response token, 0 = padding.
Masked reductions ignore padding entirely (it may hold anything, even inf/nan, without changing
a result or a gradient) and per-token outputs are 0 at padding. Response masks are expected
to be prefixes: real tokens, then padding.

References:
  [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
  [Z19] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  [N]   Huang et al., "The N Implementation Details of RLHF with PPO".
  [KL]  Schulman 2020, "Approximating KL Divergence" (k1 / k2 / k3).
  [K19] Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (leave-one-out).
  [GRPO] Shao et al. 2024, "DeepSeekMath" (group-relative advantages, k3 KL in the loss).
  [DrGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective".
  [R++] Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs".
  [DPO] Rafailov et al. 2023, "Direct Preference Optimization" (eq. 7).
  [cDPO] Mitchell 2023, "A note on DPO with noisy preferences" (label smoothing).
  [rDPO] Chowdhury et al. 2024, "Provably Robust DPO" (unbiased under label noise).
  [IPO] Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        Preferences" (eq. 17).
  [C23] Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"
        (uncertainty-weighted optimisation: mean - k * spread of the members).
  [E23] Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do
        not Eliminate Reward Hacking".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_REDUCTIONS = ("sequence_mean", "token_mean", "constant")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")
DEFAULT_CHUNK_SIZE = 256  # (batch, time) rows of logits upcast to float32 at once


# ---------------------------------------------------------------------------------- logits
def _chunks(b: int, t: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """(batch, time) slices covering (b, t), each with at most ``chunk_size`` rows."""
    rows = chunk_size or DEFAULT_CHUNK_SIZE
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tc = max(1, min(t, rows))  # whole sequences per chunk when they fit
    bc = max(1, rows // tc)
    for i in range(0, b, bc):
        for j in range(0, t, tc):
            yield slice(i, i + bc), slice(j, j + tc)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """A chunk upcast to (at least) float32 and divided by the sampling temperature."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z if temperature == 1.0 else z / temperature


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token], one chunk of rows at a time in both directions.

    Only the (b, t) logsumexp is saved and backward recomputes softmax per chunk, so no float32
    (b, t, v) tensor ever exists (plain autograd through a chunk loop would keep every chunk).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, temperature: float,
                chunk_size: int | None) -> Tensor:
        b, t = tokens.shape
        out = logits.new_empty((b, t), dtype=torch.promote_types(logits.dtype, torch.float32))
        lse = torch.empty_like(out)
        for sl in _chunks(b, t, chunk_size):
            z = _scaled(logits[sl], temperature)
            lse[sl] = torch.logsumexp(z, dim=-1)
            out[sl] = z.gather(-1, tokens[sl].unsqueeze(-1)).squeeze(-1) - lse[sl]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for sl in _chunks(*tokens.shape, ctx.chunk_size):
            # d logp / d z = onehot(token) - softmax(z), and d z / d logits = 1 / T
            g = torch.exp(_scaled(logits[sl], ctx.temperature) - lse[sl].unsqueeze(-1)).neg_()
            idx = tokens[sl].unsqueeze(-1)
            g.scatter_add_(-1, idx, torch.ones_like(idx, dtype=g.dtype))
            grad[sl] = g.mul_((grad_out[sl] / ctx.temperature).unsqueeze(-1))
        return grad, None, None, None


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                         chunk_size: int | None = None) -> Tensor:
    """Log-probability of ``tokens`` under softmax(logits / temperature).

    Args:
        logits: (b, t, v), any float dtype; may be a non-contiguous view such as a slice.
        tokens: (b, t) int64, valid vocabulary ids everywhere (mask padding afterwards).
        temperature: the sampling temperature; use the same value at rollout and in training,
            otherwise the PPO ratio is not 1 on the first step [N].
        chunk_size: at most this many (batch, time) rows are upcast at once (default 256).
    Returns:
        (b, t) float32 (float64 for float64 logits): ``gathered_logit - logsumexp(logits)``.
        Differentiable w.r.t. ``logits``; the gradient has the logits' dtype.
    """
    return _ChunkedLogprobs.apply(logits, tokens, temperature, chunk_size)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0,
                        chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits / temperature) = ``logsumexp(z) - sum(softmax(z) * z)``.

    Args: logits (b, t, v); temperature and chunk_size as in :func:`logprobs_from_logits`.
    Returns: (b, t) float32. Meant for logging under ``torch.no_grad()``: with grad enabled,
    autograd keeps every float32 chunk alive for the backward pass.
    """
    b, t, _ = logits.shape
    out = logits.new_empty((b, t), dtype=torch.promote_types(logits.dtype, torch.float32))
    for sl in _chunks(b, t, chunk_size):
        z = _scaled(logits[sl], temperature)
        out[sl] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out


# ---------------------------------------------------------------------------- masked stats
def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is nonzero (over ``dim``, or all entries)."""
    x = torch.where(mask.bool(), values, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the masked entries (over ``dim``, or all). An empty mask gives 0, not nan."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """0-dim variance over all masked entries; 0 when there are too few of them."""
    mask = mask.bool()
    n = mask.sum()
    centered = values - masked_mean(values, mask)
    return masked_sum(centered.square(), mask) / (n - 1 if unbiased else n).clamp(min=1)


def _sum_over_ranks(x: Tensor, all_reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    out = None if all_reduce is None else all_reduce(x)
    return x if out is None else out  # None: no reduce, or torch.distributed's in-place one


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True,
                  all_reduce: Callable[[Tensor], Tensor] | None = None,
                  eps: float = 1e-8) -> Tensor:
    """Normalise (b, t) ``values`` to mean 0, unbiased variance 1 over the masked entries.

    Args:
        shift_mean: if False the mean is added back (rescale only).
        all_reduce: sums a tensor over all DDP ranks, returning the sum (e.g. ``lambda x:
            strategy.reduce(x, reduce_op="sum")``) or in place (``torch.distributed.all_reduce``).
            When given, the statistics cover the masked entries of every rank. It is called
            exactly twice on every rank: on (sum, count), then on the sum of squared deviations
            from the global mean (two passes avoid sum-of-squares cancellation).
    Returns:
        (b, t), 0 at masked positions.
    """
    mask = mask.bool()
    dtype = torch.promote_types(values.dtype, torch.float32)
    x = torch.where(mask, values, 0.0).to(dtype)
    sums = _sum_over_ranks(torch.stack([x.sum(), mask.sum().to(dtype)]), all_reduce)
    mean = sums[0] / sums[1].clamp(min=1)
    sq_dev = _sum_over_ranks(torch.where(mask, (x - mean).square(), 0.0).sum(), all_reduce)
    whitened = (x - mean) * torch.rsqrt(sq_dev / (sums[1] - 1).clamp(min=1) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(values.dtype)


# ------------------------------------------------------------------------------- sequences
#: The ids that end a response: the tokenizer's EOS and, for a chat model, its end-of-turn token
#: (``rlhf_lightning/stop_tokens.py``, :func:`~rlhf_lightning.stop_tokens.stop_token_ids`). The
#: functions below say "EOS" for any of them.
StopIds = int | Sequence[int] | Tensor


def _is_stop(tokens: Tensor, stop_ids: StopIds) -> Tensor:
    """Where ``tokens`` hold any of ``stop_ids`` (same shape, bool)."""
    return torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device).reshape(-1))


def first_eos_mask(response_tokens: Tensor, stop_ids: StopIds, pad_token_id: int | None = None) -> Tensor:
    """(b, t) bool: True up to and including the first stop token, False after it.

    ``stop_ids``: the id, or ids, that end a response (EOS, a chat model's end-of-turn token;
    see :func:`rlhf_lightning.stop_tokens.stop_token_ids`). With ``pad_token_id`` (unless it is
    itself a stop id) a response also ends just before its first pad token. The result is
    always a prefix mask.
    """
    is_stop = _is_stop(response_tokens, stop_ids)
    keep = torch.cumsum(is_stop, dim=-1) - is_stop.long() == 0  # no stop token strictly before
    if pad_token_id is not None and not _is_stop(torch.tensor(pad_token_id), stop_ids):
        keep &= torch.cumsum(response_tokens == pad_token_id, dim=-1) == 0
    return keep


def has_eos(response_tokens: Tensor, stop_ids: StopIds) -> Tensor:
    """(b,) bool: whether each (b, t) response contains any of ``stop_ids`` (it ended, rather
    than ran out of tokens). ``stop_ids``: the id, or ids, that end a response (EOS, a chat
    model's end-of-turn token; see :func:`rlhf_lightning.stop_tokens.stop_token_ids`)."""
    return _is_stop(response_tokens, stop_ids).any(dim=-1)


def last_token_index(mask: Tensor) -> Tensor:
    """(b,) int64 index of the last nonzero entry of each (b, t) row; 0 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(-1).clamp(min=0)


# --------------------------------------------------------------------------------- rewards
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """(b, t) per-token estimates of KL(pi || pi_ref) from tokens sampled from pi [KL].

    With ``log_ratio = logprobs - ref_logprobs`` and ``r = exp(-log_ratio)``:
    k1 = log_ratio (unbiased, can be < 0); k2 = 0.5 * log_ratio^2 (biased, >= 0);
    k3 = (r - 1) - log r (unbiased, >= 0).

    k3 with grad through ``logprobs`` is also GRPO's KL term in the loss [GRPO] (eq. 4:
    ``pi_ref / pi - log(pi_ref / pi) - 1``); reduce it with :func:`reduce_token_losses`.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, accurate near r = 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def shape_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                  kl_coef: float, estimator: str = "k1") -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards of [Z19]: ``-kl_coef * kl_t`` at every real token, + score at the end.

    Args:
        scores: (b,) reward-model scores, added at the last real token of each row.
        logprobs, ref_logprobs, mask: (b, t) from the rollout policy and the reference model.
    Returns:
        rewards, kl, non_score_reward: each (b, t), 0 at masked positions.
    """
    mask = mask.bool()
    kl = kl_penalty(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0),
                    estimator)
    kl = torch.where(mask, kl, 0.0)
    non_score_reward = -kl_coef * kl
    last = last_token_index(mask).unsqueeze(-1)
    rewards = non_score_reward.scatter_add(-1, last, scores.to(kl.dtype).unsqueeze(-1))
    return torch.where(mask, rewards, 0.0), kl, non_score_reward


def _score_groups(scores: Tensor, group_size: int) -> Tensor:
    """(num_prompts, group_size) view of (b,) ``scores`` whose consecutive rows answer one prompt."""
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores cannot be split into groups of {group_size}")
    return scores.view(-1, group_size)


def leave_one_out_scores(scores: Tensor, group_size: int) -> Tensor:
    """Scores minus the mean of the *other* responses to the same prompt (RLOO's baseline [K19]).

    Args:
        scores: (b,) with ``b = num_prompts * group_size``; rows ``i*group_size .. (i+1)*group_size-1``
            answer the same prompt.
    Returns:
        (b,) ``s_i - mean_{j != i} s_j`` over each group; ``scores`` itself when ``group_size`` is 1.

    The baseline of a response never depends on that response, so subtracting it leaves the
    policy gradient unbiased, and it removes what a prompt alone contributes to the score (an
    easy prompt scores high whatever the answer), which a critic learns only slowly.
    """
    if group_size == 1:
        return scores
    groups = _score_groups(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def apply_missing_eos_penalty(scores: Tensor, contains_eos: Tensor, penalty: float | None,
                              mode: str = "replace") -> Tensor:
    """Penalise the (b,) ``scores`` of responses without EOS (``contains_eos``: (b,) bool, whether
    each ended with a stop id, :func:`has_eos`) [N].

    "replace": score = penalty; "subtract": score - penalty; ``penalty=None``: unchanged.
    Returns a new tensor (``scores`` itself when unchanged).
    """
    if mode not in ("replace", "subtract"):
        raise ValueError(f"unknown missing-EOS penalty mode {mode!r}; "
                         "expected 'replace' or 'subtract'")
    if penalty is None:
        return scores
    penalised = torch.full_like(scores, penalty) if mode == "replace" else scores - penalty
    return torch.where(contains_eos.bool(), scores, penalised)


def ensemble_spread(member_scores: Tensor) -> Tensor:
    """How much the members of a reward-model ensemble disagree on each response: the standard
    deviation of their scores, over the members, population form (divided by ``m``, not
    ``m - 1``; ``correction=0``), so one member gives 0.

    Args:
        member_scores: (m, b) the score of each of ``m`` members for each of ``b`` responses.
    Returns:
        (b,) the members' std per response.
    """
    return member_scores.std(dim=0, correction=0)


def ensemble_score(member_scores: Tensor, penalty: float = 0.0) -> Tensor:
    """A reward-model ensemble's score, penalised by its uncertainty [C23, E23]:
    ``mean_i s_i - penalty * std_i s_i`` over the members (the std of :func:`ensemble_spread`).

    A response the members disagree on scores lower, so the policy gains less from what only
    some reward models like (over-optimisation of one model's errors); ``penalty=0`` is the
    plain mean of the members.

    Args:
        member_scores: (m, b) the score of each of ``m`` members for each of ``b`` responses.
        penalty: ``k`` >= 0, the weight of the spread.
    Returns:
        (b,) one score per response.
    """
    return member_scores.mean(dim=0) - penalty * ensemble_spread(member_scores)


# ------------------------------------------------------------------ critic-free advantages
# RLOO's advantage [K19] is :func:`leave_one_out_scores`.
def grpo_advantages(scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage [GRPO]: each score minus its group's mean, over the group's std.

    ``A_i = (s_i - mean_g s) / (std_g s + eps)``, with the unbiased (n - 1) std and ``eps`` added
    to the std, as TRL's ``GRPOTrainer``; a group whose scores are all equal gets 0.
    ``scale_by_std=False`` gives ``s_i - mean_g s``: Dr. GRPO [DrGRPO], which also drops the
    per-response length normalisation of the loss (:func:`reduce_token_losses` ``"constant"``).

    Args:
        scores: (b,) with ``b = num_prompts * group_size``; rows ``i*group_size .. (i+1)*group_size-1``
            answer the same prompt (as in :func:`leave_one_out_scores`).
        group_size: responses per prompt, >= 2.
    Returns:
        (b,) one advantage per response, given to each of its tokens.
    """
    if group_size < 2:
        raise ValueError(f"GRPO compares the responses to one prompt: group_size must be >= 2, got {group_size}")
    groups = _score_groups(scores, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0,
                            all_reduce: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ advantages [R++]: the return-to-go of the per-token rewards, whitened over the
    whole batch (no critic, no group).

    ``G_t = sum_{t' >= t} gamma^(t' - t) r_t'``, then ``A = (G - mean G) / std G`` over every real
    token of the batch (of every rank with ``all_reduce``, see :func:`masked_whiten`). ``rewards``
    hold the KL: they are :func:`shape_rewards`' ``-kl_coef * kl_t`` per token plus the score at
    the last one. REINFORCE++-baseline subtracts the group mean from the scores before shaping
    (``grpo_advantages(scores, group_size, scale_by_std=False)``).

    Follows OpenRLHF (``advantage_estimator="reinforce"`` in ``ppo_utils/experience_maker.py``:
    ``compute_reward``, ``get_cumulative_returns``, then one mean and std over the action tokens
    of all experiences), except that the std is the package's :func:`masked_whiten` one (unbiased,
    ``eps`` under the root) where OpenRLHF divides by the token count: a factor sqrt(n / (n - 1)).

    Args: rewards, mask: (b, t). Returns: (b, t), 0 at padding.
    """
    # GAE with V = 0 and lam = 1 is the discounted return-to-go.
    returns_to_go, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return masked_whiten(returns_to_go, mask, all_reduce=all_reduce, eps=eps)


# ---------------------------------------------------------------------------------- losses
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation [GAE], backwards over time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``; the
    value and advantage after the last real token are 0 (the episode ends there).
    Args: rewards, values, mask: (b, t).
    Returns: advantages, returns = advantages + values; each (b, t), 0 at masked positions.
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)
    rewards = torch.where(mask, rewards.to(values.dtype), 0.0)
    next_value = next_adv = torch.zeros_like(values[..., 0])
    advantages = []
    for i in reversed(range(values.shape[-1])):
        delta = rewards[..., i] + gamma * next_value - values[..., i]
        next_adv = torch.where(mask[..., i], delta + gamma * lam * next_adv, 0.0)
        next_value = values[..., i]
        advantages.append(next_adv)
    adv = torch.stack(advantages[::-1], dim=-1)
    return adv, adv + values


@dataclass
class PolicyLossStats:
    """0-dim detached tensors, all masked means over real tokens."""

    clipfrac: Tensor  # fraction of tokens where the clipped term is the (strictly) larger
    approxkl: Tensor  # 0.5 * mean((logp - old_logp)^2), as TRL
    ratio_mean: Tensor
    ratio_var: Tensor  # population (biased) variance


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float = 0.2, reduction: str = "token_mean",
                max_length: int | None = None) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate [PPO]: max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) per token, reduced
    with :func:`reduce_token_losses` (``reduction``, ``max_length``; default: the masked mean).

    Args: logprobs (b, t), with grad; old_logprobs, advantages, mask (b, t) from the rollout.
    Returns: 0-dim loss and :class:`PolicyLossStats` (token means whatever the reduction).
    """
    mask = mask.bool()
    adv = torch.where(mask, advantages, 0.0)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = reduce_token_losses(torch.maximum(pg_losses, pg_losses_clipped), mask, reduction, max_length)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            approxkl=0.5 * masked_mean(log_ratio.square(), mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_var=masked_var(ratio, mask, unbiased=False),
        )
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float = 0.2) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)).

    Args: values (b, t), with grad; old_values, returns, mask (b, t) from the rollout.
    Returns: 0-dim loss and 0-dim clipfrac (fraction where the clipped term is larger).
    """
    mask = mask.bool()
    values, old_values, returns = (torch.where(mask, x, 0.0) for x in (values, old_values, returns))
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask).detach()
    return loss, clipfrac


def reduce_token_losses(values: Tensor, mask: Tensor, reduction: str = "token_mean",
                        max_length: int | None = None) -> Tensor:
    """0-dim loss from per-token losses ``values`` (b, t) (a policy loss, GRPO's k3 KL term).

    * ``sequence_mean``: the mean over each response's tokens, then over responses (GRPO [GRPO]
      eq. 3, ``1/G sum_i 1/|o_i| sum_t``): a token of a short response weighs more.
    * ``token_mean``: the mean over every real token of the batch (the default of :func:`policy_loss`).
    * ``constant``: the sum over real tokens divided by ``b * max_length`` (Dr. GRPO [DrGRPO]: no
      per-response length normalisation); ``max_length`` defaults to ``t``. Pass the generation
      budget (``max_new_tokens``) to make the normaliser the same in every batch.
    """
    if reduction == "sequence_mean":
        return masked_mean(values, mask, dim=-1).mean()
    if reduction == "token_mean":
        return masked_mean(values, mask)
    if reduction == "constant":
        return masked_sum(values, mask) / (values.shape[0] * (max_length or values.shape[-1]))
    raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {LOSS_REDUCTIONS}")


def dpo_sequence_logps(token_logps: Tensor, mask: Tensor, loss_type: str = "sigmoid") -> Tensor:
    """(b,) ``log pi(y | x)`` of each response from its (b, t) token log-probs: the sum over the
    response tokens in ``mask``, or their mean for ``ipo`` (as TRL, which averages IPO's log-probs
    over the response length)."""
    return masked_mean(token_logps, mask, dim=-1) if loss_type == "ipo" else masked_sum(token_logps, mask, dim=-1)


def dpo_implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """(b,) float32 implicit rewards ``beta * (log pi(y | x) - log pi_ref(y | x))`` of responses from
    their sequence log-probs (:func:`dpo_sequence_logps`) under the DPO policy and its reference
    (Rafailov et al. 2023: the reward a DPO policy is optimal for, up to a function of ``x``)."""
    return beta * (policy_logps.float() - ref_logps.float())


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss of ``b`` preference pairs and their implicit rewards, with TRL's definitions.

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (sequence log-probs, see
    :func:`dpo_sequence_logps`) and ``eps = label_smoothing``, the per-pair loss is

    * ``sigmoid``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` ([DPO]; with
      ``eps > 0`` conservative DPO [cDPO]: each label is taken as flipped with probability eps);
    * ``robust``: ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``
      ([rDPO]: an unbiased estimate of the clean-label loss, eps < 0.5);
    * ``ipo``: ``(h - 1 / (2 beta))^2`` ([IPO] eq. 17, beta is IPO's tau; eps is not used).

    Both sigmoid forms are ``log 2`` when the policy equals the reference (``h = 0``).

    Args: the four log-probs (b,); beta > 0.
    Returns:
        loss: 0-dim float32 mean over pairs.
        chosen_rewards, rejected_rewards: (b,) detached implicit rewards (:func:`dpo_implicit_reward`).
    """
    pi_c, pi_r, ref_c, ref_r = (x.float() for x in (policy_chosen_logps, policy_rejected_logps,
                                                    ref_chosen_logps, ref_rejected_logps))
    h = (pi_c - pi_r) - (ref_c - ref_r)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    chosen_rewards, rejected_rewards = dpo_implicit_reward(pi_c, ref_c, beta), dpo_implicit_reward(pi_r, ref_r, beta)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


# --------------------------------------------------------------------------- reward model
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



def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """0-dim ``1 - var(returns - values) / var(returns)`` over the masked entries.

    1 = perfect value predictions, <= 0 = no better than a constant; nan if var(returns) = 0.
    """
    var_returns = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns == 0, float("nan"), ev)


# -------------------------------------------------------------------------- KL controllers
class KLController:
    """Holds the KL coefficient ``value``; subclasses change it in :meth:`update`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Called once per rollout batch; a no-op here."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.value = float(state_dict["value"])


class FixedKLController(KLController):
    """Constant KL coefficient ``value = kl_coef``."""


class AdaptiveKLController(KLController):
    """Adaptive KL coefficient of [Z19] (section 2.2), steering the KL towards ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    Only ``value`` is state; ``target`` and ``horizon`` are hyperparameters.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean per-sequence KL (summed over tokens) of the rollout batch;
        n_steps: number of sequences (episodes) in that batch."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def kl_controller(coef: float, target: float | None = None, horizon: float = 10000) -> KLController:
    """The adaptive controller of [Z19] when ``target`` is set, else a fixed ``coef``."""
    return FixedKLController(coef) if target is None else AdaptiveKLController(coef, target, horizon)
