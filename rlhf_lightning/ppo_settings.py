"""PPO's hyperparameters, read like a paper's table: each field is documented here (and shown by
``rlhf-lightning fit --model.help rlhf_lightning.modules.PPOModule``), and
:func:`check_ppo_settings` refuses an invalid value naming its config key when the module is
built, before any model loads.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from . import rlhf_math as pm
from .errors import UserInputError, check_minimum
from .generation import GenerationSettings
from .lora import LoRASettings, check_lora_critic, check_reference

#: ``advantage_estimator`` values; the last three compare the responses to one prompt (a group).
ADVANTAGE_ESTIMATORS = ("gae", "reinforce_pp", "rloo", "grpo", "dr_grpo")
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo")
SCORE_BASELINES = ("none", "leave_one_out")


@dataclass
class PPOSettings:
    """The PPO update. One iteration samples ``batch_size * samples_per_prompt`` responses and
    makes ``epochs * num_minibatches`` optimiser steps on them.

    Args:
        advantage_estimator: ``gae`` (with a critic), or critic-free ``reinforce_pp``, ``rloo``,
            ``grpo``, ``dr_grpo`` (see ``RolloutLoop.estimate_advantages``).
        samples_per_prompt: responses sampled per prompt, in consecutive rows (>= 2 for
            ``rloo``, ``grpo``, ``dr_grpo`` and ``scores.baseline: leave_one_out``).
        loss_reduction: ``sequence_mean``, ``token_mean`` or ``constant`` (``rlhf_math.
            reduce_token_losses``); null: the estimator's own (``constant`` for ``dr_grpo``,
            ``token_mean`` otherwise).
        epochs: passes over each rollout (>= 1).
        num_minibatches: optimiser steps per epoch (>= 1); the rollout's rows must divide by
            ``num_minibatches * gradient_accumulation_steps``.
        gradient_accumulation_steps: micro-batches whose gradients make one optimiser step (>= 1).
        cliprange: epsilon of the clipped policy ratio ``[1 - eps, 1 + eps]`` (>= 0).
        cliprange_value: how far a new value may move from the rollout's value (>= 0).
        vf_coef: weight of the value loss in the total loss.
        entropy_coef: weight of the entropy bonus (0: the entropy is only logged).
        max_grad_norm: the gradient norm is clipped to this before each optimiser step
            (``health/grad_norm`` logs the norm before clipping).
        gamma: discount of future rewards (1.0: none, as in RLHF practice).
        lam: GAE's lambda (bias-variance trade-off of the advantages).
    """

    advantage_estimator: str = "gae"
    samples_per_prompt: int = 1
    loss_reduction: str | None = None
    epochs: int = 4
    num_minibatches: int = 4
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps per PPO iteration."""
        return self.epochs * self.num_minibatches


@dataclass
class KLSettings:
    """The KL penalty to the reference policy.

    Args:
        coef: beta, the KL coefficient (>= 0); the adaptive controller's starting value when
            ``target`` is set.
        estimator: ``k1``, ``k2`` or ``k3`` (Schulman's estimators) for the per-token penalty.
        target: KL per response (nats) that the adaptive controller of Ziegler et al. 2019
            steers towards (null: beta stays ``coef``).
        horizon: the adaptive controller's horizon in responses (>= 1).
        in_loss: ``beta * k3`` in the loss (GRPO) instead of ``-beta * kl_t`` in the reward;
            ``estimator`` then only measures ``objective/kl``.
    """

    coef: float = 0.05
    estimator: str = "k1"
    target: float | None = None
    horizon: int = 10000
    in_loss: bool = False


@dataclass
class ScoreSettings:
    """What happens to the reward source's scores before shaping.

    Args:
        missing_eos_penalty: the score of a response that reached ``max_new_tokens`` without EOS
            (null: no rule).
        missing_eos_mode: ``replace`` the score with the penalty, or ``subtract`` it.
        clip: clip scores to ``[-clip, clip]`` (null: no clipping).
        baseline: ``none``, or ``leave_one_out``: each score minus the mean of the other
            responses to its prompt (needs ``ppo.samples_per_prompt >= 2``).
        ensemble_penalty: ``k`` of a reward-model ensemble (``reward_model`` a list of folders):
            a response scores the members' mean minus ``k`` times their standard deviation
            (population std, ``correction=0``; ``rlhf_math.ensemble_score``, after Coste et al.
            2023 and Eisenstein et al. 2023). 0: the plain mean; > 0 needs two folders or more.
    """

    missing_eos_penalty: float | None = None
    missing_eos_mode: str = "replace"
    clip: float | None = None
    baseline: str = "none"
    ensemble_penalty: float = 0.0


@dataclass
class ImplicitRewardSettings:
    """DPO's implicit reward as PPO's reward source: a response scores ``beta * (log pi_dpo(y|x) -
    log pi_ref(y|x))`` (Rafailov et al. 2023), a reward model that reads a DPO policy's log-ratio
    to its reference. Both models are frozen and must share the policy's tokenizer.

    Args:
        policy: the DPO export folder (``DPOModule``'s ``export_dir``).
        reference: the DPO run's reference (null: PPO's ``policy``, the SFT export DPO started
            from; then PPO's KL reference serves both when it is that same folder).
        beta: DPO's beta (> 0; ``DPOModule``'s default 0.1).
    """

    policy: str
    reference: str | None = None
    beta: float = 0.1


def reward_folders(reward_model: str | list[str] | None) -> list[str]:
    """The reward-model folders of PPO's ``reward_model`` setting: none, one folder, or an
    ensemble's members (a list)."""
    if reward_model is None:
        return []
    return [reward_model] if isinstance(reward_model, str) else list(reward_model)


def check_ppo_settings(
    generation: GenerationSettings,
    ppo: PPOSettings,
    kl: KLSettings,
    scores: ScoreSettings,
    lora: LoRASettings | None,
    *,
    policy: str,
    reference: str | None,
    reward_model: str | list[str] | None,
    max_iterations: int | None,
    forward_batch_size: int,
    reward_batch_size: int,
    critic: str | None = None,
    gradient_checkpointing: bool = False,
    implicit_reward: ImplicitRewardSettings | None = None,
) -> None:
    """Refuse an invalid or inconsistent PPO setting with a :class:`UserInputError` that names its
    ``model.init_args`` key."""
    key = "model.init_args"
    for name, value in (
        ("generation.max_new_tokens", generation.max_new_tokens), ("ppo.epochs", ppo.epochs),
        ("ppo.num_minibatches", ppo.num_minibatches), ("ppo.gradient_accumulation_steps", ppo.gradient_accumulation_steps),
        ("ppo.samples_per_prompt", ppo.samples_per_prompt), ("kl.horizon", kl.horizon), ("max_iterations", max_iterations),
        ("forward_batch_size", forward_batch_size), ("reward_batch_size", reward_batch_size),
    ):
        check_minimum(f"{key}.{name}", value, 1)
    for name, value in (
        ("generation.min_new_tokens", generation.min_new_tokens), ("generation.top_k", generation.top_k),
        ("ppo.cliprange", ppo.cliprange), ("ppo.cliprange_value", ppo.cliprange_value), ("kl.coef", kl.coef),
        ("scores.ensemble_penalty", scores.ensemble_penalty),
    ):
        check_minimum(f"{key}.{name}", value, 0)
    check_minimum(f"{key}.generation.temperature", generation.temperature, 0, inclusive=False)
    check_minimum(f"{key}.generation.top_p", generation.top_p, 0, inclusive=False)
    if implicit_reward is not None:
        check_minimum(f"{key}.implicit_reward.beta", implicit_reward.beta, 0, inclusive=False)
    if generation.top_k > 0 or generation.top_p < 1.0:
        warnings.warn(
            f"{key}.generation.top_k={generation.top_k}, top_p={generation.top_p}: responses are sampled from a "
            "truncated distribution, but PPO's log-probs, ratio and KL are those of the full softmax, so the "
            "update treats the samples as drawn from a distribution they were not; hint: keep top_k 0 and top_p 1.0",
            stacklevel=2,
        )
    for name, value, allowed in (
        ("kl.estimator", kl.estimator, pm.KL_ESTIMATORS), ("scores.baseline", scores.baseline, SCORE_BASELINES),
        ("ppo.advantage_estimator", ppo.advantage_estimator, ADVANTAGE_ESTIMATORS),
        ("ppo.loss_reduction", ppo.loss_reduction, (None, *pm.LOSS_REDUCTIONS)),
    ):
        if value not in allowed:
            raise UserInputError(f"{key}.{name} must be one of {allowed}, got {value!r}")
    estimator = ppo.advantage_estimator
    if ppo.samples_per_prompt < 2 and (estimator in GROUP_ESTIMATORS or scores.baseline == "leave_one_out"):
        raise UserInputError(f"{key}.ppo.samples_per_prompt must be >= 2 to compare the responses to one prompt "
                             f"(ppo.advantage_estimator {estimator}, scores.baseline {scores.baseline}), got {ppo.samples_per_prompt}")
    if estimator in GROUP_ESTIMATORS and scores.baseline != "none":
        raise UserInputError(f"{key}.scores.baseline {scores.baseline} is for ppo.advantage_estimator gae or reinforce_pp: "
                             f"{estimator} has its own baseline; set scores.baseline none")
    if estimator == "dr_grpo" and ppo.loss_reduction not in (None, "constant"):
        raise UserInputError(f"{key}.ppo.advantage_estimator dr_grpo uses the constant loss reduction: "
                             f"leave ppo.loss_reduction unset (got {ppo.loss_reduction})")
    if estimator in ("grpo", "dr_grpo") and not kl.in_loss and kl.coef != 0:
        raise UserInputError(f"{key}.ppo.advantage_estimator {estimator} reads only the scores, so a KL penalty in the "
                             "reward would be ignored: set kl.in_loss true (GRPO's k3 term) or kl.coef 0")
    members = reward_folders(reward_model)
    if reward_model is not None and not members:
        raise UserInputError(f"{key}.reward_model: give a reward-model folder or a list of them, got an empty list")
    if scores.ensemble_penalty > 0 and len(members) < 2:
        raise UserInputError(f"{key}.scores.ensemble_penalty {scores.ensemble_penalty} weighs the disagreement of a "
                             f"reward-model ensemble: give reward_model a list of two folders or more (got "
                             f"{len(members)}), or set scores.ensemble_penalty 0")
    if lora is not None and lora.dropout != 0:
        raise UserInputError(f"{key}.lora.dropout must be 0 for PPO (recomputed log-probs must equal the rollout's), got {lora.dropout}")
    check_reference(lora, reference, policy, f"{key}.reference")
    check_lora_critic(lora, critic, gradient_checkpointing, key)


def loss_reduction(ppo: PPOSettings) -> str:
    """The reduction of ``ppo.loss_reduction``, or the estimator's own when it is unset."""
    return ppo.loss_reduction or ("constant" if ppo.advantage_estimator == "dr_grpo" else "token_mean")


def planned_iterations(max_iterations: int | None, trainer: Any, steps_per_iteration: int) -> int:
    """PPO iterations a fit will run: the least of ``max_iterations`` (the knob for PPO's length),
    the Trainer's ``max_steps`` (optimiser steps) and the prompt batches of its ``max_epochs``.
    Refused when none of them bounds the run."""
    limits = [] if max_iterations is None else [max_iterations]
    if trainer.max_steps > 0:
        limits.append(math.ceil(trainer.max_steps / steps_per_iteration))
    elif math.isfinite(batches := trainer.estimated_stepping_batches):  # manual optimisation: batches = iterations
        limits.append(int(batches))
    if not limits:
        raise UserInputError("model.init_args.max_iterations: set how many PPO iterations to run "
                             "(the Trainer's max_steps and max_epochs do not bound the run either)")
    return max(1, min(limits))

