"""bfloat16 on CPU (``trainer.precision``): under ``bf16-mixed`` PPO trains with float32 weights
and recomputes the rollout's log-probs exactly, and SFT and reward steps run in bf16 with finite
losses; ``bf16-true`` and ``16-true``, which keep the trained weights in 16 bits, are refused by
every stage in one line (docs/scaling.md#precision)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from rlhf_lightning.data import PreferenceDataModule, SFTDataModule
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.lora import backbone
from rlhf_lightning.modules import DPOModule, RewardModule, SFTModule
from rlhf_lightning.optim import HALF_WEIGHT_PRECISIONS

from .conftest import write_lines
from .test_dpo import dpo_pairs
from .test_ppo import fit, small_ppo

#: The largest ``policy/first_ratio_dev`` accepted under bf16-mixed. Measured on CPU: 0.0 (the
#: rollout and the update run the same bf16 kernels), while bf16 itself moves this model's
#: log-probs by about 3e-3 from float32's: a rollout and an update at different precisions fail.
BF16_FIRST_RATIO_DEV = 1e-3


class FirstRatioDevs(Callback):
    """``policy/first_ratio_dev`` of every PPO iteration."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(pl_module.iteration_stats["policy/first_ratio_dev"])


def test_bf16_mixed_ppo_trains_float32_weights_and_recomputes_the_rollout_logprobs(tmp_path: Path):
    seed_everything(0)
    module = small_ppo("preset:tiny-gpt2", tmp_path, policy_export_dir=None, critic_export_dir=None)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    devs = FirstRatioDevs()
    trainer = fit(module, 2, precision="bf16-mixed", callbacks=[devs])
    assert module.iteration == 2 and trainer.callback_metrics["health/nonfinite_steps"] == 0.0
    assert len(devs.values) == 2 and max(devs.values) <= BF16_FIRST_RATIO_DEV
    for model in (module.policy, module.critic):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], p) for k, p in module.policy.named_parameters())


def fit_stage(stage: str, tmp_path: Path, steps: int = 3, **trainer_kwargs) -> tuple[LightningModule, Trainer]:
    """``steps`` training steps of the ``stage`` (sft, reward or dpo) on ``preset:micro-gpt2``
    with a few tiny records, exporting nothing; the module and its Trainer."""
    model = "preset:micro-gpt2"
    if stage == "sft":
        module = SFTModule(model, learning_rate=1e-3, warmup_steps=0, export_dir=None, num_samples=0)
        records = [{"prompt": "Review: it was", "completion": " good. I liked the plot."}] * 8
        data = SFTDataModule(train_file=str(write_lines(tmp_path / "sft.jsonl", records)), val_fraction=0.0,
                             batch_size=4, max_length=64)
    else:
        stages = {"reward": lambda: RewardModule(model, learning_rate=1e-3, warmup_steps=0, export_dir=None,
                                                 normalize=False),
                  "dpo": lambda: DPOModule(model, learning_rate=1e-3, warmup_steps=0, export_dir=None)}
        module = stages[stage]()
        data = PreferenceDataModule(train_file=str(write_lines(tmp_path / "pairs.jsonl", dpo_pairs(8))),
                                    val_fraction=0.0, batch_size=4)
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return module, trainer


class StepLosses(Callback):
    """The loss of every training step, and the dtype of the first block's MLP output in each."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: list[torch.dtype] = []

    def on_train_start(self, trainer, pl_module) -> None:
        backbone(pl_module.model).h[0].mlp.register_forward_hook(lambda layer, args, out: self.dtypes.append(out.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_bf16_mixed_sft_and_reward_steps_run_in_bf16_with_finite_losses(tmp_path: Path, stage: str):
    seed_everything(0)
    steps = StepLosses()
    module, _ = fit_stage(stage, tmp_path, precision="bf16-mixed", callbacks=[steps])
    assert len(steps.losses) == 3 and all(math.isfinite(loss) for loss in steps.losses), steps.losses
    assert steps.dtypes and set(steps.dtypes) == {torch.bfloat16}  # the forwards ran under autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.parametrize("precision", HALF_WEIGHT_PRECISIONS)
@pytest.mark.parametrize("stage", ["ppo", "sft", "reward", "dpo"])
def test_16_bit_weights_are_refused_by_every_stage_in_one_line(tmp_path: Path, stage: str, precision: str):
    with pytest.raises(UserInputError) as refused:
        if stage == "ppo":
            module = small_ppo("preset:micro-gpt2", tmp_path, policy_export_dir=None, critic_export_dir=None)
            fit(module, 1, precision=precision)
        else:
            fit_stage(stage, tmp_path, precision=precision)
    message = str(refused.value)
    assert message.startswith(f"trainer.precision: {precision} keeps the trained weights in 16 bits") and "\n" not in message
    assert "bf16-mixed" in message
    if stage == "ppo":
        assert module.policy is None  # refused before any model loaded
