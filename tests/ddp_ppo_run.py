"""Run by tests/test_ppo_ddp.py: two PPO iterations under DDP (2 CPU processes, gloo).

Each rank writes a checksum of its policy weights and its number of optimiser steps.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.modules import PPOModule, PPOSettings
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.tasks import gold_rewards

if __name__ == "__main__":
    policy, out = sys.argv[1], Path(sys.argv[2])
    seed_everything(0)
    module = PPOModule(policy=policy, reward_fn=gold_rewards, max_iterations=2,
                       generation=GenerationSettings(max_new_tokens=8), ppo=PPOSettings(epochs=1, num_minibatches=2),
                       learning_rate=1e-3, policy_export_dir=None, critic_export_dir=None)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=PromptDataModule(batch_size=4, max_length=64))
    checksum = sum(float(p.double().sum()) for p in module.policy.parameters())
    critic = sum(float(p.double().sum()) for p in module.critic.parameters())
    (out / f"rank{trainer.global_rank}.txt").write_text(f"{checksum!r} {critic!r} {trainer.global_step} {module.episode}")
    # Each rank's own RNG state must reach the checkpoint (rank 1 draws once more, so they differ).
    if trainer.global_rank == 1:
        torch.rand(1)
    torch.save(torch.get_rng_state(), out / f"rng{trainer.global_rank}.pt")
    trainer.save_checkpoint(out / "last.ckpt")
