"""Shared fixtures: tiny models and tokenizers saved to tmp folders, never downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf_lightning.models import byte_tokenizer
from rlhf_lightning.tasks import SentimentTask

CORPUS = [r["prompt"] + r["completion"] for r in SentimentTask(seed=1).sft_records(300)]


def bpe_tokenizer_without_pad() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on the spot: EOS but no pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_gpt2(folder: Path, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def byte_gpt2_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 with the byte tokenizer (pad 0, EOS 1, chat template) in a HF folder."""
    return save_tiny_gpt2(tmp_path / "byte-gpt2", byte_tokenizer())


@pytest.fixture
def bpe_gpt2_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 whose BPE tokenizer has no pad token (pad == nothing, like GPT-2's)."""
    return save_tiny_gpt2(tmp_path / "bpe-gpt2", bpe_tokenizer_without_pad())


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "llama", bpe_tokenizer_without_pad())


def start_distributed_script(script: Path, *args: object) -> subprocess.Popen:
    """Start ``script args...`` in a session of its own (``os.killpg(process.pid, ...)`` reaches
    the processes it launches), one thread each, the repository on the import path."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_distributed_script(script: Path, *args: object, timeout: float = 300) -> str:
    """Run ``script args...`` (one process, which launches the others itself) with the repository
    on the import path; fail the test unless it exits 0, and kill it with SIGKILL after
    ``timeout`` seconds (a hung distributed run ignores SIGTERM). Returns its output."""
    process = start_distributed_script(script, *args)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{script.name} {' '.join(map(str, args))} hung")
    assert process.returncode == 0, output[-3000:]
    return output


def wait_for(marker: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``process`` writes ``marker`` (it has reached its kill point); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError("the run ended before it reached the kill point:\n" + process.stdout.read()[-3000:])
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the kill point"
        time.sleep(0.2)


def load_script(path: Path, name: str):
    """The Python file at ``path`` (a benchmark or an example script) imported as module ``name``
    (registered in ``sys.modules``: its dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are dumped, strings written as they are (for malformed lines)."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def round_zero(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished round 0 of ``rlhf-lightning iterate`` on tiny settings (tests/test_iterate.py)."""
    from tests.test_iterate import finished_round_zero

    return finished_round_zero(tmp_path_factory.mktemp("stages"))
