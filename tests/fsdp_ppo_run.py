"""Run by tests/test_ppo_fsdp.py: PPO under FSDP2 (``ModelParallelStrategy``, 2 CPU processes,
gloo) and the same global batch on 1 process.

    python tests/fsdp_ppo_run.py POLICY PROMPTS OUT single  # 1 process, 8 prompts an iteration
    python tests/fsdp_ppo_run.py POLICY PROMPTS OUT fsdp    # 2 processes x 4 prompts
    python tests/fsdp_ppo_run.py POLICY PROMPTS OUT pause   # the same, waits to be killed after iteration 1
    python tests/fsdp_ppo_run.py POLICY PROMPTS OUT resume  # resumes the killed run from its checkpoint

``fsdp`` runs two PPO iterations (``OUT/full``). ``pause`` runs them with a checkpoint after every
iteration and, once the first is on disk, writes ``OUT/paused`` and sleeps until the test kills
every process with SIGKILL; ``resume`` finishes that run from ``OUT/checkpoints/last.ckpt``
(``OUT/resumed``). Each finished run exports its policy and critic and writes its metrics to
``metrics.json``. Sampling is greedy (``top_k=1``) and every response is
``max_new_tokens`` long, so that one process and two see the same responses and the same means.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy

from rlhf_lightning.checkpoint_io import IterationCheckpoint
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.generation import GenerationSettings, sample
from rlhf_lightning.modules import PPOModule, PPOSettings
from rlhf_lightning.tasks import gold_rewards
from tests.crash_helpers import PauseAtIteration

PROMPTS_PER_ITERATION = 8


class RecordStart(Callback):
    """The PPO iteration training starts from: 0, or the checkpoint's when resuming."""

    def on_train_start(self, trainer, pl_module):
        self.iteration = pl_module.iteration


def fit(policy: str, prompts: str, out: Path, devices: int, callbacks=(), ckpt_path=None) -> PPOModule:
    seed_everything(0)
    module = PPOModule(policy=policy, reward_fn=gold_rewards, max_iterations=2, learning_rate=1e-3,
                       generation=GenerationSettings(max_new_tokens=6, min_new_tokens=6, top_k=1),
                       ppo=PPOSettings(epochs=2, num_minibatches=1), policy_export_dir=str(out / "policy"),
                       critic_export_dir=str(out / "critic"), overwrite_export=True)
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False,
                      enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    data = PromptDataModule(train_file=prompts, val_file=prompts, batch_size=PROMPTS_PER_ITERATION // devices,
                            val_batch_size=2, max_length=64)
    start = RecordStart()
    trainer.callbacks.append(start)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(global_step=trainer.global_step, episode=module.episode, iteration=module.iteration,
                       start_iteration=start.iteration)
        (out / "metrics.json").write_text(json.dumps(metrics))
    return module


def generate_unequal_lengths(module: PPOModule) -> None:
    """Rank r samples 2 + 4r tokens through the one sampling routine (the rollout's and
    validation's) without asking for synced_gpus: generation on the sharded policy must still keep
    every rank's forwards in step."""
    rank = torch.distributed.get_rank()
    prompt_ids = torch.full((2, 3), 65)
    length = 2 + 4 * rank
    responses = sample(module.policy, module.tokenizer, GenerationSettings(max_new_tokens=length, min_new_tokens=length),
                       prompt_ids, torch.ones_like(prompt_ids))
    assert responses.response_ids.shape == (2, length)
    torch.distributed.barrier()  # a rank left behind hangs the run instead of exiting alone


if __name__ == "__main__":
    policy, prompts, out, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    checkpoints = out / "checkpoints"
    if mode == "single":
        fit(policy, prompts, out / "single", devices=1)
    elif mode == "fsdp":
        fit(policy, prompts, out / "full", devices=2)
    elif mode == "pause":
        fit(policy, prompts, out / "killed", devices=2, callbacks=[
            IterationCheckpoint(dirpath=str(checkpoints), save_last=True),
            PauseAtIteration(iteration=1, marker=str(out / "paused"))])
    else:
        module = fit(policy, prompts, out / "resumed", devices=2, ckpt_path=str(checkpoints / "last.ckpt"))
        generate_unequal_lengths(module)
