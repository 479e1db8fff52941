"""benchmarks/reward_errors.py splits a reward model's held-out accuracy by kind of pair; the
kinds' lost points add up to the gap to the noise ceiling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_errors_script():
    return load_script(ROOT / "benchmarks" / "reward_errors.py", "reward_errors_benchmark")


def test_repeated_words_ignore_short_and_common_ones():
    script = load_errors_script()
    assert script.repeats_a_word(" apple, banana, apple.")
    assert script.repeats_a_word(" so charming and Charming.")
    assert not script.repeats_a_word(" the cat and the dog and a fox.")  # "the", "and"; "a" is short
    assert not script.repeats_a_word(" axe, saw.")


def test_kinds_of_pairs_and_their_share_of_the_gap(monkeypatch):
    script = load_errors_script()
    prompt = "List two fruits:"
    records = [
        {"prompt": prompt, "chosen": " apple, banana.", "rejected": " apple."},        # valid / valid
        {"prompt": prompt, "chosen": " apple, apple.", "rejected": " apple, banana."},  # a noisy label; repeat
        {"prompt": prompt, "chosen": " apple, banana.", "rejected": " apple, banana"},  # no final period
        {"prompt": prompt, "chosen": " apple, apple.", "rejected": " kiwi"},            # invalid / invalid
    ]
    scores = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    monkeypatch.setattr(script, "datamodule_records", lambda config: ([], records))
    monkeypatch.setattr(script, "reward_pair_scores", lambda folder, recs: scores)
    rows = {row["kind"]: row for row in script.error_table(Path("runs/lists/seed0"))}
    assert list(rows) == list(script.KINDS)
    assert all(row["n"] == 1 for row in rows.values())
    assert rows["valid / valid"]["acc"] == 1 and rows["valid / valid"]["ceiling"] == 1
    repeat = rows["valid / invalid, repeats a word"]
    assert (repeat["acc"], repeat["ceiling"], repeat["rm~judge"]) == (1, 0, 0)  # follows the noisy label
    other = rows["valid / invalid, other"]
    assert (other["acc"], other["ceiling"], other["rm~judge"]) == (0, 1, 0)
    assert rows["invalid / invalid"]["acc"] == 0.5  # a tie of the reward model counts one half
    accuracy = sum(row["acc"] for row in rows.values()) / 4
    ceiling = sum(row["ceiling"] for row in rows.values()) / 4
    assert sum(row["lost"] for row in rows.values()) == pytest.approx(100 * (ceiling - accuracy))
