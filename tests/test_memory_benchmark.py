"""benchmarks/memory.py: its Qwen2-0.5B shape has the published model's size, and at the micro
shape every setup runs one PPO iteration in its own subprocess and reports each process's peak."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"
#: Qwen2-0.5B's parameter count (tied input embedding and output head counted once).
QWEN2_05B_PARAMETERS = 494_032_768


def load_memory_benchmark():
    return load_script(SCRIPT, "memory_benchmark")


def test_the_qwen2_shape_is_qwen2_0_5b():
    shape = load_memory_benchmark().SHAPES["qwen2-0.5b"]
    with torch.device("meta"):  # sizes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    assert sum(p.numel() for p in model.parameters()) == QWEN2_05B_PARAMETERS


@pytest.mark.slow
def test_every_setup_runs_one_iteration_at_the_micro_shape_and_reports_its_peaks():
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "micro", "--response-len", "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    processes = {"full": 1, "lora": 1, "lora-critic-adapter": 1, "ddp": 2, "fsdp2": 2}
    for name, count in processes.items():
        peaks = rows[name].split("|")[4]
        assert "failed" not in peaks, rows[name]
        assert len(re.findall(r"\d+", peaks)) == count and all(int(p) > 100 for p in re.findall(r"\d+", peaks)), rows[name]
