"""One round of PPO experience: generate, score, and turn scores into advantages.

:class:`RolloutLoop` owns the data flow of a rollout and nothing else; the math is in
:mod:`rlhf_lightning.rlhf_math`, the reward comes from any callable, and no LightningModule is
imported here, so a rollout can be run and tested on its own::

    prompts --generate--> responses (cut after the first stop token: EOS, a chat model's end of turn)
            --no-grad forwards--> policy logprobs, reference logprobs, critic values
            --score_fn--> scores --shape_rewards--> per-token rewards --estimator--> advantages

The estimator is GAE with a critic (``gae``), or one of the critic-free ones (``reinforce_pp``,
``rloo``, ``grpo``, ``dr_grpo``); :meth:`RolloutLoop.estimate_advantages` chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import rlhf_math as pm
from .forwards import response_logprobs, token_values
from .generation import GenerationSettings, Responses, sample
from .ppo_settings import ADVANTAGE_ESTIMATORS, KLSettings, PPOSettings, ScoreSettings


ScoreFn = Callable[[Responses], Tensor]


@dataclass
class RolloutBatch:
    """A batch of experience; every ``(b, r)`` tensor is aligned with ``response_ids``.

    ``logprobs``/``values`` are the policy's and critic's at rollout time (the "old" ones of
    the PPO ratio), ``scores`` ``(b,)`` the reward after the missing-EOS rule, ``contains_eos``
    ``(b,)`` whether each response ended with a stop token (EOS, or a chat model's end-of-turn
    token: the sampling model's stop ids, ``rlhf_lightning/stop_tokens.py``) rather than ran out
    of ``max_new_tokens`` (:func:`~rlhf_lightning.rlhf_math.has_eos`), ``rewards`` the
    shaped per-token rewards, ``advantages`` those of the loop's estimator (whitened GAE by
    default). Without a critic ``values`` and ``returns`` are zeros.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    contains_eos: Tensor
    kl: Tensor
    non_score_reward: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def nonfinite_fields(self) -> list[str]:
        """Names of the floating-point tensors that hold NaN or inf (empty when all are finite)."""
        return [
            f.name for f in fields(self)
            if getattr(self, f.name).is_floating_point() and not torch.isfinite(getattr(self, f.name)).all()
        ]

    def select(self, index: Tensor) -> RolloutBatch:
        """The rows ``index`` of every tensor (a minibatch)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    input_ids = Responses.input_ids
    attention_mask = Responses.attention_mask


@dataclass
class RolloutLoop:
    """Makes a :class:`RolloutBatch` from a batch of left-padded prompts.

    Args:
        policy, reference, critic: the three models that see the policy's tokens (``critic``
            None for a critic-free estimator: the values are then zeros).
        score_fn: ``Responses -> (b,)`` scores (a reward model, a Python rule, a subclass hook).
        tokenizer: the policy's tokenizer (EOS, pad, decoding).
        generation: sampling settings.
        kl_estimator: ``k1`` (default), ``k2`` or ``k3`` for the per-token KL penalty.
        gamma, lam: GAE discount and trace decay (``gamma`` also discounts the returns-to-go
            of ``reinforce_pp`` and ``rloo``).
        missing_eos_penalty, missing_eos_mode: what happens to the score of a response that
            never emitted a stop token (EOS, or any other id of the policy's
            :func:`~rlhf_lightning.stop_tokens.stop_token_ids`, such as a chat model's
            ``<|im_end|>``): ``replace`` it, or ``subtract`` the penalty; None: nothing.
        score_clip: clip scores to ``[-score_clip, score_clip]`` (None: no clipping).
        group_size: consecutive rows that answer the same prompt (the PPO module repeats each
            prompt ``ppo.samples_per_prompt`` times).
        score_baseline: ``none``, or ``leave_one_out``: each score minus the mean score of the
            other responses in its group before shaping
            (:func:`~rlhf_lightning.rlhf_math.leave_one_out_scores`); ``RolloutBatch.scores``
            keeps the raw scores.
        advantage_estimator: one of :data:`ADVANTAGE_ESTIMATORS` (see :meth:`estimate_advantages`).
        forward_batch_size: rows per no-grad forward, to bound memory on large batches.
        all_reduce: sums a tensor over processes (DDP), used to whiten advantages globally.
    """

    policy: PreTrainedModel
    reference: PreTrainedModel
    critic: PreTrainedModel | None
    score_fn: ScoreFn
    tokenizer: PreTrainedTokenizerBase
    generation: GenerationSettings
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float | None = None
    missing_eos_mode: str = "replace"
    score_clip: float | None = None
    group_size: int = 1
    score_baseline: str = "none"
    advantage_estimator: str = "gae"
    forward_batch_size: int = 8
    all_reduce: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def from_settings(
        cls, policy: PreTrainedModel, reference: PreTrainedModel, critic: PreTrainedModel | None, score_fn: ScoreFn,
        tokenizer: PreTrainedTokenizerBase, generation: GenerationSettings, ppo: PPOSettings, kl: KLSettings,
        scores: ScoreSettings, **options: Any,
    ) -> RolloutLoop:
        """A loop configured by the PPO module's settings; ``options``: the other fields
        (``forward_batch_size``, ``all_reduce``)."""
        return cls(
            policy=policy, reference=reference, critic=critic, score_fn=score_fn, tokenizer=tokenizer, generation=generation,
            kl_estimator=kl.estimator, gamma=ppo.gamma, lam=ppo.lam, missing_eos_penalty=scores.missing_eos_penalty,
            missing_eos_mode=scores.missing_eos_mode, score_clip=scores.clip, group_size=ppo.samples_per_prompt,
            score_baseline=scores.baseline, advantage_estimator=ppo.advantage_estimator, **options,
        )

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Responses:
        """Sample one response per prompt from the policy (:func:`~rlhf_lightning.generation.sample`;
        on a sharded policy transformers keeps the ranks' forwards in step:
        :func:`~rlhf_lightning.sharding.shard_model`)."""
        return sample(self.policy, self.tokenizer, self.generation, prompt_ids, prompt_mask)

    @torch.no_grad()
    def forward_statistics(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> tuple[Tensor, Tensor, Tensor]:
        """Policy log-probs, reference log-probs and critic values (zeros without a critic),
        ``(b, r)`` each, in chunks."""
        temperature = self.generation.temperature
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for start in range(0, input_ids.shape[0], self.forward_batch_size):
            ids = input_ids[start : start + self.forward_batch_size]
            mask = attention_mask[start : start + self.forward_batch_size]
            logprobs, _ = response_logprobs(self.policy, ids, mask, response_length, temperature)
            ref_logprobs, _ = response_logprobs(self.reference, ids, mask, response_length, temperature)
            if self.critic is None:
                values = torch.zeros_like(logprobs)
            else:
                values = token_values(self.critic, ids, mask, response_length)
            parts.append((logprobs, ref_logprobs, values))
        logprobs, ref_logprobs, values = (torch.cat(p) for p in zip(*parts))
        return logprobs, ref_logprobs, values

    def advantages(self, rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Advantages and returns ``(b, r)`` from shaped rewards and critic values.

        GAE by default; override for another estimator with a critic. The advantages are
        whitened afterwards (over all processes); the returns are the critic's regression targets.
        """
        return pm.gae(rewards, values, mask, self.gamma, self.lam)

    def estimate_advantages(self, scores: Tensor, rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The advantages of ``advantage_estimator`` and the returns, ``(b, r)`` each.

        ``scores`` ``(b,)`` and the shaped ``rewards`` are those of :meth:`run` (for ``rloo``
        the scores already lost their leave-one-out mean before shaping).

        * ``gae``: :meth:`advantages`, whitened over the real tokens of all processes.
        * ``reinforce_pp``, ``rloo``: the returns-to-go of ``rewards``, whitened the same way
          (:func:`~rlhf_lightning.rlhf_math.reinforce_pp_advantages`).
        * ``grpo``, ``dr_grpo``: each response's group-normalised score on every one of its
          tokens (:func:`~rlhf_lightning.rlhf_math.grpo_advantages`; ``dr_grpo`` without the
          std), not whitened again, as TRL's ``GRPOTrainer``.

        Without a critic the returns are zeros (nothing regresses on them).
        """
        if self.advantage_estimator == "gae":
            advantages, returns = self.advantages(rewards, values, mask)
            return pm.masked_whiten(advantages, mask, all_reduce=self.all_reduce), returns
        if self.advantage_estimator in ("reinforce_pp", "rloo"):
            advantages = pm.reinforce_pp_advantages(rewards, mask, self.gamma, all_reduce=self.all_reduce)
        elif self.advantage_estimator in ("grpo", "dr_grpo"):
            outcome = pm.grpo_advantages(scores, self.group_size, scale_by_std=self.advantage_estimator == "grpo")
            advantages = torch.where(mask.bool(), outcome.unsqueeze(-1), 0.0)
        else:
            raise ValueError(f"unknown advantage estimator {self.advantage_estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
        return advantages, torch.zeros_like(advantages)

    def run(self, prompt_ids: Tensor, prompt_mask: Tensor, kl_coef: float) -> RolloutBatch:
        """One rollout on left-padded ``prompt_ids`` ``(b, p)`` with KL coefficient ``kl_coef``."""
        responses = self.generate(prompt_ids, prompt_mask)
        response_ids, response_mask = responses.response_ids, responses.response_mask
        logprobs, ref_logprobs, values = (
            x.masked_fill(~response_mask, 0.0)
            for x in self.forward_statistics(responses.input_ids, responses.attention_mask, response_ids.shape[1])
        )
        with torch.no_grad():
            scores = self.score_fn(responses).to(logprobs.device, torch.float32)
        if scores.shape != (len(responses.completions),):
            raise ValueError(f"a reward source must return one score per response, got shape {tuple(scores.shape)}")
        contains_eos = pm.has_eos(response_ids, responses.stop_ids)
        scores = pm.apply_missing_eos_penalty(scores, contains_eos, self.missing_eos_penalty, self.missing_eos_mode)
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)

        leave_one_out = self.score_baseline == "leave_one_out" or self.advantage_estimator == "rloo"
        shaped_scores = pm.leave_one_out_scores(scores, self.group_size) if leave_one_out else scores
        rewards, kl, non_score_reward = pm.shape_rewards(
            shaped_scores, logprobs, ref_logprobs, response_mask, kl_coef, self.kl_estimator
        )
        advantages, returns = self.estimate_advantages(shaped_scores, rewards, values, response_mask)
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
            logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores, contains_eos=contains_eos,
            kl=kl, non_score_reward=non_score_reward, rewards=rewards, advantages=advantages, returns=returns,
        )


def rollout_statistics(rollout: RolloutBatch, kl_coef: float, with_critic: bool) -> dict[str, Tensor]:
    """Per-iteration statistics of the experience, named as in TRL (``val/explained_variance``
    only ``with_critic``). ``val/num_eos_tokens`` counts the responses that ended with a stop
    token (``contains_eos``: EOS or a chat model's end-of-turn token; a response holds one at
    most, what followed it is padding)."""
    mask = rollout.response_mask
    kl_sum = pm.masked_sum(rollout.kl, mask, dim=1)
    non_score = pm.masked_sum(rollout.non_score_reward, mask, dim=1)
    stats = {
        "objective/kl": kl_sum.mean(),
        "objective/entropy": pm.masked_sum(-rollout.logprobs, mask, dim=1).mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (rollout.scores + non_score).mean(),
        "objective/scores": rollout.scores.mean(),
        "objective/kl_coef": torch.tensor(kl_coef),
        "val/num_eos_tokens": rollout.contains_eos.sum().float(),
        "val/response_length": mask.sum(1).float().mean(),
        "val/no_eos_rate": (~rollout.contains_eos).float().mean(),
    }
    if with_critic:
        stats["val/explained_variance"] = pm.explained_variance(rollout.values, rollout.returns, mask)
    return stats

