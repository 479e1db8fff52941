"""benchmarks/sft_repeats.py counts the SFT policy's samples that say a word twice that no
demonstration says twice, and the judge's validity of those samples."""

from __future__ import annotations

from pathlib import Path

import yaml

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_repeats_and_validity_of_the_sft_samples(monkeypatch, tmp_path: Path):
    script = load_script(ROOT / "benchmarks" / "sft_repeats.py", "sft_repeats_benchmark")
    demos = [{"prompt": "List two fruits:", "completion": " apple, banana."},
             {"prompt": "List two fruits:", "completion": " kiwi, mango."},
             {"prompt": "List three fruits:", "completion": " lemon, lemon, peach."}]  # "lemon" twice: allowed
    samples = [[" apple, apple.", " apple, banana."],          # a repeat; valid
               [" lemon, lemon, kiwi.", " kiwi, mango"]]      # allowed repeat (invalid); no period (invalid)
    seen = {}

    def fake_sample(policy_dir, prompts, n, generation, seed):
        seen.update(policy_dir=policy_dir, prompts=prompts, n=n, max_new_tokens=generation.max_new_tokens)
        return "candidates"

    monkeypatch.setattr(script, "datamodule_records", lambda config: ([], demos))
    monkeypatch.setattr(script, "sample_candidates", fake_sample)
    monkeypatch.setattr(script, "completions_of", lambda candidates, n: samples)
    run = tmp_path / "lists" / "seed0"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "pipeline.yaml").write_text(yaml.safe_dump({"judge": "rlhf_lightning.tasks.lists.judge"}))
    (run / "configs" / "ppo.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"generation": {"max_new_tokens": 12}}}}))
    row = script.repeat_row(run, num_prompts=5, n=2, seed=0)
    assert seen == {"policy_dir": str(run / "sft" / "model"), "prompts": ["List two fruits:", "List three fruits:"], "n": 2,
                    "max_new_tokens": 12}  # the run's PPO generation settings
    assert row["repeats"] == 0.25  # only " apple, apple.": "lemon" is said twice by a demonstration
    assert row["valid"] == 0.25    # only " apple, banana."
