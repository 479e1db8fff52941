"""Stage 3: PPO against a reward, with a per-token KL penalty to the reference (SFT) policy.

One ``training_step`` is one PPO iteration: a rollout on the batch of prompts
(:class:`~rlhf_lightning.rollout.RolloutLoop`), then ``ppo.epochs`` passes of shuffled
minibatches with manual optimisation. ``trainer.global_step`` therefore counts optimiser steps
(``epochs * num_minibatches`` per iteration); ``max_iterations`` counts iterations.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import ppo_math as pm
from ..checkpoint_io import drop_frozen_weights, restore_frozen_weights
from ..errors import UserInputError, check_minimum
from ..evaluation import JudgeFn, judge_pairs, sample_responses, sequence_kl
from ..guards import NONFINITE_STEPS, default_guards
from ..lora import AdapterDisabled, LoRASettings, add_adapter
from ..models import load_causal_lm, load_reward_model, load_sequence_scorer, load_tokenizer
from ..optim import warmup_schedule
from ..rewards import CallableScorer, RewardModelScorer, TextRewardFn, same_tokenizer
from ..rollout import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    GenerationSettings,
    Responses,
    RolloutBatch,
    RolloutLoop,
    response_logprobs,
    token_values,
)
from ..terminal import (
    MANUAL_OPTIMISATION_CHECKPOINT,
    eval_mode_rule,
    ignore_warnings,
    restore_warnings,
    spearman_corrcoef,
)
from ..text_logging import log_text_samples
from .export import ExportingModule, export_at_fit_end


@dataclass
class PPOSettings:
    """The PPO update. ``num_minibatches`` optimiser steps per epoch, each accumulated over
    ``gradient_accumulation_steps`` micro-batches. Each prompt of a batch is sampled
    ``samples_per_prompt`` times (the rollout has ``batch_size * samples_per_prompt`` rows).

    ``advantage_estimator``: ``gae`` (with a critic), or critic-free ``reinforce_pp``, ``rloo``,
    ``grpo``, ``dr_grpo`` (:meth:`RolloutLoop.estimate_advantages`). ``loss_reduction`` turns the
    per-token policy loss (and the k3 term of ``kl.in_loss``) into one number
    (:func:`~rlhf_lightning.ppo_math.reduce_token_losses`); None: the estimator's own (``constant``
    for ``dr_grpo``, which refuses any other, ``token_mean`` for the rest).
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


@dataclass
class KLSettings:
    """KL penalty ``beta``: fixed at ``coef``, or adaptive (Ziegler et al. 2019) when ``target``
    (nats per response) is set. ``in_loss``: ``beta * k3`` in the loss (GRPO) instead of
    ``-beta * kl_t`` in the reward; ``estimator`` then only measures ``objective/kl``."""

    coef: float = 0.05
    estimator: str = "k1"
    target: float | None = None
    horizon: int = 10000
    in_loss: bool = False


@dataclass
class ScoreSettings:
    """What happens to raw scores before shaping."""

    missing_eos_penalty: float | None = None
    missing_eos_mode: str = "replace"
    clip: float | None = None
    baseline: str = "none"


def check_ppo_minimums(
    generation: GenerationSettings, ppo: PPOSettings, kl: KLSettings, max_iterations: int | None,
    forward_batch_size: int, reward_batch_size: int,
) -> None:
    """Refuse a PPO count or coefficient below its lower bound, naming its ``model.init_args`` key,
    when the module is built (before any model loads)."""
    key = "model.init_args"
    for name, value in (
        ("generation.max_new_tokens", generation.max_new_tokens), ("ppo.epochs", ppo.epochs),
        ("ppo.num_minibatches", ppo.num_minibatches), ("ppo.gradient_accumulation_steps", ppo.gradient_accumulation_steps),
        ("kl.horizon", kl.horizon), ("max_iterations", max_iterations), ("forward_batch_size", forward_batch_size),
        ("reward_batch_size", reward_batch_size),
    ):
        check_minimum(f"{key}.{name}", value, 1)
    for name, value in (
        ("generation.min_new_tokens", generation.min_new_tokens), ("generation.top_k", generation.top_k),
        ("ppo.cliprange", ppo.cliprange), ("ppo.cliprange_value", ppo.cliprange_value), ("kl.coef", kl.coef),
    ):
        check_minimum(f"{key}.{name}", value, 0)
    check_minimum(f"{key}.generation.temperature", generation.temperature, 0, inclusive=False)
    check_minimum(f"{key}.generation.top_p", generation.top_p, 0, inclusive=False)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types that ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor:
    """The L2 norm of all gradients the optimiser would apply (after clipping); 0 under a
    strategy that keeps gradients off the parameters (DeepSpeed), where no step is skipped."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class PPOModule(ExportingModule):
    """PPO with a policy, a frozen reference, a reward source and a critic (the critic only with
    the default ``ppo.advantage_estimator: gae``; the critic-free estimators have none).

    Args:
        policy: the policy to train (usually the SFT export folder).
        reference: the frozen reference policy of the KL penalty (default: ``policy``).
        lora: train a LoRA adapter on the policy instead of all its weights (needs the ``lora``
            extra, ``peft``; ``dropout`` must be 0). The reference is then the policy's own base
            model with the adapter disabled (one copy of the base weights), the critic stays a
            separate model, and ``policy_export_dir`` gets the merged policy
            (:mod:`rlhf_lightning.lora`). None: full fine-tuning.
        reward_model: a reward-model folder (``RewardModule``'s export; a folder without a trained
            score head, such as the SFT export, is refused) ...
        reward_fn: ... or a Python callable ``(prompts, completions) -> scores`` (in YAML: its
            import path, e.g. ``rlhf_lightning.tasks.gold_rewards``).
        critic: the value model's initial weights (default: the reward model when it shares
            the policy's tokenizer, else the policy with a new scalar head). Only ``gae`` has a
            critic: with a critic-free ``ppo.advantage_estimator`` none is built, trained,
            checkpointed or exported (``critic``, ``critic_learning_rate``, ``critic_export_dir``
            and the value settings are not read).
        learning_rate / critic_learning_rate: AdamW (eps 1e-5) learning rates, decayed by
            ``lr_scheduler`` over the run.
        max_iterations: stop after this many PPO iterations (None: the Trainer decides).
        judge: a gold judge ``(prompts, completions) -> scores`` (in YAML: its import path,
            e.g. ``rlhf_lightning.tasks.sentiment.judge``, or your own): validation then also
            reports the judge's score of policy and reference samples, the policy's win rate
            over the reference, the reward's Spearman correlation with the judge on both, and
            validity when the judge has ``is_valid``. Evaluation only, never a training signal.
        health_guards: add the callbacks of :mod:`rlhf_lightning.guards` (non-finite values,
            log-prob drift, negative KL, explained variance, response length) that the Trainer
            does not already have.
        overwrite_export: allow the fit to replace finished models in the export folders (off:
            the fit refuses to start).

    Override :meth:`compute_scores` to compute rewards any other way, and set
    ``rollout_loop_class`` to a :class:`RolloutLoop` subclass to change how a rollout turns
    rewards into advantages.
    """

    rollout_loop_class: type[RolloutLoop] = RolloutLoop

    def __init__(
        self,
        policy: str = "outputs/demo/sft/model",
        reference: str | None = None,
        lora: LoRASettings | None = None,
        reward_model: str | None = None,
        reward_fn: TextRewardFn | None = None,
        critic: str | None = None,
        learning_rate: float = 1e-5,
        critic_learning_rate: float | None = None,
        lr_scheduler: str = "linear",
        generation: GenerationSettings = GenerationSettings(),
        ppo: PPOSettings = PPOSettings(),
        kl: KLSettings = KLSettings(),
        scores: ScoreSettings = ScoreSettings(),
        max_iterations: int | None = None,
        forward_batch_size: int = 16,
        reward_batch_size: int = 64,
        policy_export_dir: str | None = "outputs/ppo/policy",
        critic_export_dir: str | None = "outputs/ppo/critic",
        overwrite_export: bool = False,
        judge: JudgeFn | None = None,
        num_text_samples: int = 4,
        health_guards: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_ppo_minimums(generation, ppo, kl, max_iterations, forward_batch_size, reward_batch_size)
        if kl.estimator not in pm.KL_ESTIMATORS:
            raise UserInputError(f"model.init_args.kl.estimator must be one of {pm.KL_ESTIMATORS}, got {kl.estimator!r}")
        if scores.baseline not in ("none", "leave_one_out"):
            raise UserInputError(f"model.init_args.scores.baseline must be 'none' or 'leave_one_out', got {scores.baseline!r}")
        if ppo.samples_per_prompt < 1 or (scores.baseline == "leave_one_out" and ppo.samples_per_prompt < 2):
            raise UserInputError(f"model.init_args.ppo.samples_per_prompt must be >= 1 (>= 2 with scores.baseline leave_one_out), "
                             f"got {ppo.samples_per_prompt}")
        estimator = ppo.advantage_estimator
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise UserInputError(f"model.init_args.ppo.advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
        if ppo.loss_reduction not in (None, *pm.LOSS_REDUCTIONS):
            raise UserInputError(f"model.init_args.ppo.loss_reduction must be one of {pm.LOSS_REDUCTIONS}, got {ppo.loss_reduction!r}")
        if estimator in GROUP_ESTIMATORS and ppo.samples_per_prompt < 2:
            raise UserInputError(f"model.init_args.ppo.advantage_estimator {estimator} compares the responses to one prompt: "
                             f"ppo.samples_per_prompt must be >= 2, got {ppo.samples_per_prompt}")
        if estimator in GROUP_ESTIMATORS and scores.baseline != "none":
            raise UserInputError(f"model.init_args.scores.baseline {scores.baseline} is for ppo.advantage_estimator gae or reinforce_pp: "
                             f"{estimator} has its own baseline; set scores.baseline none")
        if estimator == "dr_grpo" and ppo.loss_reduction not in (None, "constant"):
            raise UserInputError("model.init_args.ppo.advantage_estimator dr_grpo uses the constant loss reduction: "
                             f"leave ppo.loss_reduction unset (got {ppo.loss_reduction})")
        if estimator in ("grpo", "dr_grpo") and not kl.in_loss and kl.coef != 0:
            raise UserInputError(f"model.init_args.ppo.advantage_estimator {estimator} reads only the scores, so a KL penalty in the "
                             "reward would be ignored: set kl.in_loss true (GRPO's k3 term) or kl.coef 0")
        if lora is not None and lora.dropout != 0:
            raise UserInputError(f"model.init_args.lora.dropout must be 0 for PPO (recomputed log-probs must equal the rollout's), got {lora.dropout}")
        if lora is not None and reference not in (None, policy):
            raise UserInputError("model.init_args.reference: with lora the reference is the policy's base model; leave reference unset")
        self.save_hyperparameters(ignore=["reward_fn", "judge", "generation", "ppo", "kl", "scores", "lora"])
        self.hparams.update(generation=asdict(generation), ppo=asdict(ppo), kl=asdict(kl), scores=asdict(scores),
                            lora=None if lora is None else asdict(lora))
        self.lora = lora
        self.generation, self.ppo, self.kl, self.score_settings = generation, ppo, kl, scores
        self.loss_reduction = ppo.loss_reduction or ("constant" if estimator == "dr_grpo" else "token_mean")
        self.reward_fn = reward_fn
        self.judge = judge
        self.automatic_optimization = False
        self.kl_controller: pm.KLController = (
            pm.AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.target is not None else pm.FixedKLController(kl.coef)
        )
        self.iteration = 0
        self.episode = 0
        self.iteration_stats: dict[str, float] = {}  # the last iteration's statistics (read by guards)
        self.last_nonfinite = ""  # what was non-finite in the last failing iteration
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.policy: PreTrainedModel | None = None
        self.critic: PreTrainedModel | None = None
        self.eval_metrics = torch.nn.ModuleDict()

    # ----------------------------------------------------------------------------- models
    @property
    def needs_critic(self) -> bool:
        """Whether the advantage estimator has a critic (only ``gae``)."""
        return self.ppo.advantage_estimator == "gae"

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.policy)
        return self._tokenizer

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        if (hp.reward_model is None) == (self.reward_fn is None) and type(self).compute_scores is PPOModule.compute_scores:
            raise ValueError("give exactly one of reward_model or reward_fn (or override compute_scores)")
        self.policy = load_causal_lm(hp.policy, self.tokenizer)
        if self.lora is not None:
            self.policy = add_adapter(self.policy, self.lora, "model.init_args.lora")
            self.reference = AdapterDisabled(self.policy)
        else:
            self.reference = self._frozen(load_causal_lm(hp.reference or hp.policy, self.tokenizer))
        self.reward_scorer: Any = None
        critic_source = hp.critic
        if hp.reward_model is not None:
            reward_tokenizer = load_tokenizer(hp.reward_model)
            self.reward_model = self._frozen(load_reward_model(hp.reward_model, reward_tokenizer))
            self.reward_scorer = RewardModelScorer(self.reward_model, reward_tokenizer, self.tokenizer, hp.reward_batch_size)
            if critic_source is None:
                critic_source = hp.reward_model if same_tokenizer(reward_tokenizer, self.tokenizer) else hp.policy
        elif self.reward_fn is not None:
            self.reward_scorer = CallableScorer(self.reward_fn)
        if self.needs_critic:
            self.critic = load_sequence_scorer(critic_source or hp.policy, self.tokenizer, role="critic").train()
        self.policy.train()
        for name in ("score", "ref_score", "kl", "response_length", "eos_rate", "gold_score", "ref_gold_score",
                     "gold_win_rate", "validity", "ref_validity"):
            self.eval_metrics[name] = MeanMetric()
        for name in ("reward_gold_spearman", "ref_reward_gold_spearman"):
            self.eval_metrics[name] = spearman_corrcoef()

    @staticmethod
    def _frozen(model: PreTrainedModel) -> PreTrainedModel:
        model.requires_grad_(False)
        return model.eval()

    def rollout_loop(self) -> RolloutLoop:
        reduce = None
        if self.trainer.world_size > 1:
            reduce = lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")
        return self.rollout_loop_class(
            policy=self.policy, reference=self.reference, critic=self.critic, score_fn=self.compute_scores,
            tokenizer=self.tokenizer, generation=self.generation, kl_estimator=self.kl.estimator,
            gamma=self.ppo.gamma, lam=self.ppo.lam, missing_eos_penalty=self.score_settings.missing_eos_penalty,
            missing_eos_mode=self.score_settings.missing_eos_mode, score_clip=self.score_settings.clip,
            group_size=self.ppo.samples_per_prompt, score_baseline=self.score_settings.baseline,
            advantage_estimator=self.ppo.advantage_estimator, forward_batch_size=self.hparams.forward_batch_size,
            all_reduce=reduce,
        )

    def compute_scores(self, responses: Responses) -> Tensor:
        """Scores ``(b,)`` of a batch of responses: the hook to override for a custom reward.

        ``responses`` carries token ids with masks (``prompt_ids``, ``response_ids``, ...) and
        the decoded ``prompts`` and ``completions``. Called without gradients.
        """
        return self.reward_scorer(responses)

    # ---------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.hparams.max_iterations is not None and self.iteration >= self.hparams.max_iterations:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        for frozen in (self.reference, getattr(self, "reward_model", None)):
            if frozen is not None:
                frozen.eval()
        started = time.perf_counter()
        k = self.ppo.samples_per_prompt  # each prompt k times, in consecutive rows (one group)
        prompt_ids, prompt_mask = batch["prompt_ids"].repeat_interleave(k, 0), batch["prompt_mask"].repeat_interleave(k, 0)
        reward_kl_coef = 0.0 if self.kl.in_loss else self.kl_controller.value  # in_loss: beta weighs k3 in the loss
        rollout = self.rollout_loop().run(prompt_ids, prompt_mask, reward_kl_coef)
        rollout_seconds = time.perf_counter() - started
        nonfinite = rollout.nonfinite_fields()
        flag = torch.tensor(float(bool(nonfinite)), device=rollout.scores.device)
        if self.trainer.strategy.reduce(flag, reduce_op="sum").item() > 0:  # on any rank: all ranks skip
            self.last_nonfinite = "non-finite rollout " + (", ".join(nonfinite) or "on another process")
            steps = self.ppo.epochs * self.ppo.num_minibatches
            if not self._loss_scaled():  # a loss scaler refuses a step without gradients
                optimizer, scheduler = self.optimizers(), self.lr_schedulers()
                for _ in range(steps):
                    self._empty_step(optimizer, scheduler)
            update_stats = {NONFINITE_STEPS: torch.tensor(float(steps))}
        else:
            update_stats = self.ppo_update(rollout)
        update_seconds = time.perf_counter() - started - rollout_seconds

        world_batch = len(rollout) * self.trainer.world_size
        self.iteration += 1
        self.episode += world_batch
        stats = self.rollout_statistics(rollout)
        mean_kl = self.trainer.strategy.reduce(stats["objective/kl"], reduce_op="mean").item()
        if math.isfinite(mean_kl):
            self.kl_controller.update(mean_kl, world_batch)
        response_tokens = rollout.response_mask.sum().item()
        stats.update(update_stats)
        stats.update({
            "lr": self.optimizers().param_groups[0]["lr"],
            "episode": float(self.episode),
            "time/rollout_s": rollout_seconds,
            "time/update_s": update_seconds,
            "time/tokens_per_s": response_tokens / max(rollout_seconds + update_seconds, 1e-9),
        })
        self.iteration_stats = {k: float(v) for k, v in stats.items()}
        self.log_dict(self.iteration_stats, on_step=True, on_epoch=False, sync_dist=True, batch_size=len(rollout))
        self.log("iteration", float(self.iteration), prog_bar=True, on_step=True, on_epoch=False)

    def rollout_statistics(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        """Per-iteration statistics of the experience, named as in TRL."""
        mask = rollout.response_mask
        kl_sum = pm.masked_sum(rollout.kl, mask, dim=1)
        non_score = pm.masked_sum(rollout.non_score_reward, mask, dim=1)
        stats = {
            "objective/kl": kl_sum.mean(),
            "objective/entropy": pm.masked_sum(-rollout.logprobs, mask, dim=1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (rollout.scores + non_score).mean(),
            "objective/scores": rollout.scores.mean(),
            "objective/kl_coef": torch.tensor(self.kl_controller.value),
            "val/num_eos_tokens": (rollout.response_ids == self.tokenizer.eos_token_id).sum().float(),
            "val/response_length": mask.sum(1).float().mean(),
            "val/no_eos_rate": (~rollout.contains_eos).float().mean(),
        }
        if self.critic is not None:
            stats["val/explained_variance"] = pm.explained_variance(rollout.values, rollout.returns, mask)
        return stats

    def minibatch_loss(self, mini: RolloutBatch, with_entropy: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss + ``vf_coef`` * clipped value loss (with a critic) + ``beta`` * k3 KL
        to the reference (with ``kl.in_loss``) - ``entropy_coef`` * entropy.

        The entropy needs a softmax over the whole vocabulary; without an entropy bonus it is
        only a statistic, computed when ``with_entropy`` (the first epoch's minibatches).
        """
        response_length = mini.response_ids.shape[1]
        logprobs, logits = response_logprobs(
            self.policy, mini.input_ids, mini.attention_mask, response_length, self.generation.temperature
        )
        mask = mini.response_mask
        reduction, max_length = self.loss_reduction, self.generation.max_new_tokens  # max_length: for "constant"
        pg_loss, pg = pm.policy_loss(logprobs, mini.logprobs, mini.advantages, mask, self.ppo.cliprange,
                                     reduction, max_length)
        loss, stats = pg_loss, {}
        if self.critic is not None:
            values = token_values(self.critic, mini.input_ids, mini.attention_mask, response_length)
            vf_loss, vf_clipfrac = pm.value_loss(values, mini.values, mini.returns, mask, self.ppo.cliprange_value)
            loss = loss + self.ppo.vf_coef * vf_loss
            stats.update({"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac})
        if self.kl.in_loss:  # GRPO's k3 term; padding set to 0 so its exponential cannot overflow
            kl = pm.kl_penalty(torch.where(mask, logprobs, 0.0), mini.ref_logprobs, "k3")
            kl_loss = pm.reduce_token_losses(kl, mask, reduction, max_length)
            loss = loss + self.kl_controller.value * kl_loss
            stats["loss/kl_avg"] = kl_loss.detach()
        if with_entropy or self.ppo.entropy_coef > 0:
            with torch.set_grad_enabled(self.ppo.entropy_coef > 0):
                entropy = pm.masked_mean(pm.entropy_from_logits(logits, self.generation.temperature), mask)
            loss = loss - self.ppo.entropy_coef * entropy
            stats["policy/entropy_avg"] = entropy.detach()
        stats.update({
            "policy/approxkl_avg": pg.approxkl,
            "policy/clipfrac_avg": pg.clipfrac,
            "loss/policy_avg": pg_loss.detach(),
            "val/ratio": pg.ratio_mean,
            "val/ratio_var": pg.ratio_var,
            # |logp - old_logp| before any update must be ~0: checked on the first minibatch
            "logprob_dev_max": (logprobs.detach() - mini.logprobs).abs().masked_fill(~mask, 0.0).max(),
        })
        return loss, stats

    def ppo_update(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        """``epochs`` passes of shuffled minibatches; statistics averaged over all of them.

        Also returns ``policy/first_ratio_dev``: the largest ``|logp - old_logp|`` of the very
        first minibatch, which must be ~0 (recomputed log-probs equal the rollout's), and
        ``health/nonfinite_steps``: optimiser steps skipped because a loss or the gradient norm
        was not finite (their gradients are dropped).
        """
        settings = self.ppo
        batch_size = len(rollout)
        micro_batches = settings.num_minibatches * settings.gradient_accumulation_steps
        if batch_size % micro_batches:
            raise ValueError(
                f"rollout batch size {batch_size} is not divisible by ppo.num_minibatches * "
                f"ppo.gradient_accumulation_steps = {micro_batches}"
            )
        micro_size = batch_size // micro_batches
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        collected: dict[str, list[Tensor]] = defaultdict(list)
        skipped = 0
        for epoch in range(settings.epochs):
            order = torch.randperm(batch_size, device=rollout.response_ids.device)
            for step in range(micro_batches):
                mini = rollout.select(order[step * micro_size : (step + 1) * micro_size])
                loss, stats = self.minibatch_loss(mini, with_entropy=epoch == 0)
                deviation = stats.pop("logprob_dev_max")
                if epoch == 0 and step == 0:
                    stats["policy/first_ratio_dev"] = deviation
                # A NaN loss gives NaN gradients, and DDP's gradient all-reduce hands them to every
                # rank: the gradient norm decides the skip, the same way on all processes.
                self.manual_backward(loss / settings.gradient_accumulation_steps)
                if (step + 1) % settings.gradient_accumulation_steps == 0:
                    self.clip_gradients(optimizer, gradient_clip_val=settings.max_grad_norm, gradient_clip_algorithm="norm")
                    grad_norm = gradient_norm(optimizer)
                    if not torch.isfinite(grad_norm):
                        skipped += 1
                        self.last_nonfinite = "non-finite loss or gradient norm"
                    if torch.isfinite(grad_norm) or self._loss_scaled():  # fp16's scaler skips and backs off
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                    else:
                        self._empty_step(optimizer, scheduler)
                    stats["health/grad_norm"] = grad_norm
                for name, value in stats.items():
                    collected[name].append(value.detach().float())
        averaged = {name: torch.stack(values).mean() for name, values in collected.items()}
        averaged[NONFINITE_STEPS] = torch.tensor(float(skipped))
        return averaged

    def _loss_scaled(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    @staticmethod
    def _empty_step(optimizer: Any, scheduler: Any) -> None:
        """A skipped optimiser step that still counts: with every gradient dropped, ``step()``
        changes no weight and no optimiser state, but Lightning's ``global_step`` and the
        schedule advance, so ``every_n_train_steps`` checkpoints keep their cadence."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        scheduler.step()

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": self.hparams.learning_rate}]
        if self.critic is not None:
            critic_lr = self.hparams.critic_learning_rate
            if critic_lr is None:
                critic_lr = self.hparams.learning_rate
            groups.append({"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": critic_lr})
        optimizer = torch.optim.AdamW(
            groups,
            eps=1e-5,
            weight_decay=0.0,
        )
        steps_per_iteration = self.ppo.epochs * self.ppo.num_minibatches
        total = steps_per_iteration * self.planned_iterations()
        scheduler = warmup_schedule(optimizer, self.hparams.lr_scheduler, 0, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def planned_iterations(self) -> int:
        """PPO iterations this fit will run: the least of ``max_iterations``, the Trainer's
        ``max_steps`` (optimiser steps) and the prompt batches of ``max_epochs``."""
        steps_per_iteration = self.ppo.epochs * self.ppo.num_minibatches
        limits = [] if self.hparams.max_iterations is None else [self.hparams.max_iterations]
        if self.trainer.max_steps > 0:
            limits.append(math.ceil(self.trainer.max_steps / steps_per_iteration))
        else:  # under manual optimisation this counts training batches, i.e. iterations
            limits.append(int(self.trainer.estimated_stepping_batches))
        return max(1, min(limits))

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise UserInputError(
                f"PPOModule does not support {type(self.trainer.strategy).__name__} yet: generation "
                "inside training_step breaks under FSDP1, and FSDP2 sharding is not applied by the "
                "package yet; use strategy=ddp or deepspeed (see docs/scaling.md)"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Until teardown, two Lightning warnings that do not apply: the reference and the reward
        # model are frozen in eval mode on purpose (the warning still shows if any other module
        # is in eval mode: it counts them all), and a checkpoint after a whole iteration is the
        # state to resume from (the advice for manual optimisation is to save the pre-step state).
        frozen = sum(not m.training for f in (self.reference, getattr(self, "reward_model", None)) if f is not None
                     for m in f.modules())
        rules = [MANUAL_OPTIMISATION_CHECKPOINT, *([eval_mode_rule(frozen)] if frozen else [])]
        self._ignored_warnings = ignore_warnings(*rules)

    def teardown(self, stage: str) -> None:
        restore_warnings(getattr(self, "_ignored_warnings", []))
        self._ignored_warnings = []

    def export_keys(self) -> tuple[str, ...]:
        return ("policy_export_dir", "critic_export_dir") if self.needs_critic else ("policy_export_dir",)

    def configure_callbacks(self) -> list[Callback]:
        callbacks = super().configure_callbacks()
        if self.hparams.get("health_guards", True):
            callbacks += default_guards(self.trainer.callbacks, with_critic=self.needs_critic)
        return callbacks

    # -------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Sample from policy and reference on held-out prompts (fixed seed per batch) and
        compare: reward score, KL to the reference, and with a ``judge`` the gold score, validity,
        the reward's Spearman correlation with the judge and the policy's win rate over the
        reference."""
        loop = self.rollout_loop()
        seed = self.hparams.seed * 100_003 + batch_idx
        policy = sample_responses(loop, self.policy, batch["prompt_ids"], batch["prompt_mask"], seed)
        reference = sample_responses(loop, self.reference, batch["prompt_ids"], batch["prompt_mask"], seed)
        prompts = policy.prompts
        scores, ref_scores = self.compute_scores(policy).float(), self.compute_scores(reference).float()
        m = self.eval_metrics
        m["score"].update(scores)
        m["ref_score"].update(ref_scores)
        m["kl"].update(sequence_kl(self.policy, self.reference, policy, self.generation.temperature))
        m["response_length"].update(policy.response_mask.sum(1).float())
        m["eos_rate"].update(pm.has_eos(policy.response_ids, self.tokenizer.eos_token_id).float())
        if self.judge is not None:
            judged = judge_pairs(self.judge, prompts, policy.completions, reference.completions)
            for metric, key in (("gold_score", "gold"), ("ref_gold_score", "baseline_gold"), ("gold_win_rate", "win"),
                                ("validity", "validity"), ("ref_validity", "baseline_validity")):
                if key in judged:
                    m[metric].update(scores.new_tensor(judged[key]))
            m["reward_gold_spearman"].update(scores, scores.new_tensor(judged["gold"]))
            m["ref_reward_gold_spearman"].update(ref_scores, ref_scores.new_tensor(judged["baseline_gold"]))
        if batch_idx == 0:
            rows = [
                {"prompt": p, "response": c, "score": float(s), "reference": rc, "ref_score": float(rs)}
                for p, c, s, rc, rs in zip(prompts, policy.completions, scores, reference.completions, ref_scores)
            ]
            log_text_samples(self.trainer, "samples/ppo", rows[: self.hparams.num_text_samples])

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.eval_metrics.items():
            if metric.update_called:
                self.log(f"eval/{name}", metric.compute())
            metric.reset()

    # ------------------------------------------------------------------ checkpoint + export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen_weights(self, checkpoint)
        checkpoint["ppo_state"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "iteration": self.iteration,
            "episode": self.episode,
            "rng": self._rng_states_of_all_ranks(),
        }

    def _rng_states_of_all_ranks(self) -> list[dict[str, Any]]:
        """Every process's RNG states, indexed by global rank: under DDP each rank samples its
        own responses, so each must get its own states back (rank 0 writes the file)."""
        state = rng_state()
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [state]
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as bytes: all_gather_object cannot pickle every tensor dtype
        payloads: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(payloads, buffer.getvalue())
        return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen_weights(self, checkpoint)
        state = checkpoint.get("ppo_state")
        if state is None:
            rank_zero_warn("checkpoint has no PPO state: KL controller and counters start afresh")
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.iteration, self.episode = state["iteration"], state["episode"]
        rng = state["rng"]
        if isinstance(rng, list):  # one entry per rank; a run resumed on more ranks reuses rank 0's
            rng = rng[self.global_rank] if self.global_rank < len(rng) else rng[0]
        set_rng_state(rng)

    def on_fit_end(self) -> None:
        export_at_fit_end(self, "policy_export_dir", self.policy, self.tokenizer, self.lora)
        if self.critic is not None:
            export_at_fit_end(self, "critic_export_dir", self.critic, self.tokenizer)
