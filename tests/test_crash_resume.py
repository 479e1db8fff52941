"""Crashes: a PPO run killed with SIGKILL resumes into the very run it would have been, and a
kill during a Hugging Face export leaves no folder that looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_lightning.models import is_complete_hf_folder
from rlhf_lightning.report import read_scalars

from .conftest import wait_for, write_lines

REPO = Path(__file__).resolve().parents[1]
ITERATIONS, KILL_AFTER = 6, 3


def ppo_config(run: Path, policy: Path, pause_marker: Path | None = None) -> Path:
    """A tiny PPO run: checkpoint every iteration (2 optimiser steps), validation every 2,
    adaptive KL (its state must survive), shuffled prompts (their order must survive)."""
    callbacks = [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 2, "save_last": True},
    }]
    if pause_marker is not None:
        callbacks.append({"class_path": "tests.crash_helpers.PauseAtIteration",
                          "init_args": {"iteration": KILL_AFTER, "marker": str(pause_marker)}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "log_every_n_steps": 1, "val_check_interval": 2, "limit_val_batches": 1,
            "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run), "name": "logs", "version": ""}},
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "rlhf_lightning.modules.PPOModule",
            "init_args": {
                "policy": str(policy), "reward_fn": "rlhf_lightning.tasks.gold_rewards", "learning_rate": 1e-3,
                "max_iterations": ITERATIONS, "generation": {"max_new_tokens": 8},
                "ppo": {"epochs": 1, "num_minibatches": 2}, "kl": {"coef": 0.1, "target": 1.0, "horizon": 100},
                "forward_batch_size": 4, "policy_export_dir": str(run / "policy"),
                "critic_export_dir": str(run / "critic"), "judge": "rlhf_lightning.tasks.sentiment.judge",
            },
        },
        "data": {"class_path": "rlhf_lightning.data.PromptDataModule",
                 "init_args": {"batch_size": 8, "val_batch_size": 8, "max_length": 64}},
    }
    path = run / "config.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def python(*args: str) -> subprocess.Popen:
    """``python ARGS`` from the repository root, one thread, with ``tests`` importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cli(*args: str) -> subprocess.Popen:
    return python("-m", "rlhf_lightning.cli", *args)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def training_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged series but wall-clock timings and the logger's per-process hp_metric placeholder."""
    scalars = read_scalars(run)["logs"]
    return {tag: sorted(points) for tag, points in scalars.items() if not tag.startswith("time/") and tag != "hp_metric"}


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, byte_gpt2_dir: Path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    finish(cli("fit", "--config", str(ppo_config(straight, byte_gpt2_dir))))

    marker = tmp_path / "paused"
    process = cli("fit", "--config", str(ppo_config(crashed, byte_gpt2_dir, pause_marker=marker)))
    wait_for(marker, process)
    kill(process)
    assert not (crashed / "policy").exists()
    last = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=False)
    assert last["ppo_state"]["iteration"] == KILL_AFTER
    assert last["PromptDataModule"] == {"epoch": 0, "consumed_batches": KILL_AFTER}
    finish(cli("fit", "--config", str(ppo_config(crashed, byte_gpt2_dir)), "--ckpt_path", str(crashed / "ckpt" / "last.ckpt")))

    expected, resumed = training_scalars(straight), training_scalars(crashed)
    assert "objective/kl_coef" in expected and "eval/gold_score" in expected and "objective/scores" in expected
    assert set(resumed) == set(expected)
    for tag, points in expected.items():
        steps = [step for step, _ in points]
        assert [step for step, _ in resumed[tag]] == steps, tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in points], abs=1e-6), tag

    for part in ("policy", "critic"):
        straight_weights = torch.load(straight / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
        resumed_weights = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
        for name, value in straight_weights.items():
            if name.startswith(part + "."):
                torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=1e-6, msg=name)
        assert is_complete_hf_folder(crashed / part)


def test_sigkill_during_export_leaves_no_finished_looking_folder(tmp_path: Path):
    target, marker = tmp_path / "model", tmp_path / "exporting"
    code = f"from tests.crash_helpers import export_and_hang; export_and_hang({str(target)!r}, {str(marker)!r})"
    process = python("-c", code)
    wait_for(marker, process)
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-model-")]
    assert staging and any(staging[0].glob("*.safetensors"))  # killed half-way: weights written
    kill(process)
    assert not target.exists()
    assert not any(is_complete_hf_folder(p) for p in tmp_path.iterdir())


def sft_stage(tmp_path: Path, model_dir: Path):
    from rlhf_lightning.data import SFTDataModule
    from rlhf_lightning.modules import SFTModule

    records = [{"prompt": f"Review {i}: it was", "completion": f" good {i}. I liked the plot."} for i in range(40)]
    train = write_lines(tmp_path / "sft.jsonl", records)
    return (SFTModule(model_name_or_path=str(model_dir), learning_rate=1e-2, warmup_steps=2, export_dir=None, num_samples=0),
            SFTDataModule(train_file=str(train), val_fraction=0.0, batch_size=4, max_length=64))


def reward_stage(tmp_path: Path, model_dir: Path):
    from rlhf_lightning.data import PreferenceDataModule
    from rlhf_lightning.modules import RewardModule

    records = [{"prompt": f"Review {i}:", "chosen": f" great {i}.", "rejected": f" bad {i} bad."} for i in range(40)]
    train = write_lines(tmp_path / "prefs.jsonl", records)
    return (RewardModule(str(model_dir), learning_rate=1e-2, warmup_steps=2, export_dir=None, normalize=False),
            PreferenceDataModule(train_file=str(train), val_fraction=0.0, batch_size=4))


@pytest.mark.parametrize("stage, at_step, workers", [(sft_stage, 7, 0), (reward_stage, 7, 0), (sft_stage, 13, 1)],
                         ids=["sft", "reward", "sft-second-epoch-with-a-worker"])
def test_sft_and_reward_stages_resume_mid_epoch_exactly(tmp_path: Path, byte_gpt2_dir: Path, stage, at_step: int,
                                                        workers: int):
    """10 batches per epoch, 17 steps; resumed from the mid-epoch checkpoint of ``at_step``,
    the run ends with the weights of the uninterrupted one (also in the second epoch, with a
    loader worker that draws indices before Lightning sets the sampler's epoch)."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(callbacks: list | None = None) -> Trainer:
        return Trainer(max_steps=17, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(callbacks), deterministic=True)

    def make():
        module, data = stage(tmp_path, byte_gpt2_dir)
        data.num_workers = workers
        return module, data

    seed_everything(0)
    straight, data = make()
    trainer([ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=at_step, save_top_k=1,
                             monitor="step", mode="min")]).fit(straight, datamodule=data)
    epoch, consumed = divmod(at_step, 10)
    checkpoint = tmp_path / "ckpt" / f"epoch={epoch}-step={at_step}.ckpt"
    assert torch.load(checkpoint, weights_only=False)[type(data).__qualname__] == {"epoch": epoch,
                                                                                   "consumed_batches": consumed}

    seed_everything(123)  # a resumed process starts with other RNG states
    resumed, data = make()
    trainer().fit(resumed, datamodule=data, ckpt_path=checkpoint)
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_sigkill_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path: Path):
    target, marker = tmp_path / "ckpt" / "last.ckpt", tmp_path / "saving"
    code = f"from tests.crash_helpers import checkpoint_and_hang; checkpoint_and_hang({str(target)!r}, {str(marker)!r})"
    process = python("-c", code)
    wait_for(marker, process)
    kill(process)
    assert torch.load(target, weights_only=True)["version"] == 1  # the old one, complete


def test_modules_write_checkpoints_atomically(tmp_path: Path, byte_gpt2_dir: Path):
    from rlhf_lightning.checkpoint_io import AtomicCheckpointIO

    from .test_ppo import fit, small_ppo

    trainer = fit(small_ppo(byte_gpt2_dir, tmp_path), iterations=1)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
