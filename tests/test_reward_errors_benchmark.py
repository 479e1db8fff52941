"""benchmarks/reward_errors.py splits a reward model's held-out accuracy by kind of pair; the
kinds' lost points add up to the gap to the noise ceiling."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_errors_script():
    return load_script(ROOT / "benchmarks" / "reward_errors.py", "reward_errors_benchmark")


def test_repeated_words_are_those_of_three_letters_or_more():
    script = load_errors_script()
    assert script.repeated_words(" apple, banana, apple.") == {"apple"}
    assert script.repeated_words(" so charming and Charming and fun.") == {"charming", "and"}
    assert script.repeated_words(" a cat, a dog.") == set()  # "a" is too short


def test_kinds_of_pairs_and_their_share_of_the_gap(monkeypatch, tmp_path: Path):
    script = load_errors_script()
    prompt = "List two fruits:"
    records = [
        {"prompt": prompt, "chosen": " apple, banana.", "rejected": " apple."},        # valid / valid
        {"prompt": prompt, "chosen": " apple, banana.", "rejected": " banana, apple."},  # a judge tie
        {"prompt": prompt, "chosen": " apple, apple.", "rejected": " apple, banana."},  # a noisy label; repeat
        {"prompt": prompt, "chosen": " apple, banana.", "rejected": " apple, banana"},  # no final period
        {"prompt": prompt, "chosen": " kiwi, kiwi.", "rejected": " kiwi"},              # invalid / invalid
    ]
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [3.0, 3.0]])
    run = tmp_path / "lists" / "seed0"
    data_module = SimpleNamespace(load_records=lambda: ([], records), max_length=128)
    monkeypatch.setattr(script, "stage_datamodule",
                        lambda config: data_module if config == run / "configs" / "reward.yaml" else None)

    def pair_scores(folder, recs, max_length):
        assert (folder, recs, max_length) == (str(run / "reward" / "model"), records, 128)  # the data module's
        return scores

    monkeypatch.setattr(script, "reward_pair_scores", pair_scores)
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "reward.yaml").write_text(yaml.safe_dump(
        {"model": {"init_args": {"judge": "rlhf_lightning.tasks.lists.judge"}}}))
    rows = {row["kind"]: row for row in script.error_table(run)}
    assert list(rows) == list(script.KINDS)
    assert [row["n"] for row in rows.values()] == [2, 1, 1, 1]
    both_valid = rows["valid / valid"]
    # acc (1 + 0) / 2; ceiling (1 + 0.5) / 2; the tie is left out of rm~judge
    assert (both_valid["acc"], both_valid["ceiling"], both_valid["rm~judge"]) == (0.5, 0.75, 1.0)
    repeat = rows["valid / invalid, repeats a word"]
    assert (repeat["acc"], repeat["ceiling"], repeat["rm~judge"]) == (1, 0, 0)  # follows the noisy label
    other = rows["valid / invalid, other"]
    assert (other["acc"], other["ceiling"], other["rm~judge"]) == (0, 1, 0)
    neither = rows["invalid / invalid"]  # the judge prefers " kiwi" (no repeat); the reward model ties
    assert (neither["acc"], neither["ceiling"], neither["rm~judge"]) == (0.5, 0, 0.5)
    # accuracy 2.5 / 5, ceiling 2.5 / 5: no gap, so the kinds' lost points cancel
    assert [round(row["lost"], 6) for row in rows.values()] == [10.0, -20.0, 20.0, -10.0]
    assert sum(row["lost"] for row in rows.values()) == pytest.approx(0.0)


def test_synthetic_fit_scores_the_synthetic_pairs_of_the_training_draw(monkeypatch, tmp_path: Path, capsys):
    script = load_errors_script()
    fruits = ["apple", "banana", "cherry", "grape"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(
        json.dumps({"prompt": "List three fruits:", "chosen": f" {fruits[i]}, {fruits[(i + 1) % 4]}, {fruits[i - 1]}.",
                    "rejected": " fruit."}) + "\n" for i in range(4)))
    scored = []

    def scores(folder, pairs, max_length):
        scored.append(pairs)
        return torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])[: len(pairs)]

    monkeypatch.setattr(script, "reward_pair_scores", scores)
    run = tmp_path / "lists" / "seed0"
    (run / "configs").mkdir(parents=True)
    (run / "reward" / "model").mkdir(parents=True)
    (run / "configs" / "reward.yaml").write_text(yaml.safe_dump({
        "model": {"init_args": {"judge": "rlhf_lightning.tasks.lists.judge"}},
        "data": {"class_path": "rlhf_lightning.data.PreferenceDataModule",
                 "init_args": {"train_file": str(train), "val_fraction": 0.0, "synthetic_pairs": 0.75}}}))
    accuracy, n = script.synthetic_fit(run, 3)
    # 0.75 of 4 records: 3 synthetic pairs, each chosen over chosen with a word said twice
    assert n == 3 and [p["synthetic"] for p in scored[0]] == [True] * 3
    assert all(script.repeated_words(p["rejected"]) and not script.repeated_words(p["chosen"]) for p in scored[0])
    assert accuracy == pytest.approx((1 + 0 + 0.5) / 3)  # a tie counts one half
    # a config without synthetic pairs gets those of synthetic_pairs 0.25: one of the 4 records
    monkeypatch.setattr(script, "error_table", lambda run: [])
    config = yaml.safe_load((run / "configs" / "reward.yaml").read_text())
    del config["data"]["init_args"]["synthetic_pairs"]
    (run / "configs" / "reward.yaml").write_text(yaml.safe_dump(config))
    assert script.main(["--runs", str(tmp_path), "--tasks", "lists", "--seeds", "0", "--synthetic", "5"]) == 0
    assert "| lists | 0 | 1 | 1.000 |" in capsys.readouterr().out
