"""examples/ppo_minimal.py gives the same PPO update as PPOModule on the same batch.

The module runs one iteration under a real ``Trainer.fit``, recording its starting weights, the
RNG state and the batch at the start of ``training_step``; the example then replays that
iteration from the same state, and the rollouts and the updated weights must agree.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.testing import assert_close

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.models import byte_tokenizer, load_sequence_scorer, load_tokenizer, save_hf_folder
from rlhf_lightning.modules import KLSettings, PPOModule, PPOSettings, ScoreSettings

from .conftest import load_script, save_tiny_gpt2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_minimal.py"
EXACT = dict(atol=1e-6, rtol=0.0)


def load_example():
    return load_script(EXAMPLE, "ppo_minimal")


class RecordingPPO(PPOModule):
    """Keeps what a replay of the first iteration needs: weights, RNG state, batch, rollout."""

    def training_step(self, batch, batch_idx):
        if not hasattr(self, "start"):
            self.start = {
                "rng": torch.get_rng_state(),
                "prompt_ids": batch["prompt_ids"].clone(), "prompt_mask": batch["prompt_mask"].clone(),
                "policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
                "critic": {k: v.detach().clone() for k, v in self.critic.state_dict().items()},
                "kl_coef": self.kl_controller.value,
            }
        return super().training_step(batch, batch_idx)

    def rollout(self, batch):
        self.recorded = super().rollout(batch)
        return self.recorded


def module_from(args, tmp_path: Path) -> RecordingPPO:
    """A PPO module with exactly the example's settings."""
    return RecordingPPO(
        policy=args.policy, reference=args.reference, reward_model=args.reward_model, learning_rate=args.learning_rate, lr_scheduler="linear",
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
        ppo=PPOSettings(epochs=args.epochs, num_minibatches=args.num_minibatches, cliprange=args.cliprange,
                        cliprange_value=args.cliprange_value, vf_coef=args.vf_coef, max_grad_norm=args.max_grad_norm,
                        gamma=args.gamma, lam=args.lam),
        kl=KLSettings(coef=args.kl_coef),
        scores=ScoreSettings(missing_eos_penalty=args.missing_eos_penalty, missing_eos_mode=args.missing_eos_mode),
        max_iterations=args.iterations, forward_batch_size=args.batch_size, reward_batch_size=args.batch_size,
        policy_export_dir=None, critic_export_dir=None,
    )


def test_example_gives_the_same_update_as_the_module(tmp_path: Path, byte_gpt2_dir: Path):
    example = load_example()
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    torch.manual_seed(1)
    reward_dir = save_hf_folder(tmp_path / "rm", load_sequence_scorer(str(byte_gpt2_dir), tokenizer), tokenizer)
    reference_dir = save_tiny_gpt2(tmp_path / "reference", byte_tokenizer(), seed=2)  # another policy: the KL is not 0
    # Non-default values everywhere, so that a setting read differently on one side shows; a high
    # learning rate, so that both clipped terms are active after the first optimiser step.
    args = example.Args(
        policy=str(byte_gpt2_dir), reference=str(reference_dir), reward_model=str(reward_dir), iterations=1, batch_size=8, learning_rate=3e-2,
        max_new_tokens=8, temperature=0.7, kl_coef=0.3, missing_eos_penalty=0.5, missing_eos_mode="subtract",
        gamma=0.97, lam=0.9, epochs=2, num_minibatches=2, cliprange=0.1, cliprange_value=0.1, vf_coef=0.4,
        max_grad_norm=0.5,
    )

    module = module_from(args, tmp_path)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=PromptDataModule(batch_size=args.batch_size, max_length=64))
    assert module.iteration == 1 and trainer.global_step == args.epochs * args.num_minibatches
    metrics = trainer.callback_metrics
    assert metrics["policy/clipfrac_avg"] > 0 and metrics["val/clipfrac_avg"] > 0  # cliprange and cliprange_value matter

    # The example's own setup starts from the module's starting point.
    start, expected = module.start, module.recorded
    assert start["kl_coef"] == args.kl_coef
    policy, reference, critic, score_fn = example.load_models(args, tokenizer)
    for model, state in ((policy, start["policy"]), (critic, start["critic"])):
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), name
    optimizer, scheduler = example.make_optimizer(args, policy, critic)

    torch.set_rng_state(start["rng"])
    out = example.ppo_iteration(args, policy, reference, critic, score_fn, tokenizer, start["prompt_ids"],
                                start["prompt_mask"], optimizer, scheduler)

    # (a) The same experience: the same tokens sampled, the same statistics of them.
    assert torch.equal(out["response_ids"], expected.response_ids)
    assert torch.equal(out["response_mask"], expected.response_mask)
    assert not expected.contains_eos.all()  # the missing-EOS rule is exercised
    assert expected.kl[expected.response_mask].abs().min() > 0  # and the KL penalty
    for name in ("logprobs", "ref_logprobs", "values", "scores", "kl", "rewards", "advantages", "returns"):
        assert_close(out[name], getattr(expected, name), **EXACT, msg=lambda m, name=name: f"{name}: {m}")

    # (b) The same update of the policy and the critic, and the same learning rate afterwards.
    for mine, theirs, state in ((policy, module.policy, start["policy"]), (critic, module.critic, start["critic"])):
        theirs = dict(theirs.named_parameters())
        moved = False
        for name, value in mine.named_parameters():
            assert_close(value, theirs[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")
            moved |= not torch.equal(value, state[name])
        assert moved, "the update changed no weight"
    assert optimizer.param_groups[0]["lr"] == module.optimizers().param_groups[0]["lr"]
