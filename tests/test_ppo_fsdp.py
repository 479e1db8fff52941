"""PPO under FSDP2 (Lightning's ``ModelParallelStrategy``): the 2-process run ends with the weights
of a 1-process run on the same global batch, resumes exactly from its distributed checkpoint after a
SIGKILL, and the strategies PPO does not support are refused in one line naming ``trainer.strategy``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_lightning.checkpoint_io import drop_frozen_weights
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.lora import LoRASettings
from rlhf_lightning.models import byte_tokenizer, load_tokenizer
from rlhf_lightning.ppo_models import load_ppo_models
from rlhf_lightning.ppo_settings import ImplicitRewardSettings
from rlhf_lightning.sharding import check_strategy, fsdp_units, transformer_blocks
from rlhf_lightning.tasks import SentimentTask

from .conftest import run_distributed_script, save_tiny_gpt2, start_distributed_script, wait_for, write_lines
from .test_reward_ensemble import two_reward_dirs  # noqa: F401 (a fixture)

SCRIPT = Path(__file__).with_name("fsdp_ppo_run.py")
#: |2 processes - 1 process| per weight after 2 iterations (measured: 7.7e-8 policy, 1.4e-8 critic,
#: while training moves the weights by 2.5e-3)
TOLERANCE = 1e-6


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


def untimed(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if not name.startswith("time/")}


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_exactly_after_a_kill(tmp_path: Path, byte_gpt2_dir: Path):
    """Also: each rank samples a different number of tokens on the sharded policy without hanging
    (tests/fsdp_ppo_run.py, generate_unequal_lengths)."""
    prompts = write_lines(tmp_path / "prompts.jsonl", SentimentTask(seed=1).prompt_records(8))
    for mode in ("single", "fsdp"):
        run_distributed_script(SCRIPT, byte_gpt2_dir, prompts, tmp_path, mode)
    paused = start_distributed_script(SCRIPT, byte_gpt2_dir, prompts, tmp_path, "pause")
    try:
        wait_for(tmp_path / "paused", paused)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (ended already: wait_for's error says why)
            os.killpg(paused.pid, signal.SIGKILL)  # both ranks and the launcher, mid-run
    assert paused.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "policy").exists()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
    assert checkpoint["ppo_state"]["iteration"] == 1
    run_distributed_script(SCRIPT, byte_gpt2_dir, prompts, tmp_path, "resume")

    initial = weights(byte_gpt2_dir)
    for model in ("policy", "critic"):
        single, full, resumed = (weights(tmp_path / run / model) for run in ("single", "full", "resumed"))
        assert single.keys() == full.keys()  # gathered whole, a tied weight written once
        assert largest_difference(single, full) < TOLERANCE
        assert largest_difference(full, initial) > 1e-4  # the comparison is about trained weights
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    single, full, resumed = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("single", "full", "resumed"))
    assert (full["global_step"], full["episode"]) == (2 * 2, 2 * 8)  # 2 iterations x 2 epochs; 8 prompts each
    assert full["health/grad_norm"] == pytest.approx(single["health/grad_norm"], rel=1e-5)
    assert full["health/grad_norm"] > 1.0  # above ppo.max_grad_norm: clipping changed the step
    assert (full["start_iteration"], resumed.pop("start_iteration")) == (0, 1)  # it resumed, not started over
    full.pop("start_iteration")
    assert untimed(resumed) == untimed(full)


@pytest.mark.slow
def test_a_llama_model_under_fsdp2_matches_one_process(tmp_path: Path, llama_dir: Path):
    """A Llama-style policy and critic (RMSNorm, rotary positions, a BPE tokenizer without a pad
    token) shard by their own ``_no_split_modules`` blocks and train as one process does."""
    prompts = write_lines(tmp_path / "prompts.jsonl", SentimentTask(seed=1).prompt_records(8))
    for mode in ("single", "fsdp"):
        run_distributed_script(SCRIPT, llama_dir, prompts, tmp_path, mode)
    for model in ("policy", "critic"):
        single, full = (weights(tmp_path / run / model) for run in ("single", "full"))
        assert single.keys() == full.keys()
        assert largest_difference(single, full) < TOLERANCE
    initial, trained = weights(llama_dir), weights(tmp_path / "full" / "policy")
    blocks = {k: v for k, v in initial.items() if k.startswith("model.layers.")}  # (the embedding grew a pad row)
    assert largest_difference(trained, blocks) > 1e-4


def fsdp2(data_parallel: int, tensor_parallel: int) -> ModelParallelStrategy:
    """A ``ModelParallelStrategy`` as ``setup`` sees it, with a stand-in for its device mesh."""
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
    sizes = {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel}
    strategy._device_mesh = {name: SimpleNamespace(size=lambda n=n: n) for name, n in sizes.items()}
    return strategy


@pytest.mark.parametrize("strategy, lora, words", [
    (FSDPStrategy(), None, "FSDPStrategy (FSDP1)"),
    (DeepSpeedStrategy.__new__(DeepSpeedStrategy), None, "DeepSpeedStrategy"),  # (deepspeed is not installed)
    (fsdp2(1, 2), None, "data_parallel_size=2 (the number of processes) and tensor_parallel_size=1"),
    (fsdp2(2, 1), LoRASettings(), "model.init_args.lora"),
])
def test_unsupported_strategies_are_refused_in_one_line(strategy, lora, words):
    with pytest.raises(UserInputError) as refused:
        check_strategy(strategy, "PPOModule", lora)
    message = str(refused.value)
    assert message.startswith("trainer.strategy: PPOModule ") and words in message and "\n" not in message


def test_pure_data_parallel_fsdp2_and_ddp_are_accepted():
    check_strategy(fsdp2(2, 1), "PPOModule")
    check_strategy(DDPStrategy(), "PPOModule")


def test_each_block_is_an_fsdp_unit_and_a_scalar_model_also_its_backbone_and_head():
    config = GPT2Config(vocab_size=64, n_embd=8, n_layer=2, n_head=2, num_labels=1)
    causal, scorer = GPT2LMHeadModel(config), GPT2ForSequenceClassification(config)
    assert fsdp_units(causal) == list(causal.transformer.h)  # the head stays in the root, tied to the embedding
    assert fsdp_units(scorer) == [*scorer.transformer.h, scorer.transformer, scorer.score]
    with pytest.raises(ValueError, match="_no_split_modules"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_checkpoints_keep_frozen_weights_under_fsdp2():
    """ModelParallelStrategy loads every weight from the checkpoint itself and fails on a missing one."""
    module = torch.nn.ModuleDict({"policy": torch.nn.Linear(2, 2), "reference": torch.nn.Linear(2, 2).requires_grad_(False)})
    for strategy, kept in ((DDPStrategy(), ["policy.bias", "policy.weight"]), (fsdp2(2, 1), sorted(module.state_dict()))):
        module._trainer = SimpleNamespace(strategy=strategy)
        checkpoint = {"state_dict": module.state_dict()}
        drop_frozen_weights(module, checkpoint)
        assert sorted(checkpoint["state_dict"]) == kept


@pytest.mark.parametrize("source", ["reward model", "ensemble", "reward_fn", "implicit, PPO's reference", "implicit, own reference"])
def test_each_loaded_model_is_handed_to_on_loaded_once(tmp_path: Path, byte_gpt2_dir: Path,
                                                      two_reward_dirs: list[str], source: str):
    """Under FSDP2 ``on_loaded`` shards (``PPOModule.configure_model``): policy, critic, reference
    and every frozen scoring model exactly once, the reference and policy first, the critic (the
    last model loaded whole) last, so a process never holds more than two models unsharded."""
    dpo = str(save_tiny_gpt2(tmp_path / "dpo", byte_tokenizer(), seed=7))
    other_reference = str(save_tiny_gpt2(tmp_path / "reference", byte_tokenizer(), seed=5))
    options = {
        "reward model": {"reward_model": two_reward_dirs[0]},
        "ensemble": {"reward_model": two_reward_dirs},
        "reward_fn": {"reward_fn": len},
        "implicit, PPO's reference": {"implicit_reward": ImplicitRewardSettings(policy=dpo)},
        "implicit, own reference": {"implicit_reward": ImplicitRewardSettings(policy=dpo, reference=other_reference)},
    }[source]
    seen: list[torch.nn.Module] = []
    models = load_ppo_models(str(byte_gpt2_dir), load_tokenizer(str(byte_gpt2_dir)), on_loaded=seen.append, **options)
    expected = [models.reference, models.policy, *models.reward_models, *models.implicit_reward_models, models.critic]
    assert len(seen) == len({id(m) for m in seen}) == len(expected)
    assert {id(m) for m in seen} == {id(m) for m in expected}
    assert seen[:2] == [models.reference, models.policy] and seen[-1] is models.critic
    assert len(models.implicit_reward_models) == {"implicit, PPO's reference": 1, "implicit, own reference": 2}.get(source, 0)
