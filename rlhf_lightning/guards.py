"""PPO health guards: Lightning callbacks that make the usual silent failures loud.

Each guard reads the statistics of the iteration that just ended
(``PPOModule.iteration_stats``, the same numbers it logs), logs a ``health/...`` metric to
TensorBoard, and warns with what the reading means and what to try. :class:`NonFiniteGuard`
also acts: the module skips updates whose loss or gradients are not finite, and the guard
restores the last good weights after repeated failures and then stops the run.

``PPOModule(health_guards=True)`` (the default) adds every guard with its default thresholds;
a guard of the same class in ``trainer.callbacks`` replaces the default one, so thresholds are
set in YAML like any callback's.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from .errors import UserInputError

# The keys of ``PPOModule.iteration_stats`` that the guards read.
NONFINITE_STEPS = "health/nonfinite_steps"
FIRST_RATIO_DEV = "policy/first_ratio_dev"
MEAN_KL = "objective/kl"
EXPLAINED_VARIANCE = "val/explained_variance"
RESPONSE_LENGTH = "val/response_length"
NO_EOS_RATE = "val/no_eos_rate"


class TrainingHealthError(UserInputError):
    """A health guard stopped the run; the CLI prints the message (exit 2), not a traceback."""


class HealthGuard(Callback):
    """Base: call :meth:`check` once per PPO iteration, and warn at most every ``warn_every``
    iterations per guard and kind of warning, so that a persistent problem does not flood the log."""

    def __init__(self, warn_every: int = 10) -> None:
        self.warn_every = warn_every
        self._last_warning: dict[str, int] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "iteration_stats", None)
        if stats:
            self.check(trainer, pl_module, stats)

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        raise NotImplementedError

    def warn(self, pl_module: LightningModule, message: str, kind: str = "") -> None:
        iteration = int(getattr(pl_module, "iteration", 0))
        last = self._last_warning.get(kind)
        if last is None or iteration - last >= self.warn_every:
            self._last_warning[kind] = iteration
            rank_zero_warn(f"[{type(self).__name__}] iteration {iteration}: {message}")

    @staticmethod
    def log_metric(pl_module: LightningModule, name: str, value: float) -> None:
        pl_module.log(name, float(value), on_step=True, on_epoch=False)

    def alarm(self, pl_module: LightningModule, metric: str, fired: bool, message: str) -> None:
        """Log ``metric`` as 1.0/0.0 and, when it fired, warn with ``message``."""
        self.log_metric(pl_module, metric, float(fired))
        if fired:
            self.warn(pl_module, message)


class NonFiniteGuard(HealthGuard):
    """Non-finite scores, advantages, losses or gradient norms.

    The module never applies such an update (``health/nonfinite_steps`` counts the skipped
    optimiser steps of an iteration). After ``restore_after`` failing iterations in a row the
    guard puts back the policy, critic (if any) and optimiser state of the last good iteration (kept in
    CPU memory every ``snapshot_every`` iterations; 0 keeps none), and after ``stop_after`` in a
    row it stops the run with :class:`TrainingHealthError`. Checkpoints already written stay as
    they are and no export happens, so nothing trained on NaN replaces a good model.
    """

    def __init__(self, restore_after: int = 2, stop_after: int = 4, snapshot_every: int = 1, warn_every: int = 1) -> None:
        super().__init__(warn_every)
        if not 0 < restore_after <= stop_after:
            raise ValueError(f"need 0 < restore_after <= stop_after, got {restore_after} and {stop_after}")
        self.restore_after, self.stop_after, self.snapshot_every = restore_after, stop_after, snapshot_every
        self.consecutive_failures = 0
        self.restores = 0
        self._snapshot: dict[str, Any] | None = None

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        skipped = stats.get(NONFINITE_STEPS, 0.0)
        if skipped == 0:
            self.consecutive_failures = 0
            if self.snapshot_every and pl_module.iteration % self.snapshot_every == 0 and _weights_finite(pl_module):
                self._snapshot = None  # free the old copy first: peak memory holds one snapshot, not two
                self._snapshot = _snapshot(pl_module)
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.stop_after:
                raise TrainingHealthError(
                    f"stopped after {self.consecutive_failures} PPO iterations in a row with non-finite values "
                    f"(scores, advantages, losses or gradient norms; {pl_module.last_nonfinite or 'see health/*'}); "
                    "checkpoints written so far are intact. Try: check the reward for NaN/inf, clip scores "
                    "(scores.clip), lower the learning rate, or use fp32/bf16 instead of fp16"
                )
            action = "update skipped"
            if self.consecutive_failures >= self.restore_after and self._snapshot is not None:
                _restore(pl_module, self._snapshot)
                self.restores += 1
                action = "restored the last good policy, critic and optimiser state"
            self.warn(pl_module, f"non-finite values ({pl_module.last_nonfinite}); {action}")
        self.log_metric(pl_module, "health/nonfinite_failures", self.consecutive_failures)
        self.log_metric(pl_module, "health/restores", self.restores)

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_failures": self.consecutive_failures, "restores": self.restores}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive_failures, self.restores = state_dict["consecutive_failures"], state_dict["restores"]


def _trained_models(pl_module: LightningModule) -> dict[str, torch.nn.Module]:
    """The policy and, when the module has one, the critic."""
    models = {"policy": pl_module.policy, "critic": pl_module.critic}
    return {name: model for name, model in models.items() if model is not None}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model``'s state dict that train (a LoRA policy's adapter, not its frozen
    base: only those can turn non-finite, and only those need a copy)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in trainable}


def _weights_finite(pl_module: LightningModule) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in _trained_models(pl_module).values()
               for t in _trainable_state(m).values())


def _to_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    return apply_to_collection(state, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def _snapshot(pl_module: LightningModule) -> dict[str, Any]:
    """The trained weights of policy and critic (if any) and the optimiser state, in CPU memory (the optimiser moves its state
    back to each parameter's device when it is loaded)."""
    snapshot = {name: _to_cpu(_trainable_state(model)) for name, model in _trained_models(pl_module).items()}
    snapshot["optimizer"] = _to_cpu(pl_module.optimizers().state_dict())
    return snapshot


def _restore(pl_module: LightningModule, snapshot: dict[str, Any]) -> None:
    for name, model in _trained_models(pl_module).items():
        model.load_state_dict(snapshot[name], strict=False)  # the frozen weights never changed
    pl_module.optimizers().load_state_dict(_to_cpu(snapshot["optimizer"]))


class LogprobDriftGuard(HealthGuard):
    """The ratio-is-1 check: before any update, the log-probs recomputed for the loss must
    equal the rollout's. ``policy/first_ratio_dev`` is the largest difference on the first
    minibatch; above ``threshold`` the PPO ratio is biased from the start."""

    def __init__(self, threshold: float = 0.05, warn_every: int = 10) -> None:
        super().__init__(warn_every)
        self.threshold = threshold

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        drift = stats.get(FIRST_RATIO_DEV)
        if drift is None:
            return
        self.alarm(pl_module, "health/logprob_drift_alarm", drift > self.threshold, (
            f"log-probs recomputed for the update differ from the rollout's by up to {drift:.3g} "
            f"(threshold {self.threshold}). Usual causes: dropout left on, position ids that ignore left "
            "padding, a different temperature in sampling and scoring, or low-precision kernels (try fp32 "
            "for the forward passes)"
        ))


class NegativeKLGuard(HealthGuard):
    """A mean KL (nats per response) below ``-tolerance``. With the k1 estimator the mean over
    the policy's own samples cannot be negative in expectation, so it means sampling and scoring
    disagree."""

    def __init__(self, tolerance: float = 0.1, warn_every: int = 10) -> None:
        super().__init__(warn_every)
        self.tolerance = tolerance

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        kl = stats.get(MEAN_KL)
        if kl is None:
            return
        self.alarm(pl_module, "health/negative_kl_alarm", kl < -self.tolerance, (
            f"mean KL(policy || reference) is {kl:.3g} nats per response, negative. Sampling and "
            "scoring disagree: check that generation.temperature is the one used for log-probs, that "
            "top_k/top_p are off (0 / 1.0), and that padding and position ids match between "
            "generation and the forward passes"
        ))


class ExplainedVarianceGuard(HealthGuard):
    """The critic's explained variance of the returns, after ``warmup`` iterations: below
    ``threshold`` for ``patience`` iterations in a row, the advantages are mostly noise."""

    def __init__(self, threshold: float = 0.0, warmup: int = 10, patience: int = 5, warn_every: int = 10) -> None:
        super().__init__(warn_every)
        self.threshold, self.warmup, self.patience = threshold, warmup, patience
        self.below = 0

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        ev = stats.get(EXPLAINED_VARIANCE)
        if ev is None or pl_module.iteration <= self.warmup:
            return
        self.below = self.below + 1 if ev < self.threshold else 0
        self.alarm(pl_module, "health/explained_variance_alarm", self.below >= self.patience, (
            f"the critic's explained variance has been below {self.threshold} for {self.below} iterations "
            f"(now {ev:.3g}): its values do not predict the returns. Try a higher critic_learning_rate or "
            "ppo.vf_coef, a critic initialised from the reward model, or more PPO epochs"
        ))

    def state_dict(self) -> dict[str, Any]:
        return {"below": self.below}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.below = state_dict["below"]


class LengthGuard(HealthGuard):
    """Response-length collapse or blow-up, and responses that never stop.

    The baseline is the mean response length of the first iteration, sampled by the policy
    before any update (the reference policy, when PPO starts from it); it is kept in
    checkpoints. Warns when the mean length leaves ``[collapse_ratio, blowup_ratio]`` times the
    baseline, or when more than ``max_no_eos_rate`` of the responses have no EOS.
    """

    def __init__(self, collapse_ratio: float = 0.3, blowup_ratio: float = 3.0, max_no_eos_rate: float = 0.5,
                 warn_every: int = 10) -> None:
        super().__init__(warn_every)
        self.collapse_ratio, self.blowup_ratio, self.max_no_eos_rate = collapse_ratio, blowup_ratio, max_no_eos_rate
        self.baseline_length: float | None = None

    def check(self, trainer: Trainer, pl_module: LightningModule, stats: dict[str, float]) -> None:
        length, no_eos = stats.get(RESPONSE_LENGTH), stats.get(NO_EOS_RATE)
        if length is None:
            return
        if self.baseline_length is None:
            self.baseline_length = max(length, 1e-6)
        ratio = length / self.baseline_length
        self.log_metric(pl_module, "health/length_ratio", ratio)
        if ratio < self.collapse_ratio or ratio > self.blowup_ratio:
            trend = "collapsed" if ratio < self.collapse_ratio else "blown up"
            self.warn(pl_module, (
                f"mean response length {trend} to {length:.1f} tokens, {ratio:.2f}x the starting "
                f"{self.baseline_length:.1f}: the policy may be exploiting a length preference of the reward. "
                "Look at the samples; try a larger KL coefficient, a length-normalised reward, or "
                "scores.missing_eos_penalty"
            ), kind="length")
        if no_eos is not None and no_eos > self.max_no_eos_rate:
            self.warn(pl_module, (
                f"{no_eos:.0%} of the responses end without EOS (more than {self.max_no_eos_rate:.0%}): they "
                "hit generation.max_new_tokens. Raise max_new_tokens or set scores.missing_eos_penalty"
            ), kind="no_eos")

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_length": self.baseline_length}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline_length = state_dict["baseline_length"]


class JudgeAgreementStop(Callback):
    """Stop PPO once the reward model no longer ranks the policy's samples as the judge does: an
    over-optimisation stop (Gao et al. 2022: the proxy keeps rising while the gold score bends).

    Reads two validation metrics (they exist when ``PPOModule`` has a ``judge`` and a reward
    model): ``eval/reward_gold_spearman``, the reward model's Spearman correlation with the
    judge on the policy's samples, and ``eval/ref_reward_gold_spearman``, the same on the
    reference's samples. After ``patience`` validations in a row with the first below ``ratio``
    times the second, the run stops as if ``max_iterations`` were reached: the exports are the
    policy and critic of that moment. A reference correlation at or below 0 (the reward model
    never agreed with the judge) stops nothing. Opt-in, not one of the default guards; its
    count of validations below the line is kept in checkpoints.
    """

    def __init__(self, ratio: float = 0.5, patience: int = 1) -> None:
        if not 0 < ratio <= 1 or patience < 1:
            raise UserInputError(f"JudgeAgreementStop: need 0 < ratio <= 1 and patience >= 1, got {ratio} and {patience}")
        self.ratio, self.patience = ratio, patience
        self.below = 0
        self.warned_missing = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        policy, reference = (trainer.callback_metrics.get(f"eval/{name}") for name in
                             ("reward_gold_spearman", "ref_reward_gold_spearman"))
        if policy is None or reference is None:
            if not self.warned_missing:
                rank_zero_warn("JudgeAgreementStop: no eval/reward_gold_spearman to read; give PPOModule a judge "
                               "and a reward model, or remove the callback")
                self.warned_missing = True
            return
        policy, reference = float(policy), float(reference)
        self.below = self.below + 1 if reference > 0 and policy < self.ratio * reference else 0
        if self.below >= self.patience:
            trainer.should_stop = True
            rank_zero_warn(
                f"[JudgeAgreementStop] iteration {getattr(pl_module, 'iteration', '?')}: the reward model's Spearman "
                f"correlation with the judge is {policy:.3f} on the policy's samples, below {self.ratio} x "
                f"{reference:.3f} on the reference's ({self.below} validation(s) in a row); stopping here"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"below": self.below}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.below = state_dict["below"]


DEFAULT_GUARDS: tuple[type[HealthGuard], ...] = (
    NonFiniteGuard, LogprobDriftGuard, NegativeKLGuard, ExplainedVarianceGuard, LengthGuard,
)


def default_guards(existing: list[Callback], with_critic: bool = True) -> list[HealthGuard]:
    """One guard of each default class that ``existing`` (the Trainer's callbacks) lacks; without
    a critic (``with_critic`` False) no :class:`ExplainedVarianceGuard`."""
    present = {type(c) for c in existing}
    wanted = [g for g in DEFAULT_GUARDS if with_critic or g is not ExplainedVarianceGuard]
    return [guard() for guard in wanted if not any(issubclass(p, guard) for p in present)]
