"""Critic-free advantage estimators on the PPO rollout: GRPO, Dr. GRPO, RLOO, REINFORCE++.

What is checked: each estimator's advantages for a hand-made group, the KL term in the loss,
that a critic-free run has no critic anywhere, and that every estimator resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning import rlhf_math as pm
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.guards import ExplainedVarianceGuard
from rlhf_lightning.models import is_complete_hf_folder, load_causal_lm, load_tokenizer
from rlhf_lightning.modules import KLSettings, PPOModule, PPOSettings, ScoreSettings
from rlhf_lightning.forwards import response_logprobs
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.rollout import RolloutLoop

from .test_ppo import EOS, PAD, fake_generation, fit, small_ppo

# Two prompts, four responses each (consecutive rows), every response 2 tokens long + 1 pad.
SCORES = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]
# The advantage of each response, the same on both of its tokens (kl_coef 0, gamma 1):
HAND_ADVANTAGES = {
    # group mean / unbiased std + 1e-4: group 1 mean 3, deviations [-2, -1, 0, 3], std sqrt(14/3) = 2.160247;
    # group 2 mean 1, deviations [-1, -1, -1, 3], std sqrt(12/3) = 2 -> / 2.0001
    "grpo": [-0.925777, -0.462889, 0.0, 1.388666, -0.499975, -0.499975, -0.499975, 1.499925],
    # Dr. GRPO: the deviations from the group mean, unscaled
    "dr_grpo": [-2.0, -1.0, 0.0, 3.0, -1.0, -1.0, -1.0, 3.0],
    # leave-one-out: group 1 [1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3] = [-8/3, -4/3, 0, 4], group 2
    # [-4/3, -4/3, -4/3, 4]; return-to-go = that on both tokens; over the 16 tokens mean 0, sum of
    # squares 2 * (224/9 + 192/9) = 832/9, unbiased std sqrt(832/135) = 2.482532 -> / 2.482532
    "rloo": [-1.074172, -0.537086, 0.0, 1.611258, -0.537086, -0.537086, -0.537086, 1.611258],
    # return-to-go = the raw score on both tokens; mean 2, deviations [-1, 0, 1, 4, -2, -2, -2, 2],
    # sum of squares 2 * 34 = 68, unbiased std sqrt(68/15) = 2.129163 -> / 2.129163
    "reinforce_pp": [-0.469668, 0.0, 0.469668, 1.878673, -0.939336, -0.939336, -0.939336, 0.939336],
}


def loop_without_critic(policy_dir: Path, scores: list[float], estimator: str) -> RolloutLoop:
    tokenizer = load_tokenizer(str(policy_dir))
    policy = load_causal_lm(str(policy_dir), tokenizer)
    return RolloutLoop(policy=policy, reference=policy, critic=None, score_fn=lambda r: torch.tensor(scores),
                       tokenizer=tokenizer, generation=GenerationSettings(max_new_tokens=3), group_size=4,
                       advantage_estimator=estimator)


@pytest.mark.parametrize("estimator", sorted(HAND_ADVANTAGES))
def test_rollout_advantages_of_a_hand_made_group(monkeypatch, byte_gpt2_dir: Path, estimator: str):
    fake_generation(monkeypatch, torch.tensor([[50, EOS, PAD]] * 8))
    loop = loop_without_critic(byte_gpt2_dir, SCORES, estimator)
    prompt_ids = torch.full((8, 2), 70)
    batch = loop.run(prompt_ids, torch.ones_like(prompt_ids), kl_coef=0.0)
    expected = torch.tensor(HAND_ADVANTAGES[estimator]).unsqueeze(1)
    torch.testing.assert_close(batch.advantages[:, :2], expected.expand(8, 2), atol=1e-5, rtol=0)
    assert (batch.advantages[:, 2] == 0).all()  # padding
    assert batch.scores.tolist() == SCORES  # the raw scores; rloo's baseline is only in the rewards
    assert (batch.values == 0).all() and (batch.returns == 0).all()  # no critic


def test_rloo_shapes_the_leave_one_out_scores_and_gae_is_unchanged(monkeypatch, byte_gpt2_dir: Path):
    fake_generation(monkeypatch, torch.tensor([[50, EOS, PAD]] * 8))
    loop = loop_without_critic(byte_gpt2_dir, SCORES, "rloo")
    prompt_ids = torch.full((8, 2), 70)
    batch = loop.run(prompt_ids, torch.ones_like(prompt_ids), kl_coef=0.0)
    loo = [-8 / 3, -4 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    torch.testing.assert_close(batch.rewards[:, 1], torch.tensor(loo))  # at the last real token
    # gae: the critic's values, GAE, then whitening (the default path, for contrast)
    rewards, values, mask = batch.rewards, torch.full_like(batch.rewards, 0.5), batch.response_mask
    gae_loop = loop_without_critic(byte_gpt2_dir, SCORES, "gae")
    advantages, returns = gae_loop.estimate_advantages(torch.tensor(loo), rewards, values, mask)
    expected, expected_returns = pm.gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(advantages, pm.masked_whiten(expected, mask))
    torch.testing.assert_close(returns, expected_returns)


def test_estimator_settings_are_checked(tmp_path: Path, byte_gpt2_dir: Path):
    cases = [
        (dict(ppo=PPOSettings(advantage_estimator="ppo")), "advantage_estimator must be one of"),
        (dict(ppo=PPOSettings(loss_reduction="sum")), "loss_reduction must be one of"),
        (dict(ppo=PPOSettings(advantage_estimator="rloo")), r"samples_per_prompt must be >= 2 to compare the responses to one prompt \(ppo.advantage_estimator rloo.*got 1"),
        (dict(ppo=PPOSettings(advantage_estimator="grpo", samples_per_prompt=2), scores=ScoreSettings(baseline="leave_one_out")),
         "scores.baseline leave_one_out is for .* gae or reinforce_pp: grpo has its own baseline"),
        (dict(ppo=PPOSettings(advantage_estimator="dr_grpo", samples_per_prompt=2, loss_reduction="sequence_mean"),
              kl=KLSettings(in_loss=True)), "dr_grpo uses the constant loss reduction"),
        (dict(ppo=PPOSettings(advantage_estimator="dr_grpo", samples_per_prompt=2, loss_reduction="token_mean"),
              kl=KLSettings(in_loss=True)), "dr_grpo uses the constant loss reduction"),
        (dict(ppo=PPOSettings(advantage_estimator="grpo", samples_per_prompt=2)), "KL penalty in the reward would be ignored"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            small_ppo(byte_gpt2_dir, tmp_path, **overrides)
    # the allowed neighbours of those cases
    small_ppo(byte_gpt2_dir, tmp_path, ppo=PPOSettings(advantage_estimator="grpo", samples_per_prompt=2), kl=KLSettings(coef=0.0))
    small_ppo(byte_gpt2_dir, tmp_path, ppo=PPOSettings(advantage_estimator="reinforce_pp", samples_per_prompt=2),
              scores=ScoreSettings(baseline="leave_one_out"))
    dr_grpo = small_ppo(byte_gpt2_dir, tmp_path, ppo=PPOSettings(advantage_estimator="dr_grpo", samples_per_prompt=2),
                        kl=KLSettings(in_loss=True))
    assert dr_grpo.loss_reduction == "constant"
    assert small_ppo(byte_gpt2_dir, tmp_path).loss_reduction == "token_mean"  # the default of the others


def test_kl_in_the_loss_not_in_the_reward(tmp_path: Path, byte_gpt2_dir: Path):
    rollouts = []

    class Recording(PPOModule):
        def ppo_update(self, rollout):
            rollouts.append(rollout)
            return super().ppo_update(rollout)

    seed_everything(0)
    beta = 0.5
    module = small_ppo(byte_gpt2_dir, tmp_path, cls=Recording, kl=KLSettings(coef=beta, in_loss=True),
                       ppo=PPOSettings(advantage_estimator="dr_grpo", samples_per_prompt=2, epochs=1, num_minibatches=2))
    trainer = fit(module, iterations=2)
    rollout = rollouts[-1]
    mask = rollout.response_mask
    # the reward is the score at the last real token and nothing else ...
    last = torch.nn.functional.one_hot(pm.last_token_index(mask), mask.shape[1]).bool()
    assert torch.equal(rollout.rewards, torch.where(last, rollout.scores.unsqueeze(1), 0.0))
    assert (rollout.non_score_reward == 0).all()
    # ... while the KL to the reference is still measured (the policy moved in iteration 1)
    assert pm.masked_sum(rollout.kl, mask).abs() > 0
    metrics = trainer.callback_metrics
    assert metrics["objective/kl"] != 0 and metrics["objective/non_score_reward"] == 0
    assert metrics["loss/kl_avg"] > 0

    # The loss adds beta * k3, reduced like dr_grpo's policy loss: sum / (rows * max_new_tokens).
    loss, stats = module.minibatch_loss(rollout, with_entropy=False)
    module.kl.in_loss = False
    loss_without, _ = module.minibatch_loss(rollout, with_entropy=False)
    module.kl.in_loss = True
    logprobs, _ = response_logprobs(module.policy, rollout.input_ids, rollout.attention_mask, mask.shape[1], 1.0)
    k3 = pm.kl_penalty(logprobs.detach(), rollout.ref_logprobs, "k3")
    torch.testing.assert_close(stats["loss/kl_avg"], pm.masked_sum(k3, mask) / (len(rollout) * 8))
    torch.testing.assert_close(loss - loss_without, beta * stats["loss/kl_avg"])
    # Its gradient flows through the policy's log-probs, towards the reference: one step along it
    # lowers the KL term clearly (a detached term would leave only rounding noise).
    (loss - loss_without).backward()
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    _, after = module.minibatch_loss(rollout, with_entropy=False)
    assert after["loss/kl_avg"] < 0.95 * stats["loss/kl_avg"]


def resume_settings(estimator: str) -> dict:
    in_loss = estimator in ("grpo", "dr_grpo")
    return dict(ppo=PPOSettings(advantage_estimator=estimator, samples_per_prompt=2, epochs=1, num_minibatches=2),
                kl=KLSettings(coef=0.1, target=0.5, horizon=100, in_loss=in_loss))


@pytest.mark.parametrize("estimator", ["gae", "reinforce_pp", "rloo", "grpo", "dr_grpo"])
def test_each_estimator_trains_and_resumes_exactly(tmp_path: Path, byte_gpt2_dir: Path, estimator: str):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    seed_everything(0)
    straight = small_ppo(byte_gpt2_dir, straight_dir, **resume_settings(estimator))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = fit(straight, iterations=2, callbacks=[checkpoints])
    assert straight.kl_controller.value != 0.1  # the adaptive controller works, KL in the reward or in the loss

    # Only gae has a critic: model, optimiser group, checkpoint entry, export, metrics, guard.
    has_critic = estimator == "gae"
    assert (straight.critic is not None) == has_critic
    groups = straight.optimizers().param_groups
    assert len(groups) == (2 if has_critic else 1)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in straight.policy.parameters()]
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    assert any(key.startswith("critic.") for key in checkpoint["state_dict"]) == has_critic
    assert is_complete_hf_folder(straight_dir / "policy")
    assert (straight_dir / "critic").exists() == has_critic
    metrics = trainer.callback_metrics
    for name in ("val/explained_variance", "loss/value_avg", "val/clipfrac_avg"):
        assert (name in metrics) == has_critic, name
    assert any(isinstance(c, ExplainedVarianceGuard) for c in trainer.callbacks) == has_critic
    assert torch.isfinite(metrics["loss/policy_avg"]) and metrics["policy/first_ratio_dev"] < 1e-5

    resumed = small_ppo(byte_gpt2_dir, resumed_dir, **resume_settings(estimator))
    resumed.hparams.max_iterations = 2
    Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0).fit(
        resumed, datamodule=PromptDataModule(batch_size=8, max_length=64), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert resumed.iteration == 2 and resumed.kl_controller.value == straight.kl_controller.value
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize("demo", ["grpo", "rloo", "reinforce_pp", "ppo_exact_reward"])
def test_demo_config_fast_dev_run(tmp_path: Path, monkeypatch, byte_gpt2_dir: Path, demo: str):
    from rlhf_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / f"{demo}.yaml"
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=true", f"--model.init_args.policy={byte_gpt2_dir}",
            "--model.init_args.generation.max_new_tokens=8", "--data.init_args.val_batch_size=4"]
    if demo != "ppo_exact_reward":  # that one scores with its own reward_fn (the demo task's judge)
        args += ["--model.init_args.reward_model=null", "--model.init_args.reward_fn=rlhf_lightning.tasks.gold_rewards"]
    assert main(args) == 0  # the config passes the module's checks and trains one iteration
    assert not (tmp_path / f"outputs/demo/{demo}/policy").exists()  # smoke runs never export


def test_a_bad_estimator_setting_is_one_line_naming_the_key(capsys):
    from rlhf_lightning.cli import main

    code = main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "grpo.yaml"),
                 "--model.init_args.ppo.samples_per_prompt=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("error: model.init_args.ppo.samples_per_prompt must be >= 2") and "advantage_estimator grpo" in err
