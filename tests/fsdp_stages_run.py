"""Run by tests/test_stages_fsdp.py: the SFT, reward and DPO stages under FSDP2
(``ModelParallelStrategy``, 2 CPU processes, gloo) and the same global batch on 1 process.

    python tests/fsdp_stages_run.py MODEL DATA OUT single  # 1 process, 4 records a step
    python tests/fsdp_stages_run.py MODEL DATA OUT fsdp    # 2 processes x 2 records

``DATA`` holds ``sft.jsonl`` and ``preferences.jsonl``, 4 records each, so that every step
sees all of them whatever the order. Each stage trains 3 steps from ``MODEL`` and exports
``OUT/MODE/<stage>``: SFT samples at its validation (on every rank when sharded), the reward
stage normalises on ``sft.jsonl``, DPO has a sharded frozen reference. ``fsdp`` also trains a
reward model with likelihood distillation (a sharded teacher and head) to ``OUT/fsdp/distilled``
and saves its gathered weights to ``OUT/fsdp/gathered.pt``.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy

from rlhf_lightning.data import PreferenceDataModule, SFTDataModule
from rlhf_lightning.modules import DPOModule, RewardModule, SFTModule
from rlhf_lightning.sharding import gathered_state_dict, is_sharded

GLOBAL_BATCH = 4
STAGES = {  # stage: (module, data module, its file in DATA, module options given DATA)
    "sft": (SFTModule, SFTDataModule, "sft.jsonl", lambda data: {"num_samples": 2, "sample_max_new_tokens": 3}),
    "reward": (RewardModule, PreferenceDataModule, "preferences.jsonl", lambda data: {"normalize_file": str(data / "sft.jsonl")}),
    "dpo": (DPOModule, PreferenceDataModule, "preferences.jsonl", lambda data: {}),
}


def fit(stage: str, model: str, data: Path, export_dir: Path, devices: int, **options) -> RewardModule | SFTModule | DPOModule:
    seed_everything(0)
    module_class, data_class, file, defaults = STAGES[stage]
    module = module_class(model_name_or_path=model, learning_rate=1e-2, warmup_steps=0, lr_scheduler="constant",
                          export_dir=str(export_dir), overwrite_export=True, **{**defaults(data), **options})
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=3, check_val_every_n_epoch=3,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=1)
    datamodule = data_class(train_file=str(data / file), val_file=str(data / file), batch_size=GLOBAL_BATCH // devices,
                            max_length=64)
    trainer.fit(module, datamodule=datamodule)
    return module


def distilled_reward_model(model: str, data: Path, out: Path) -> None:
    module = fit("reward", model, data, out / "distilled", devices=2, likelihood_distillation_coef=0.5)
    assert is_sharded(module.model) and is_sharded(module.reference) and is_sharded(module.likelihood_head)
    state = gathered_state_dict(module.model)  # every rank joins; rank 0 gets the weights
    if torch.distributed.get_rank() == 0:
        torch.save(state, out / "gathered.pt")


if __name__ == "__main__":
    model, data, out, mode = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    devices = 1 if mode == "single" else 2
    for stage in STAGES:
        fit(stage, model, data, out / mode / stage, devices)
    if mode == "fsdp":
        distilled_reward_model(model, data, out / mode)
