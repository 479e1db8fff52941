"""Stage 3: PPO against a reward, with a per-token KL penalty to the reference (SFT) policy.

One ``training_step`` is one PPO iteration: a rollout on the batch of prompts
(:class:`~rlhf_lightning.rollout.RolloutLoop`), then ``ppo.epochs`` passes of shuffled
minibatches with manual optimisation, then the logs. ``trainer.global_step`` counts optimiser
steps (``ppo.epochs * ppo.num_minibatches`` per iteration); ``max_iterations`` counts iterations
and is the one knob for how long PPO runs. The formulas are in :mod:`rlhf_lightning.rlhf_math`;
``examples/ppo_minimal.py`` writes the same iteration top to bottom without Lightning.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import rlhf_math as pm
from ..checkpoint_io import drop_frozen_weights, restore_frozen_weights
from ..evaluation import ComparisonMetrics, JudgeFn, compare_batch
from ..forwards import response_logprobs, token_values
from ..generation import GenerationSettings, Responses
from ..guards import NONFINITE_STEPS, default_guards
from ..lora import LoRASettings, trained_parameters
from ..models import load_tokenizer
from ..optim import clipped_step, empty_steps, warmup_schedule
from ..ppo_models import load_ppo_models
from ..ppo_settings import (ImplicitRewardSettings, KLSettings, PPOSettings, ScoreSettings, check_ppo_settings,
                            loss_reduction, planned_iterations)
from ..reward_sources import TextRewardFn
from ..rng import restore_rank_state, rng_states_of_all_ranks
from ..rollout import RolloutBatch, RolloutLoop, rollout_statistics
from ..sharding import shard_models
from ..terminal import KnownWarningsSilenced
from ..text_logging import log_text_samples
from .export import ExportingModule, export_at_fit_end

__all__ = ["ImplicitRewardSettings", "KLSettings", "PPOModule", "PPOSettings", "ScoreSettings"]


class PPOModule(ExportingModule):
    """PPO with a policy, a frozen reference, a reward source and a critic (the critic only with
    the default ``ppo.advantage_estimator: gae``; the critic-free estimators have none).

    Args:
        policy: the policy to train (usually the SFT export folder).
        reference: the frozen reference policy of the KL penalty (default: ``policy``).
        lora: train a LoRA adapter on the policy instead of all its weights (needs the ``lora``
            extra, ``peft``; ``dropout`` must be 0). The reference is then the policy's own base
            model with the adapter disabled (one copy of the base weights), the critic is a
            separate model or, with ``lora.critic: adapter``, a second adapter and a value head on
            that same base (``critic`` must then stay unset), and ``policy_export_dir`` gets the
            merged policy (:mod:`rlhf_lightning.lora`). None: full fine-tuning.
        reward_model: a reward-model folder (``RewardModule``'s export; a folder without a trained
            score head, such as the SFT export, is refused), or a list of them: an ensemble that
            scores the members' mean minus ``scores.ensemble_penalty`` times their std (logged as
            ``objective/scores_spread``); or else ``reward_fn`` or ``implicit_reward``.
        reward_fn: a Python callable ``(prompts, completions) -> scores`` (in YAML: its import
            path, e.g. ``rlhf_lightning.tasks.gold_rewards``), or else ``reward_model`` or
            ``implicit_reward``.
        implicit_reward: DPO's implicit reward ``beta * (log pi_dpo(y|x) - log pi_ref(y|x))``
            (``ImplicitRewardSettings``: ``policy``, the DPO export folder; ``reference``, null:
            ``policy`` above, the SFT export DPO started from; ``beta``, default 0.1), summed
            over the response tokens; both models frozen, their tokenizer the policy's. Or else
            ``reward_model`` or ``reward_fn``.
        critic: the value model's initial weights (default: the reward model, or an ensemble's
            first member, when it shares the policy's tokenizer, else the policy with a new
            scalar head, as with ``reward_fn`` or ``implicit_reward``). Only ``gae`` has a critic: with a critic-free ``ppo.advantage_estimator``
            none is built, trained, checkpointed or exported (``critic``, ``critic_learning_rate``,
            ``critic_export_dir`` and the value settings are not read).
        learning_rate: the policy's AdamW (eps 1e-5) learning rate, decayed by ``lr_scheduler``.
        critic_learning_rate: the critic's learning rate (default: ``learning_rate``).
        lr_scheduler: ``linear``, ``cosine`` or ``constant`` decay over the planned iterations.
        generation: how responses are sampled (``GenerationSettings``).
        ppo: the update (``PPOSettings``).
        kl: the KL penalty to the reference (``KLSettings``).
        scores: what happens to scores before shaping (``ScoreSettings``).
        max_iterations: how long PPO runs, in PPO iterations (one batch of prompts each). Null:
            the Trainer's ``max_steps`` / ``max_epochs`` decide.
        forward_batch_size: rows per no-grad forward of the rollout (bounds memory).
        reward_batch_size: rows per reward-model (or implicit-reward) forward.
        gradient_checkpointing: the policy and the critic recompute their activations in the
            backward instead of keeping them (trades compute for memory; generation and the
            rollout's no-grad forwards are unaffected).
        policy_export_dir: where the trained policy is written as a Hugging Face folder at the
            end of fit (null: not exported).
        critic_export_dir: where the critic is written (null: not exported).
        overwrite_export: allow the fit to replace finished models in the export folders (off:
            the fit refuses to start).
        judge: a gold judge ``(prompts, completions) -> scores`` (in YAML: its import path,
            e.g. ``rlhf_lightning.tasks.sentiment.judge``, or your own): validation then also
            reports the judge's score of policy and reference samples, the policy's win rate
            over the reference, the reward's Spearman correlation with the judge on both, and
            validity when the judge has ``is_valid``. Evaluation only, never a training signal.
        num_text_samples: validation samples shown in TensorBoard's text tab.
        health_guards: add the callbacks of :mod:`rlhf_lightning.guards` (non-finite values,
            log-prob drift, negative KL, explained variance, response length) that the Trainer
            does not already have.
        seed: seeds validation sampling (the same prompts get the same samples every time).

    Override :meth:`compute_scores` to compute rewards any other way, and set
    ``rollout_loop_class`` to a :class:`RolloutLoop` subclass to change how a rollout turns
    rewards into advantages.
    """

    rollout_loop_class: type[RolloutLoop] = RolloutLoop

    def __init__(
        self,
        policy: str = "outputs/sft/model",
        reference: str | None = None,
        lora: LoRASettings | None = None,
        reward_model: str | list[str] | None = None,
        reward_fn: TextRewardFn | None = None,
        implicit_reward: ImplicitRewardSettings | None = None,
        critic: str | None = None,
        learning_rate: float = 1e-5,
        critic_learning_rate: float | None = None,
        lr_scheduler: str = "linear",
        generation: GenerationSettings = GenerationSettings(),
        ppo: PPOSettings = PPOSettings(),
        kl: KLSettings = KLSettings(),
        scores: ScoreSettings = ScoreSettings(),
        max_iterations: int | None = None,
        forward_batch_size: int = 8,
        reward_batch_size: int = 64,
        gradient_checkpointing: bool = False,
        policy_export_dir: str | None = "outputs/ppo/policy",
        critic_export_dir: str | None = "outputs/ppo/critic",
        overwrite_export: bool = False,
        judge: JudgeFn | None = None,
        num_text_samples: int = 4,
        health_guards: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_ppo_settings(generation, ppo, kl, scores, lora, policy=policy, reference=reference, reward_model=reward_model,
                           max_iterations=max_iterations, forward_batch_size=forward_batch_size,
                           reward_batch_size=reward_batch_size, critic=critic,
                           gradient_checkpointing=gradient_checkpointing, implicit_reward=implicit_reward)
        self.save_hyperparameters(ignore=["reward_fn", "judge", "generation", "ppo", "kl", "scores", "lora",
                                          "implicit_reward"])
        self.hparams.update(generation=asdict(generation), ppo=asdict(ppo), kl=asdict(kl), scores=asdict(scores),
                            lora=None if lora is None else asdict(lora),
                            implicit_reward=None if implicit_reward is None else asdict(implicit_reward))
        self.lora, self.implicit_reward = lora, implicit_reward
        self.generation, self.ppo, self.kl, self.score_settings = generation, ppo, kl, scores
        self.loss_reduction = loss_reduction(ppo)
        self.reward_fn, self.judge = reward_fn, judge
        self.automatic_optimization = False
        self.kl_controller = pm.kl_controller(kl.coef, kl.target, kl.horizon)
        self.iteration, self.episode = 0, 0  # PPO iterations done, responses sampled (over all processes)
        self.iteration_stats: dict[str, float] = {}  # the last iteration's statistics (read by guards)
        self.last_nonfinite = ""  # what was non-finite in the last failing iteration
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.policy: PreTrainedModel | None = None  # the models are loaded in configure_model
        self.critic: torch.nn.Module | None = None  # a sequence-classification model or an AdapterCritic
        self.eval_metrics = ComparisonMetrics()

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
        sources = (hp.reward_model, self.reward_fn, self.implicit_reward)
        if sum(source is not None for source in sources) != 1 and type(self).compute_scores is PPOModule.compute_scores:
            raise ValueError("give exactly one of reward_model, reward_fn or implicit_reward (or override compute_scores)")
        models = load_ppo_models(hp.policy, self.tokenizer, reference=hp.reference, lora=self.lora, reward_model=hp.reward_model,
                                 reward_fn=self.reward_fn, implicit_reward=self.implicit_reward, critic=hp.critic,
                                 with_critic=self.needs_critic, reward_batch_size=hp.reward_batch_size,
                                 ensemble_penalty=self.score_settings.ensemble_penalty,
                                 gradient_checkpointing=hp.gradient_checkpointing,
                                 on_loaded=lambda model: shard_models(self.device_mesh, [model]))
        self.policy, self.reference, self.critic = models.policy, models.reference, models.critic
        self.reward_scorer = models.reward_scorer
        if len(models.reward_models) == 1:
            self.reward_model = models.reward_models[0]
        elif models.reward_models:  # an ensemble's members
            self.reward_models = torch.nn.ModuleList(models.reward_models)
        if models.implicit_reward_models:
            self.implicit_reward_models = torch.nn.ModuleList(models.implicit_reward_models)

    def frozen_models(self) -> list[torch.nn.Module]:
        """The models that never train: the reference, and the reward model, an ensemble's
        members, or the implicit reward's DPO policy and its reference unless that is the KL
        reference (when there are any). Registered as submodules (``reward_model``,
        ``reward_models``, ``implicit_reward_models``), they move to the device with the module;
        checkpoints leave them out, except under FSDP2
        (:func:`~rlhf_lightning.checkpoint_io.keeps_frozen_weights`)."""
        reward_models = [getattr(self, "reward_model", None), *getattr(self, "reward_models", ()),
                         *getattr(self, "implicit_reward_models", ())]
        return [m for m in (self.reference, *reward_models) if m is not None]

    def rollout_loop(self) -> RolloutLoop:
        """A :attr:`rollout_loop_class` on this module's models and settings."""
        reduce = (lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")) if self.trainer.world_size > 1 else None
        return self.rollout_loop_class.from_settings(
            self.policy, self.reference, self.critic, self.compute_scores, self.tokenizer, self.generation, self.ppo, self.kl,
            self.score_settings, forward_batch_size=self.hparams.forward_batch_size, all_reduce=reduce)

    def compute_scores(self, responses: Responses) -> Tensor:
        """Scores ``(b,)`` of a batch of responses: the hook to override for a custom reward.

        ``responses`` carries token ids with masks (``prompt_ids``, ``response_ids``, ...) and
        the decoded ``prompts`` and ``completions``. Called without gradients.
        """
        return self.reward_scorer(responses)

    def score_statistics(self) -> dict[str, Tensor]:
        """Statistics of the reward source's last scores, logged with the rollout's: the scorer's
        own ``statistics()`` when it has one (an ensemble's ``objective/scores_spread``), else none."""
        statistics = getattr(self.reward_scorer, "statistics", None)
        return statistics() if statistics is not None else {}

    # ---------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        done = self.hparams.max_iterations is not None and self.iteration >= self.hparams.max_iterations
        self.trainer.should_stop |= done
        return -1 if done else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One PPO iteration: rollout, update, KL controller, logs."""
        started = time.perf_counter()
        rollout = self.rollout(batch)
        rollout_seconds = time.perf_counter() - started
        update_stats = self.skip_update() if self.rollout_is_nonfinite(rollout) else self.ppo_update(rollout)
        update_seconds = time.perf_counter() - started - rollout_seconds

        world_batch = len(rollout) * self.trainer.world_size
        self.iteration += 1
        self.episode += world_batch
        stats = rollout_statistics(rollout, self.kl_controller.value, self.critic is not None)
        stats.update(self.score_statistics())
        stats.update(update_stats)
        mean_kl = self.trainer.strategy.reduce(stats["objective/kl"], reduce_op="mean").item()
        if math.isfinite(mean_kl):
            self.kl_controller.update(mean_kl, world_batch)
        seconds = rollout_seconds + update_seconds
        stats.update({"lr": self.optimizers().param_groups[0]["lr"], "episode": float(self.episode),
                      "time/rollout_s": rollout_seconds, "time/update_s": update_seconds,
                      "time/tokens_per_s": rollout.response_mask.sum().item() / max(seconds, 1e-9)})
        self.iteration_stats = {k: float(v) for k, v in stats.items()}
        self.log_dict(self.iteration_stats, on_step=True, on_epoch=False, sync_dist=True, batch_size=len(rollout))
        self.log_dict({"score": stats["objective/scores"], "kl": stats["objective/kl"]}, prog_bar=True, logger=False)

    def rollout(self, batch: dict[str, Tensor]) -> RolloutBatch:
        """Experience on a batch of prompts, each repeated ``ppo.samples_per_prompt`` times in
        consecutive rows (one group)."""
        for model in self.frozen_models():
            model.eval()
        k = self.ppo.samples_per_prompt
        prompt_ids, prompt_mask = batch["prompt_ids"].repeat_interleave(k, 0), batch["prompt_mask"].repeat_interleave(k, 0)
        reward_kl_coef = 0.0 if self.kl.in_loss else self.kl_controller.value  # in_loss: beta weighs k3 in the loss
        return self.rollout_loop().run(prompt_ids, prompt_mask, reward_kl_coef)

    def rollout_is_nonfinite(self, rollout: RolloutBatch) -> bool:
        """Whether the rollout holds NaN or inf on any process (then every process skips the
        update, and :attr:`last_nonfinite` says what)."""
        nonfinite = rollout.nonfinite_fields()
        flag = torch.tensor(float(bool(nonfinite)), device=rollout.scores.device)
        if self.trainer.strategy.reduce(flag, reduce_op="sum").item() == 0:
            return False
        self.last_nonfinite = "non-finite rollout " + (", ".join(nonfinite) or "on another process")
        return True

    def skip_update(self) -> dict[str, Tensor]:
        """An update skipped as a whole: its optimiser steps are empty (they still count)."""
        steps = self.ppo.steps_per_iteration
        empty_steps(self, steps)
        return {NONFINITE_STEPS: torch.tensor(float(steps))}

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
        ``health/nonfinite_steps``: optimiser steps whose loss or gradient norm was not finite
        (their gradients are dropped, :func:`~rlhf_lightning.optim.clipped_step`).
        """
        settings = self.ppo
        accumulation = settings.gradient_accumulation_steps
        micro_batches = settings.num_minibatches * accumulation
        if len(rollout) % micro_batches:
            raise ValueError(f"rollout batch size {len(rollout)} is not divisible by ppo.num_minibatches * "
                             f"ppo.gradient_accumulation_steps = {micro_batches}")
        collected: dict[str, list[Tensor]] = defaultdict(list)
        for epoch in range(settings.epochs):
            order = torch.randperm(len(rollout), device=rollout.response_ids.device)
            for step, index in enumerate(order.split(len(rollout) // micro_batches)):
                loss, stats = self.minibatch_loss(rollout.select(index), with_entropy=epoch == 0)
                deviation = stats.pop("logprob_dev_max")
                if epoch == 0 and step == 0:
                    stats["policy/first_ratio_dev"] = deviation
                self.manual_backward(loss / accumulation)
                if (step + 1) % accumulation == 0:
                    stats["health/grad_norm"] = clipped_step(self, settings.max_grad_norm)
                for name, value in stats.items():
                    collected[name].append(value.detach().float())
        averaged = {name: torch.stack(values).mean() for name, values in collected.items()}
        skipped = (~torch.isfinite(torch.stack(collected["health/grad_norm"]))).sum().float()
        if skipped:
            self.last_nonfinite = "non-finite loss or gradient norm"
        averaged[NONFINITE_STEPS] = skipped
        return averaged

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        critic = trained_parameters(self.critic) if self.critic is not None else []
        in_critic = {id(p) for p in critic}  # an AdapterCritic's adapter is on the policy's peft model
        policy = [p for p in trained_parameters(self.policy) if id(p) not in in_critic]
        groups = [{"params": policy, "lr": hp.learning_rate}]
        if self.critic is not None:
            critic_lr = hp.learning_rate if hp.critic_learning_rate is None else hp.critic_learning_rate
            groups.append({"params": critic, "lr": critic_lr})
        optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
        total = self.ppo.steps_per_iteration * self.planned_iterations()
        scheduler = warmup_schedule(optimizer, self.hparams.lr_scheduler, 0, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def planned_iterations(self) -> int:
        """PPO iterations this fit will run (:func:`~rlhf_lightning.ppo_settings.planned_iterations`)."""
        return planned_iterations(self.hparams.max_iterations, self.trainer, self.ppo.steps_per_iteration)

    def export_keys(self) -> tuple[str, ...]:
        return ("policy_export_dir", "critic_export_dir") if self.needs_critic else ("policy_export_dir",)

    def configure_callbacks(self) -> list[Callback]:
        callbacks = [*super().configure_callbacks(), KnownWarningsSilenced(self.frozen_models)]
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
        seed = self.hparams.seed * 100_003 + batch_idx
        comparison = compare_batch(self.policy, self.reference, self.tokenizer, self.generation, batch["prompt_ids"],
                                   batch["prompt_mask"], seed, self.compute_scores, self.judge)
        self.eval_metrics.update(comparison)
        if batch_idx == 0:
            log_text_samples(self.trainer, "samples/ppo", comparison.rows()[: self.hparams.num_text_samples])

    def on_validation_epoch_end(self) -> None:
        for name, value in self.eval_metrics.compute().items():
            self.log(f"eval/{name}", value)

    # ------------------------------------------------------------------ checkpoint + export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen_weights(self, checkpoint)
        checkpoint["ppo_state"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "iteration": self.iteration,
            "episode": self.episode,
            "rng": rng_states_of_all_ranks(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen_weights(self, checkpoint)
        state = checkpoint.get("ppo_state")
        if state is None:
            rank_zero_warn("checkpoint has no PPO state: KL controller and counters start afresh")
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.iteration, self.episode = state["iteration"], state["episode"]
        restore_rank_state(state["rng"], self.global_rank)

    def on_fit_end(self) -> None:
        export_at_fit_end(self, "policy_export_dir", self.policy, self.tokenizer, self.lora)
        if self.critic is not None:
            export_at_fit_end(self, "critic_export_dir", self.critic, self.tokenizer)
