"""PPO under bfloat16 on CPU (``trainer.precision``): ``bf16-mixed`` trains with float32 weights
and recomputes the rollout's log-probs exactly; ``bf16-true`` and ``16-true``, which keep the
trained weights in 16 bits, are refused in one line (docs/scaling.md#precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from rlhf_lightning.errors import UserInputError

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


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_16_bit_weights_are_refused_in_one_line(tmp_path: Path, precision: str):
    module = small_ppo("preset:micro-gpt2", tmp_path, policy_export_dir=None, critic_export_dir=None)
    with pytest.raises(UserInputError) as refused:
        fit(module, 1, precision=precision)
    message = str(refused.value)
    assert message.startswith(f"trainer.precision: {precision} keeps the trained weights in 16 bits") and "\n" not in message
    assert "bf16-mixed" in message and module.policy is None  # refused before any model loaded
