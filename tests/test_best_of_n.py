"""Best-of-n sampling: the KL bound, the choice, the sampling layout, the command."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlhf_lightning.best_of_n import best_of_n, best_of_n_kl, completions_of, sample_candidates
from rlhf_lightning.cli import main
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.tasks.sentiment import judge


def test_best_of_n_kl_hand_computed():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.8351
    assert best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)


@dataclass
class Chunk:
    completions: list[str]
    scores: list[float]


def test_best_of_n_keeps_the_highest_score_per_prompt_first_on_ties():
    # two chunks, n = 3: prompt 0 is rows 0-2 of the first chunk, prompt 1 rows 3-5 (across chunks)
    chunks = [Chunk(["a0", "a1", "a2", "b0"], [0.1, 0.9, 0.3, 2.0]), Chunk(["b1", "b2"], [2.0, -1.0])]
    best, scores = best_of_n(chunks, 3, lambda chunk: torch.tensor(chunk.scores))
    assert best == ["a1", "b0"]
    assert scores.tolist() == pytest.approx([0.9, 2.0])
    assert completions_of(chunks, 3) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]


def test_sample_candidates_are_prompt_major_and_seeded(byte_gpt2_dir: Path):
    prompts = ["Review: The movie was", "Review: The story was"]
    settings = GenerationSettings(max_new_tokens=6)
    chunks = sample_candidates(str(byte_gpt2_dir), prompts, 3, settings, seed=1, batch_size=4)
    assert len(chunks) == 2  # 4 rows per chunk: one prompt's 3 samples each
    assert [p for c in chunks for p in c.prompts] == [prompts[0]] * 3 + [prompts[1]] * 3
    again = sample_candidates(str(byte_gpt2_dir), prompts, 3, settings, seed=1, batch_size=4)
    assert completions_of(chunks, 3) == completions_of(again, 3)
    assert len(set(completions_of(chunks, 3)[0])) > 1  # the n samples differ


def test_best_of_n_command_writes_the_best_sample_per_prompt(byte_gpt2_dir: Path, tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Review: The movie was"}\n{"prompt": "Review: The plot was"}\n')
    out = tmp_path / "best.jsonl"
    args = ["best-of-n", "--policy", str(byte_gpt2_dir), "--prompts", str(prompts), "--n", "4",
            "--reward_fn", "rlhf_lightning.tasks.sentiment.judge", "--out", str(out), "--max_new_tokens", "8"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Review: The movie was", "Review: The plot was"]
    for row in rows:
        assert row["score"] == pytest.approx(judge([row["prompt"]], [row["completion"]])[0])
    assert "best-of-4: 2 prompts" in capsys.readouterr().out
    assert main([*args[:-6], "--out", str(out)]) == 2  # neither --reward_model nor --reward_fn
    assert "exactly one of --reward_model or --reward_fn" in capsys.readouterr().err
