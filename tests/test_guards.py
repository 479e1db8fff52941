"""PPO health guards: each guard's metric and warning, and the non-finite guard end to end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.guards import (
    JudgeAgreementStop,
    ExplainedVarianceGuard,
    LengthGuard,
    LogprobDriftGuard,
    NegativeKLGuard,
    NonFiniteGuard,
    TrainingHealthError,
)
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.models import is_complete_hf_folder
from rlhf_lightning.modules import PPOModule, PPOSettings
from rlhf_lightning.optim import gradient_norm
from rlhf_lightning.tasks import gold_rewards

from .test_ppo import fit, small_ppo


class StubModule:
    """What a guard reads from a PPOModule: the iteration and a ``log`` method."""

    def __init__(self) -> None:
        self.iteration = 0
        self.logged: dict[str, float] = {}
        self.last_nonfinite = ""

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


def run(guard, stats_per_iteration: list[dict[str, float]]) -> StubModule:
    module = StubModule()
    for stats in stats_per_iteration:
        module.iteration += 1
        guard.check(None, module, stats)
    return module


def test_logprob_drift_guard_warns_over_threshold():
    module = run(LogprobDriftGuard(threshold=0.05), [{"policy/first_ratio_dev": 0.0}])
    assert module.logged["health/logprob_drift_alarm"] == 0.0
    with pytest.warns(UserWarning, match="log-probs recomputed .* differ .* by up to 0.3.*position ids"):
        module = run(LogprobDriftGuard(threshold=0.05), [{"policy/first_ratio_dev": 0.3}])
    assert module.logged["health/logprob_drift_alarm"] == 1.0


def test_negative_kl_guard_names_the_usual_causes():
    module = run(NegativeKLGuard(tolerance=0.1), [{"objective/kl": -0.05}])
    assert module.logged["health/negative_kl_alarm"] == 0.0
    with pytest.warns(UserWarning, match="negative.*temperature.*top_k/top_p.*padding"):
        module = run(NegativeKLGuard(tolerance=0.1), [{"objective/kl": -0.5}])
    assert module.logged["health/negative_kl_alarm"] == 1.0


def test_explained_variance_guard_waits_for_warmup_and_patience():
    guard = ExplainedVarianceGuard(threshold=0.0, warmup=2, patience=2)
    low = {"val/explained_variance": -0.4}
    module = run(guard, [low, low, low])  # iterations 1-2 are warm-up, 3 is the first low one
    assert module.logged["health/explained_variance_alarm"] == 0.0
    with pytest.warns(UserWarning, match="explained variance has been below 0.0 for 2 iterations"):
        guard.check(None, module, low)
    assert module.logged["health/explained_variance_alarm"] == 1.0
    guard.check(None, module, {"val/explained_variance": 0.5})
    assert module.logged["health/explained_variance_alarm"] == 0.0


def test_length_guard_measures_against_the_first_iteration_and_counts_missing_eos():
    guard = LengthGuard(collapse_ratio=0.3, blowup_ratio=3.0, max_no_eos_rate=0.5)
    module = run(guard, [{"val/response_length": 20.0, "val/no_eos_rate": 0.0}, {"val/response_length": 30.0}])
    assert module.logged["health/length_ratio"] == pytest.approx(1.5)
    with pytest.warns(UserWarning, match="length collapsed to 4.0 tokens, 0.20x the starting 20.0"):
        guard.check(None, module, {"val/response_length": 4.0})
    with pytest.warns(UserWarning, match="80% of the responses end without EOS"):
        guard.check(None, module, {"val/response_length": 20.0, "val/no_eos_rate": 0.8})
    # The baseline survives a checkpoint.
    restored = LengthGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.baseline_length == 20.0


def test_warnings_are_rate_limited():
    guard = NegativeKLGuard(tolerance=0.1, warn_every=10)
    with pytest.warns(UserWarning) as caught:
        run(guard, [{"objective/kl": -1.0}] * 12)
    assert len(caught) == 2  # iterations 1 and 11


def test_default_guards_are_added_and_a_configured_one_replaces_its_default(tmp_path: Path, byte_gpt2_dir: Path):
    configured = ExplainedVarianceGuard(warmup=0, patience=1, threshold=2.0)  # always alarms
    module = small_ppo(byte_gpt2_dir, tmp_path)
    with pytest.warns(UserWarning, match="explained variance"):
        trainer = fit(module, iterations=2, callbacks=[configured])
    guards = [c for c in trainer.callbacks if isinstance(c, ExplainedVarianceGuard)]
    assert guards == [configured]
    for guard in (NonFiniteGuard, LogprobDriftGuard, NegativeKLGuard, LengthGuard):
        assert sum(isinstance(c, guard) for c in trainer.callbacks) == 1
    metrics = trainer.callback_metrics
    for name in ("health/nonfinite_failures", "health/restores", "health/logprob_drift_alarm",
                 "health/negative_kl_alarm", "health/length_ratio", "health/grad_norm", "health/nonfinite_steps"):
        assert name in metrics, name
    assert metrics["health/explained_variance_alarm"] == 1.0
    assert metrics["health/nonfinite_steps"] == 0.0
    assert torch.isfinite(metrics["health/grad_norm"])


def test_grad_norm_is_measured_before_clipping(tmp_path: Path, byte_gpt2_dir: Path):
    max_grad_norm = 1e-3  # far below the tiny model's gradient norm: every step is clipped
    norms: dict[str, list[torch.Tensor]] = {"before": [], "after": []}

    class Recording(PPOModule):
        def clip_gradients(self, optimizer, *args, **kwargs):
            norms["before"].append(gradient_norm(optimizer))
            super().clip_gradients(optimizer, *args, **kwargs)
            norms["after"].append(gradient_norm(optimizer))

    module = small_ppo(byte_gpt2_dir, tmp_path, cls=Recording,
                       ppo=PPOSettings(epochs=2, num_minibatches=2, max_grad_norm=max_grad_norm))
    logged = fit(module, iterations=1).callback_metrics["health/grad_norm"].item()
    assert len(norms["before"]) == 4  # clipping went through Lightning's clip_gradients at each step
    assert logged == pytest.approx(torch.stack(norms["before"]).mean().item())
    assert logged > 10 * max_grad_norm
    assert max(norms["after"]) <= max_grad_norm * (1 + 1e-4)  # the step itself used clipped gradients


def test_guards_can_be_switched_off(tmp_path: Path, byte_gpt2_dir: Path):
    trainer = fit(small_ppo(byte_gpt2_dir, tmp_path, health_guards=False), iterations=1)
    assert not any(isinstance(c, (NonFiniteGuard, LengthGuard)) for c in trainer.callbacks)


def nan_after(iterations: int):
    """A gold reward that turns to NaN from call ``iterations + 1`` on."""
    calls = []

    def reward(prompts, completions):
        calls.append(1)
        scores = gold_rewards(prompts, completions)
        return scores if len(calls) <= iterations else [float("nan")] * len(scores)

    return reward


def test_nan_reward_skips_updates_then_stops_with_a_clear_error(tmp_path: Path, byte_gpt2_dir: Path):
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_fn=nan_after(1))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    guard = NonFiniteGuard(restore_after=2, stop_after=3)
    with pytest.warns(UserWarning, match="non-finite score"), \
            pytest.raises(TrainingHealthError, match="3 PPO iterations in a row with non-finite values.*scores"):
        fit(module, iterations=10, callbacks=[guard, checkpoints])
    assert module.iteration == 4  # one good iteration, then three skipped ones
    assert guard.restores == 1
    # Skipped iterations still count their optimiser steps, so checkpoints keep their cadence
    # (iteration 4 stopped the run before its checkpoint: the guard runs before ModelCheckpoint).
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {f"epoch=0-step={4 * i}.ckpt" for i in (1, 2, 3)}
    torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)  # written before, intact
    assert not is_complete_hf_folder(tmp_path / "policy")  # no export of a failed run


def test_one_skipped_step_changes_nothing_and_keeps_the_step_count(tmp_path: Path, byte_gpt2_dir: Path):
    class OneNaNLoss(PPOModule):
        """The loss of the very first minibatch of iteration 2 is NaN."""

        def minibatch_loss(self, mini, with_entropy=True):
            loss, stats = super().minibatch_loss(mini, with_entropy)
            if self.iteration == 1 and not getattr(self, "poisoned", False):
                self.poisoned = True
                loss = loss * float("nan")
            return loss, stats

    module = small_ppo(byte_gpt2_dir, tmp_path, cls=OneNaNLoss)
    trainer = fit(module, iterations=3)
    assert trainer.global_step == 3 * 4  # 2 epochs x 2 minibatches per iteration, the skipped one included
    assert module.lr_schedulers().last_epoch == 3 * 4
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert all(torch.isfinite(v).all() for s in module.optimizers().optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))


def test_diverged_policy_is_restored_and_training_goes_on(tmp_path: Path, byte_gpt2_dir: Path):
    class Diverging(PPOModule):
        """Corrupts the policy once, during the second iteration's scoring."""

        def compute_scores(self, responses):
            if self.iteration == 1 and not getattr(self, "corrupted", False):
                self.corrupted = True
                with torch.no_grad():
                    self.policy.get_output_embeddings().weight.fill_(float("nan"))
            return super().compute_scores(responses)

    module = small_ppo(byte_gpt2_dir, tmp_path, cls=Diverging, reward_fn=gold_rewards)
    guard = NonFiniteGuard(restore_after=2, stop_after=4)
    with pytest.warns(UserWarning, match="restored the last good policy"):
        trainer = fit(module, iterations=5, callbacks=[guard])
    assert module.iteration == 5
    assert guard.restores == 1 and guard.consecutive_failures == 0
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert trainer.callback_metrics["health/nonfinite_steps"] == 0.0  # the last iteration trained normally
    assert is_complete_hf_folder(tmp_path / "policy")


def validations(stop: JudgeAgreementStop, readings: list[tuple[float, float] | None]) -> list[bool]:
    """Feed ``stop`` one validation per reading ((policy rho, reference rho), or None: no judge);
    whether the run was told to stop after each."""
    stopped = []
    for reading in readings:
        metrics = {} if reading is None else {"eval/reward_gold_spearman": torch.tensor(reading[0]),
                                              "eval/ref_reward_gold_spearman": torch.tensor(reading[1])}
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics, should_stop=False)
        stop.on_validation_end(trainer, SimpleNamespace(iteration=len(stopped)))
        stopped.append(trainer.should_stop)
    return stopped


def test_judge_agreement_stop_fires_when_the_reward_model_stops_agreeing_with_the_judge():
    # the validation readings of PPO on sentiment, seed 0: 0.45 >= 0.5 x 0.83 goes on, 0.37 stops
    assert validations(JudgeAgreementStop(ratio=0.5), [(0.81, 0.83), (0.45, 0.83), (0.37, 0.83)]) == [False, False, True]
    assert validations(JudgeAgreementStop(ratio=0.8), [(0.81, 0.83), (0.63, 0.83)]) == [False, True]


def test_judge_agreement_stop_patience_counts_validations_in_a_row_and_survives_a_checkpoint():
    stop = JudgeAgreementStop(ratio=0.5, patience=2)
    assert validations(stop, [(0.1, 0.8), (0.7, 0.8), (0.1, 0.8)]) == [False, False, False]  # the streak broke
    resumed = JudgeAgreementStop(ratio=0.5, patience=2)
    resumed.load_state_dict(stop.state_dict())
    assert validations(resumed, [(0.1, 0.8)]) == [True]


def test_judge_agreement_stop_needs_a_reward_model_that_agreed_and_a_judge():
    assert validations(JudgeAgreementStop(), [(-0.3, 0.0), (-0.5, -0.2)]) == [False, False]
    with pytest.warns(UserWarning, match="give PPOModule a judge"):
        assert validations(JudgeAgreementStop(), [None, None]) == [False, False]
    with pytest.raises(UserInputError, match="0 < ratio <= 1"):
        JudgeAgreementStop(ratio=1.5)


class DisagreeingJudge(PPOModule):
    """Logs the two correlations a validation with a judge logs, as a reward model that has
    stopped agreeing with the judge would give them."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("eval/reward_gold_spearman", 0.1)
        self.log("eval/ref_reward_gold_spearman", 0.8)


def test_judge_agreement_stop_ends_a_real_run_at_that_validation_and_exports(byte_gpt2_dir: Path, tmp_path: Path):
    module = small_ppo(byte_gpt2_dir, tmp_path, cls=DisagreeingJudge, max_iterations=4)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      max_epochs=-1, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                      callbacks=[JudgeAgreementStop(ratio=0.5)])
    with pytest.warns(UserWarning, match="JudgeAgreementStop.*stopping here"):
        trainer.fit(module, datamodule=PromptDataModule(batch_size=4, val_batch_size=4, max_length=64))
    assert module.iteration == 2  # the first validation, not max_iterations
    assert is_complete_hf_folder(tmp_path / "policy") and is_complete_hf_folder(tmp_path / "critic")

