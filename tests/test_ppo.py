"""The PPO stage: rollout rules, the ratio-is-1 sanity, rewards, KL control, resume, export."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_lightning import generation as generation_module
from rlhf_lightning.checkpoint_io import IterationCheckpoint
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.forwards import causal_lm_logits, response_logprobs, takes_logits_to_keep
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.lora import backbone
from rlhf_lightning.models import (
    is_complete_hf_folder,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    save_hf_folder,
)
from rlhf_lightning.modules import KLSettings, PPOModule, PPOSettings, ScoreSettings
from rlhf_lightning.rlhf_math import leave_one_out_scores, logprobs_from_logits
from rlhf_lightning.rollout import RolloutLoop
from rlhf_lightning.tasks import gold_rewards
from rlhf_lightning.tasks.sentiment import judge

from .conftest import bpe_tokenizer_without_pad, save_tiny_gpt2

EOS, PAD = 1, 0


@pytest.fixture
def reward_dir(tmp_path: Path, byte_gpt2_dir: Path) -> Path:
    """A reward-model folder (scalar head) sharing the policy's byte tokenizer."""
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    torch.manual_seed(1)
    return save_hf_folder(tmp_path / "rm", load_sequence_scorer(str(byte_gpt2_dir), tokenizer), tokenizer)


@pytest.fixture
def bpe_reward_dir(tmp_path: Path) -> Path:
    """A reward model with a different (BPE) tokenizer from the policy's."""
    folder = save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad())
    tokenizer = load_tokenizer(str(folder))
    return save_hf_folder(tmp_path / "bpe-rm", load_sequence_scorer(str(folder), tokenizer), tokenizer)


def small_ppo(policy: Path, tmp_path: Path, cls: type[PPOModule] = PPOModule, **overrides) -> PPOModule:
    settings = dict(
        policy=str(policy), learning_rate=1e-3, generation=GenerationSettings(max_new_tokens=8),
        ppo=PPOSettings(epochs=2, num_minibatches=2), policy_export_dir=str(tmp_path / "policy"),
        critic_export_dir=str(tmp_path / "critic"), forward_batch_size=3,
    )
    settings.update(overrides)
    if not settings.keys() & {"reward_model", "reward_fn", "implicit_reward"}:
        settings["reward_fn"] = gold_rewards
    return cls(**settings)


def fit(module: PPOModule, iterations: int, tmp_path: Path | None = None, **trainer_kwargs) -> Trainer:
    module.hparams.max_iterations = iterations
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in trainer_kwargs.get("callbacks", []))
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = Trainer(logger=False, enable_checkpointing=checkpointing,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, datamodule=PromptDataModule(batch_size=8, max_length=64))
    return trainer


def fake_generation(monkeypatch, responses: torch.Tensor) -> None:
    monkeypatch.setattr(generation_module, "generate_responses", lambda model, ids, mask, config, **kw: responses.clone())


def make_loop(byte_gpt2_dir: Path, score_fn, **kwargs) -> RolloutLoop:
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    policy = load_causal_lm(str(byte_gpt2_dir), tokenizer)
    return RolloutLoop(policy=policy, reference=load_causal_lm(str(byte_gpt2_dir), tokenizer),
                       critic=load_sequence_scorer(str(byte_gpt2_dir), tokenizer), score_fn=score_fn,
                       tokenizer=tokenizer, generation=GenerationSettings(max_new_tokens=4), **kwargs)


def test_rollout_truncates_after_first_eos_and_scores_last_token(monkeypatch, byte_gpt2_dir: Path):
    # Row 0 stops at position 1; row 1 never emits EOS; tokens after EOS are garbage.
    fake_generation(monkeypatch, torch.tensor([[50, EOS, 60, 70], [50, 51, 52, 53]]))
    seen = {}

    def score_fn(responses):
        seen["completions"] = responses.completions
        return torch.tensor([2.0, 3.0])

    loop = make_loop(byte_gpt2_dir, score_fn, missing_eos_penalty=-1.0)
    prompt_ids = torch.tensor([[PAD, 70, 71], [72, 73, 74]])
    batch = loop.run(prompt_ids, (prompt_ids != PAD).long(), kl_coef=0.0)
    assert batch.response_ids.tolist() == [[50, EOS, PAD, PAD], [50, 51, 52, 53]]
    assert batch.response_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert seen["completions"] == ["/", "/012"]  # byte ids are offset by 3; EOS and padding dropped
    assert batch.contains_eos.tolist() == [True, False]
    assert batch.scores.tolist() == [2.0, -1.0]  # the missing-EOS penalty replaced row 1's score
    # With kl_coef 0, the whole reward is the score, placed on the last real token.
    assert batch.rewards.tolist() == [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]
    assert (batch.advantages[~batch.response_mask] == 0).all()
    assert (batch.logprobs[~batch.response_mask] == 0).all()


def test_rollout_logprobs_match_unpadded_forward(monkeypatch, byte_gpt2_dir: Path):
    fake_generation(monkeypatch, torch.tensor([[40, 41, EOS], [42, EOS, PAD]]))
    loop = make_loop(byte_gpt2_dir, lambda r: torch.zeros(2))
    prompt_ids = torch.tensor([[PAD, PAD, 70, 71], [72, 73, 74, 75]])
    batch = loop.run(prompt_ids, (prompt_ids != PAD).long(), kl_coef=0.1)
    # Row 0 alone, without its left padding, must give the same log-probs (position ids!).
    ids = torch.tensor([[70, 71, 40, 41, EOS]])
    with torch.no_grad():
        alone = torch.log_softmax(loop.policy(ids).logits[0, 1:-1], -1).gather(-1, ids[0, 2:, None]).squeeze(-1)
    assert torch.allclose(batch.logprobs[0], alone, atol=1e-5)
    # Policy == reference: KL is 0 and the shaped reward is the score alone.
    assert torch.allclose(batch.kl, torch.zeros_like(batch.kl), atol=1e-6)


# Left-padded prompts, then right-padded responses of 3 tokens (ids below every test vocabulary's size).
PADDED_IDS = torch.tensor([[PAD, PAD, 70, 71, 40, 41, EOS], [72, 73, 74, 75, 42, EOS, PAD]])
PADDED_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])


def response_logprobs_and_head_rows(
    model: torch.nn.Module, head: torch.nn.Module, response_length: int = 3
) -> tuple[torch.Tensor, list[int]]:
    """``response_logprobs`` of PADDED_IDS (temperature 0.7) and the positions each call of the
    output head ``head`` computed logits for; checks the log-probs against the full forward's."""
    head_rows = []
    hook = head.register_forward_hook(lambda module, args, output: head_rows.append(output.shape[1]))
    try:
        with torch.no_grad():
            logprobs, logits = response_logprobs(model, PADDED_IDS, PADDED_MASK, response_length, 0.7)
            full = causal_lm_logits(model, PADDED_IDS, PADDED_MASK)[:, -response_length - 1 : -1]
    finally:
        hook.remove()
    expected = logprobs_from_logits(full, PADDED_IDS[:, -response_length:], 0.7)
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, full, atol=1e-6, rtol=0)
    return logprobs, head_rows[:-1]  # the last call was the full forward


class FullLogitsOnly(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "qwen2"])
def test_response_logprobs_compute_logits_only_at_the_response(architecture: str):
    torch.manual_seed(0)
    shape = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    model = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=2, eos_token_id=EOS)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**shape)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape)),
    }[architecture]().eval()
    assert takes_logits_to_keep(model)
    logprobs, head_rows = response_logprobs_and_head_rows(model, model.get_output_embeddings())
    assert head_rows == [3 + 1]  # the response's 3 predictions and the last position's
    # A model without logits_to_keep gets the full forward, sliced: the same log-probs.
    wrapped = FullLogitsOnly(model)
    assert not takes_logits_to_keep(wrapped)
    fallback, head_rows = response_logprobs_and_head_rows(wrapped, model.get_output_embeddings())
    assert head_rows == [PADDED_IDS.shape[1]]
    torch.testing.assert_close(fallback, logprobs, atol=1e-6, rtol=0)


def test_ratio_is_one_in_first_minibatch_and_metrics_logged(tmp_path: Path, byte_gpt2_dir: Path, reward_dir: Path):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=str(reward_dir))
    trainer = fit(module, iterations=1)
    metrics = trainer.callback_metrics
    assert metrics["policy/first_ratio_dev"].item() < 1e-5
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "objective/kl_coef", "policy/approxkl_avg", "policy/clipfrac_avg",
                 "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                 "val/ratio_var", "val/num_eos_tokens", "lr", "episode", "time/rollout_s", "time/tokens_per_s"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["episode"].item() == 8
    assert trainer.global_step == 2 * 2  # optimiser steps: epochs * minibatches per iteration
    # The critic starts from the reward model when tokenizers agree; both are exported.
    assert is_complete_hf_folder(tmp_path / "policy") and is_complete_hf_folder(tmp_path / "critic")


def fit_counting_block_forwards(module: PPOModule, iterations: int) -> tuple[dict[str, torch.Tensor], Counter]:
    """Fit ``module`` from seed 0; its weights afterwards, and how often the first layer norm of
    the policy and of the critic ran with gradients on (a checkpointed block's forward runs again
    in the backward: its layers' hooks see it, the block's own do not)."""
    seed_everything(0)
    module.configure_model()
    calls: Counter = Counter()
    for name, model in (("policy", module.policy), ("critic", module.critic)):
        backbone(model).h[0].ln_1.register_forward_pre_hook(
            lambda layer, args, name=name: calls.update([name] if torch.is_grad_enabled() else []))
    fit(module, iterations)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, calls


def assert_checkpointing_changes_nothing_but_the_recompute(byte_gpt2_dir: Path, tmp_path: Path, **settings) -> float:
    """Two PPO iterations (2 epochs x 2 minibatches each) with and without gradient checkpointing
    end with the same weights; returns the largest weight difference."""
    plain, plain_calls = fit_counting_block_forwards(small_ppo(byte_gpt2_dir, tmp_path / "plain", **settings), 2)
    checkpointed, calls = fit_counting_block_forwards(
        small_ppo(byte_gpt2_dir, tmp_path / "checkpointed", gradient_checkpointing=True, **settings), 2)
    assert plain_calls == {"policy": 8, "critic": 8}  # one training forward per minibatch
    assert calls == {"policy": 16, "critic": 16}  # and once more in each backward
    assert plain.keys() == checkpointed.keys()
    difference = max((plain[k].float() - checkpointed[k].float()).abs().max().item() for k in plain)
    assert difference <= 1e-6
    return difference


def test_gradient_checkpointing_gives_the_same_ppo_update(tmp_path: Path, byte_gpt2_dir: Path):
    assert_checkpointing_changes_nothing_but_the_recompute(byte_gpt2_dir, tmp_path)


def test_policy_changes_and_reward_model_stays_frozen(tmp_path: Path, byte_gpt2_dir: Path, reward_dir: Path):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=str(reward_dir))
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in module.reward_model.state_dict().items()}
    fit(module, iterations=2)
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    assert all(torch.equal(frozen_before[k], v) for k, v in module.reward_model.state_dict().items())


def test_reward_model_with_other_tokenizer_works(tmp_path: Path, byte_gpt2_dir: Path, bpe_reward_dir: Path):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=str(bpe_reward_dir))
    trainer = fit(module, iterations=1)
    assert not module.reward_scorer.shares_tokens
    assert torch.isfinite(trainer.callback_metrics["objective/scores"])
    # The critic cannot read the policy's tokens with the RM's vocabulary: it starts from the policy.
    assert module.critic.get_input_embeddings().num_embeddings == module.policy.get_input_embeddings().num_embeddings


def test_raising_reward_callable_is_a_clear_error(tmp_path: Path, byte_gpt2_dir: Path):
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_fn=lambda p, c: 1 / 0)
    with pytest.raises(RuntimeError, match="reward function .* failed: division by zero"):
        fit(module, iterations=1)
    assert not (tmp_path / "policy").exists()


def test_subclass_overrides_compute_scores(tmp_path: Path, byte_gpt2_dir: Path):
    class LengthReward(PPOModule):
        def compute_scores(self, responses):
            return responses.response_mask.sum(1).float()

    seed_everything(0)
    module = LengthReward(policy=str(byte_gpt2_dir), generation=GenerationSettings(max_new_tokens=8),
                          ppo=PPOSettings(epochs=1, num_minibatches=2), policy_export_dir=None, critic_export_dir=None)
    trainer = fit(module, iterations=1)
    assert 1.0 <= trainer.callback_metrics["objective/scores"].item() <= 8.0


def test_adaptive_kl_and_resume_restore_state(tmp_path: Path, byte_gpt2_dir: Path):
    seed_everything(0)
    kl = KLSettings(coef=0.2, target=0.01, horizon=100)
    module = small_ppo(byte_gpt2_dir, tmp_path, kl=kl, scores=ScoreSettings(missing_eos_penalty=-1.0))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(module, iterations=2, callbacks=[checkpoint])
    assert module.kl_controller.value != 0.2  # adapted: observed KL differs from the target
    first = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    state = first["ppo_state"]
    assert state["iteration"] == 1 and state["episode"] == 8

    resumed = small_ppo(byte_gpt2_dir, tmp_path, kl=kl)
    resumed.hparams.max_iterations = 2
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    seen = {}

    original = resumed.ppo_update

    def spy(rollout):
        seen.setdefault("kl_coef", resumed.kl_controller.value)
        seen.setdefault("iteration", resumed.iteration)
        seen.setdefault("adam_step", resumed.optimizers().optimizer.state_dict()["state"][0]["step"].item())
        return original(rollout)

    resumed.ppo_update = spy
    trainer.fit(resumed, datamodule=PromptDataModule(batch_size=8, max_length=64),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert seen["kl_coef"] == pytest.approx(state["kl_controller"]["value"])
    assert seen["iteration"] == 1
    assert seen["adam_step"] == 4  # the optimiser state came back with the weights
    assert resumed.iteration == 2 and resumed.episode == 16


def test_checkpoints_every_n_ppo_iterations_and_resume_with_their_state(tmp_path: Path, byte_gpt2_dir: Path):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path)  # 2 epochs x 2 minibatches: 4 optimiser steps per iteration
    checkpoint = IterationCheckpoint(dirpath=tmp_path / "ckpt", every_n_iterations=2, save_top_k=-1)
    fit(module, iterations=4, callbacks=[checkpoint])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=16.ckpt", "epoch=0-step=8.ckpt"]
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=False)
    assert saved["ppo_state"]["iteration"] == 2
    # The cadence is set before Lightning restores callback states (their key holds it): a resumed
    # run's callback finds its own state in the checkpoint.
    resumed_callback = IterationCheckpoint(dirpath=tmp_path / "ckpt2", every_n_iterations=2, save_top_k=-1)
    resumed = small_ppo(byte_gpt2_dir, tmp_path)
    resumed.hparams.max_iterations = 4
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[resumed_callback])
    trainer.fit(resumed, datamodule=PromptDataModule(batch_size=8, max_length=64),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")
    assert resumed_callback.state_key in saved["callbacks"]
    assert [p.name for p in (tmp_path / "ckpt2").iterdir()] == ["epoch=0-step=16.ckpt"]


def test_iteration_checkpoint_refuses_step_cadences_and_non_ppo_modules(tmp_path: Path, byte_gpt2_dir: Path):
    with pytest.raises(UserInputError, match="give every_n_iterations, not every_n_train_steps"):
        IterationCheckpoint(every_n_iterations=2, every_n_train_steps=4)
    with pytest.raises(UserInputError, match="every_n_iterations must be >= 1, got 0"):
        IterationCheckpoint(every_n_iterations=0)
    trainer = Trainer(logger=False, max_steps=1)
    with pytest.raises(UserInputError, match="IterationCheckpoint is for PPO modules"):
        IterationCheckpoint().setup(trainer, torch.nn.Linear(1, 1), "fit")


def test_a_run_unbounded_by_iterations_steps_and_epochs_is_refused(tmp_path: Path, byte_gpt2_dir: Path):
    module = small_ppo(byte_gpt2_dir, tmp_path)
    with pytest.raises(UserInputError, match="model.init_args.max_iterations: set how many PPO iterations to run"):
        fit(module, iterations=None, max_epochs=-1)


def test_minibatch_size_must_divide_batch(tmp_path: Path, byte_gpt2_dir: Path):
    module = small_ppo(byte_gpt2_dir, tmp_path, ppo=PPOSettings(num_minibatches=3))
    with pytest.raises(ValueError, match="not divisible"):
        fit(module, iterations=1)


def test_demo_config_fast_dev_run_with_validation(tmp_path: Path, monkeypatch, byte_gpt2_dir: Path, reward_dir: Path):
    from rlhf_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs/demo/ppo.yaml"
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=true",
            f"--model.init_args.policy={byte_gpt2_dir}", f"--model.init_args.reward_model={reward_dir}",
            "--model.init_args.generation.max_new_tokens=8", "--data.init_args.batch_size=8",
            "--data.init_args.val_batch_size=4"]
    assert main(args) == 0
    assert not (tmp_path / "outputs/demo/ppo/policy").exists()  # smoke runs never export


def test_validation_reports_gold_metrics(tmp_path: Path, byte_gpt2_dir: Path, reward_dir: Path):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=str(reward_dir), judge=judge)
    module.hparams.max_iterations = 1
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=PromptDataModule(batch_size=8, val_batch_size=4, max_length=64))
    metrics = trainer.callback_metrics
    assert 0.0 <= metrics["eval/gold_win_rate"].item() <= 1.0
    assert 0.0 <= metrics["eval/validity"].item() <= 1.0
    for name in ("eval/reward_gold_spearman", "eval/ref_reward_gold_spearman"):
        assert -1.0 <= metrics[name].item() <= 1.0, name
    assert metrics["eval/kl"].item() != 0.0  # the policy moved away from the reference
    assert torch.isfinite(metrics["eval/score"]) and torch.isfinite(metrics["eval/ref_gold_score"])


def rollout_texts(module: PPOModule, rollout) -> list[str]:
    return module.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


def test_samples_per_prompt_repeats_each_prompt_in_consecutive_rows(tmp_path: Path, byte_gpt2_dir: Path):
    seen, rollouts = [], []

    class Recording(PPOModule):
        def compute_scores(self, responses):
            seen.append(responses.prompts)
            return torch.tensor([float(len(c)) for c in responses.completions])

        def ppo_update(self, rollout):
            rollouts.append(rollout)
            return super().ppo_update(rollout)

    module = small_ppo(byte_gpt2_dir, tmp_path, cls=Recording, reward_fn=None,
                       ppo=PPOSettings(epochs=1, num_minibatches=2, samples_per_prompt=3),
                       scores=ScoreSettings(baseline="leave_one_out"))
    fit(module, 1)
    prompts = seen[0]
    assert len(prompts) == 8 * 3  # the data module's batch of 8 prompts, three samples each
    assert all(prompts[i] == prompts[i - i % 3] for i in range(len(prompts)))
    assert module.episode == 24
    # the shaped rewards carry each score minus the mean of its group's other scores
    rollout = rollouts[0]
    shaped_scores = (rollout.rewards - rollout.non_score_reward).sum(dim=1)
    torch.testing.assert_close(shaped_scores, leave_one_out_scores(rollout.scores, 3))
    assert rollout.scores.tolist() == [float(len(c)) for c in rollout_texts(module, rollout)]
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2 to compare the responses to one prompt .* scores.baseline leave_one_out"):
        small_ppo(byte_gpt2_dir, tmp_path, scores=ScoreSettings(baseline="leave_one_out"))


def test_a_preset_policy_is_its_own_reference(tmp_path: Path):
    """A preset is drawn at random: the reference is a frozen copy of the policy, not a second draw."""
    module = PPOModule(policy="preset:micro-gpt2", reward_fn=gold_rewards, policy_export_dir=None, critic_export_dir=None)
    module.configure_model()
    policy, reference = module.policy.state_dict(), module.reference.state_dict()
    assert policy.keys() == reference.keys() and all(torch.equal(policy[k], reference[k]) for k in policy)
    assert not any(p.requires_grad for p in module.reference.parameters())
