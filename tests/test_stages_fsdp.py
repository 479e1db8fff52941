"""The SFT, reward and DPO stages under FSDP2 (Lightning's ``ModelParallelStrategy``): 2 processes
end with the weights of 1 process on the same global batch, the exports are gathered whole, and
each stage refuses the strategies no stage supports in one line naming ``trainer.strategy``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from transformers import AutoModelForSequenceClassification

from rlhf_lightning.errors import UserInputError
from rlhf_lightning.lora import LoRASettings
from rlhf_lightning.modules import DPOModule, RewardModule, SFTModule

from .conftest import run_distributed_script, write_lines
from .test_ppo_fsdp import fsdp2, largest_difference, weights

SCRIPT = Path(__file__).with_name("fsdp_stages_run.py")
#: |2 processes - 1 process| per weight after 3 steps at learning rate 1e-2: the largest and the
#: mean over every weight. Adam (eps 1e-8) turns the float noise of gradients near 0 into steps of
#: up to the learning rate, most for the reward stage's small gradients. Measured (SFT, reward,
#: DPO): largest 8.8e-5, 2.5e-3, 7.6e-4; mean 6.5e-8, 1.0e-5, 1.9e-6. Ranks that train
#: unsynchronised copies instead differ by up to 6e-2, 9e-3 on average; training moves the weights
#: by 3e-2.
LARGEST, MEAN = 1e-2, 1e-4
WORDS = ["great fun.", "dull plot.", "fine cast.", "weak end.."]  # one length: every rank has as many tokens


def mean_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return torch.cat([(a[k] - b[k]).abs().flatten() for k in a.keys() & b.keys()]).mean().item()


@pytest.mark.slow
def test_stages_under_fsdp2_match_one_process_and_export_gathered_weights(tmp_path: Path, byte_gpt2_dir: Path):
    """Also: SFT samples at validation on the sharded model (every rank the same prompts and seed,
    so the ranks stop together), and the reward stage with likelihood distillation shards its
    teacher and head (tests/fsdp_stages_run.py)."""
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "sft.jsonl", [{"prompt": f"Review {i}: ", "completion": w} for i, w in enumerate(WORDS)])
    write_lines(data / "preferences.jsonl",
                [{"prompt": f"Review {i}: ", "chosen": w, "rejected": WORDS[i - 1]} for i, w in enumerate(WORDS)])
    for mode in ("single", "fsdp"):
        run_distributed_script(SCRIPT, byte_gpt2_dir, data, tmp_path, mode)
    initial = weights(byte_gpt2_dir)
    for stage in ("sft", "reward", "dpo"):
        single, sharded = (weights(tmp_path / mode / stage) for mode in ("single", "fsdp"))
        assert single.keys() == sharded.keys(), stage  # gathered whole, a tied weight written once
        assert largest_difference(single, sharded) < LARGEST and mean_difference(single, sharded) < MEAN, stage
        assert largest_difference(sharded, initial) > 1e-2, stage  # the comparison is about trained weights
    offsets = [json.loads((tmp_path / mode / "reward" / "config.json").read_text())["reward_offset"]
               for mode in ("single", "fsdp")]
    assert offsets[0] != 0 and offsets[1] == pytest.approx(offsets[0], abs=1e-2)  # measured: 3.5e-4 apart
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp" / "distilled").state_dict()
    gathered = torch.load(tmp_path / "fsdp" / "gathered.pt")
    assert exported.keys() == gathered.keys() and all(torch.equal(exported[k], gathered[k]) for k in gathered)


@pytest.mark.parametrize("stage, options, strategy, words", [
    (SFTModule, {"lora": LoRASettings()}, fsdp2(2, 1), "model.init_args.lora under ModelParallelStrategy"),
    (RewardModule, {"lora": LoRASettings()}, fsdp2(2, 1), "model.init_args.lora under ModelParallelStrategy"),
    (DPOModule, {}, FSDPStrategy(), "FSDPStrategy (FSDP1)"),
    (SFTModule, {}, DeepSpeedStrategy.__new__(DeepSpeedStrategy), "DeepSpeedStrategy"),  # (deepspeed is not installed)
    (RewardModule, {}, fsdp2(1, 2), "tensor_parallel_size=1"),
])
def test_stages_refuse_unsupported_strategies_in_one_line(stage, options, strategy, words):
    module = stage(**options)
    module._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(UserInputError) as refused:
        module.setup("fit")
    message = str(refused.value)
    assert message.startswith(f"trainer.strategy: {stage.__name__} ") and words in message and "\n" not in message


@pytest.mark.parametrize("stage", [SFTModule, RewardModule, DPOModule])
def test_stages_accept_pure_data_parallel_fsdp2_and_ddp(stage):
    module = stage()
    for strategy in (fsdp2(2, 1), DDPStrategy()):
        module._trainer = SimpleNamespace(strategy=strategy, precision="32-true")
        module.setup("fit")
