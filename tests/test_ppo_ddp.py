"""PPO under DDP: two CPU processes (gloo) end with identical policy and critic weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import run_distributed_script

SCRIPT = Path(__file__).with_name("ddp_ppo_run.py")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_weights(tmp_path: Path, byte_gpt2_dir: Path):
    run_distributed_script(SCRIPT, byte_gpt2_dir, tmp_path)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert rank0 == rank1  # same policy and critic checksums, same step and episode counts
    policy_sum, critic_sum, global_step, episodes = rank0
    assert int(global_step) == 2 * 2  # 2 iterations x 1 epoch x 2 minibatches
    assert int(episodes) == 2 * 4 * 2  # iterations x batch x ranks
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["ppo_state"]["rng"]
    own = [torch.load(tmp_path / f"rng{r}.pt") for r in (0, 1)]
    assert not torch.equal(own[0], own[1])
    assert all(torch.equal(saved[r]["torch"], own[r]) for r in (0, 1))  # each rank's own states
