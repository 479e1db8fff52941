"""Tests for the describe task: grammar, length trade-off of the gold score, noisy preferences."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from rlhf_lightning.tasks import label_agreement
from rlhf_lightning.tasks.describe import (
    ADJECTIVES,
    DETAIL_NOUNS,
    MAX_DETAILS,
    MIN_DETAILS,
    OPTIMUM,
    PROMPTS,
    DescribeTask,
    describe,
    parse_description,
    subject_of,
    token_count,
)

KITCHEN = "Describe the kitchen:"
#: The measured noise ceiling on 2000 val pairs (seed 0), as documented in docs/task-describe.md.
DOCUMENTED_VAL_CEILING = 0.821

HAND_SCORED = [  # (completion for KITCHEN, hand-computed gold score)
    (" big table, red cup, warm stove, old sink.", 1.0),  # 4 details: the optimum
    (" big table, red cup.", -0.2),  # 2 details: 1 - 0.6 * 2
    (" big table, very red cup, warm stove, old sink, and so on.", 0.4),  # optimum less 2 filler * 0.3
    (" big table, red cup, warm stove, old sink, cold pot, dark bowl.", -0.4),  # 6 details: 1 - 0.7 * 2
    (" big table, red cup", -1.5),  # no final period: invalid, all nouns relevant, no repeats
    (" big cow, red barn.", -1.6),  # things of the farm: invalid, relevance 0
    (" big table, red cup, big table.", -1.6),  # repeated detail: -1.6 + 0.1 - 0.3 * (1 - 4/6)
    (" cup cup cup cup.", -1.725),  # -1.6 + 0.1 - 0.3 * 0.75
    (" ", -2.0),
]
INVALID = [text for text, score in HAND_SCORED if score < -1] + [
    "",
    " .",
    "big table.",  # no leading space
    "  big table.",  # two leading spaces
    " big table, red table.",  # the same thing twice
    " table, red cup.",  # a detail without its adjective
    " very very big table.",  # doubled filler
    " big table red cup.",  # separator lost
    " big table, red cup. the",  # run-on
    " Big table.",  # capitalised
    " and so on.",  # filler only
    " big table, red cup, warm stove, old sink, cold pot, dark bowl, soft knife.",  # 7 details
]


@pytest.fixture(scope="module")
def task() -> DescribeTask:
    return DescribeTask(seed=0)


@pytest.fixture(scope="module")
def demos(task: DescribeTask) -> list[dict]:
    return task.sft_records(2000)


def details_of(record: dict) -> int:
    return len(parse_description(subject_of(record["prompt"]), record["completion"])[0])


def test_records_are_deterministic_per_seed_and_differ_between_seeds_and_splits(task: DescribeTask) -> None:
    again = DescribeTask(seed=0)
    assert task.sft_records(50) == again.sft_records(50)
    assert task.preference_records(50) == again.preference_records(50)
    assert task.prompt_records(50) == again.prompt_records(50)
    assert task.sft_records(50) != DescribeTask(seed=1).sft_records(50)
    assert task.sft_records(50, "train") != task.sft_records(50, "val")
    assert task.preference_records(50, "train") != task.preference_records(50, "val")


def test_demonstrations_are_valid_and_within_limits(task: DescribeTask, demos: list[dict]) -> None:
    for r in demos:
        prompt, text = r["prompt"], r["completion"]
        assert task.is_valid(prompt, text), text
        assert text.startswith(" ") and not text.startswith("  ")
        assert len(text) <= 80 and len((prompt + text).encode("utf-8")) < 120 and token_count(text) <= 22
    assert all(len(p) <= 60 for p in PROMPTS)


def test_degenerate_completions_are_invalid_and_use_task_words(task: DescribeTask) -> None:
    rng = random.Random(0)
    vocabulary = {w for p in PROMPTS for w in re.findall(r"[a-z]+", p.lower())}
    vocabulary |= set(ADJECTIVES) | {n for nouns in DETAIL_NOUNS.values() for n in nouns} | {"very", "and", "so", "on"}
    for _ in range(500):
        prompt = rng.choice(PROMPTS)
        text = task.degenerate_completion(rng, prompt)
        assert not task.is_valid(prompt, text) and len(text) <= 80, text
        for word in re.findall(r"[a-z]+", text.lower()):  # whole task words, or a truncated one
            assert any(v.startswith(word) for v in vocabulary), (word, text)


@pytest.mark.parametrize(("completion", "expected"), HAND_SCORED)
def test_hand_scored_examples(task: DescribeTask, completion: str, expected: float) -> None:
    assert task.gold_score(KITCHEN, completion) == pytest.approx(expected)
    assert task.is_valid(KITCHEN, completion) == (expected >= -1)


@pytest.mark.parametrize("completion", INVALID)
def test_invalid_text_scores_below_every_valid_text(task: DescribeTask, completion: str) -> None:
    assert not task.is_valid(KITCHEN, completion)
    assert -2.0 <= task.gold_score(KITCHEN, completion) <= -1.5


def test_valid_scores_lie_in_the_valid_tier(task: DescribeTask, demos: list[dict]) -> None:
    scores = [task.gold_score(r["prompt"], r["completion"]) for r in demos]
    assert min(scores) >= -1.0 and max(scores) <= 1.0


def test_best_k_detail_score_rises_to_the_optimum_then_falls(task: DescribeTask) -> None:
    """The length trade-off: more details help up to OPTIMUM and hurt after it."""
    rng = random.Random(0)
    best = {
        k: max(task.gold_score(KITCHEN, describe(rng, "kitchen", k)) for _ in range(200))
        for k in range(MIN_DETAILS, MAX_DETAILS + 1)
    }
    assert best[OPTIMUM] == 1.0
    for k in range(MIN_DETAILS, OPTIMUM):
        assert best[k] < best[k + 1]
    for k in range(OPTIMUM, MAX_DETAILS):
        assert best[k] > best[k + 1]


def test_filler_is_valid_but_costs(task: DescribeTask) -> None:
    plain = " big table, red cup, warm stove."
    padded = " big table, very red cup, warm stove, and so on."
    assert task.is_valid(KITCHEN, padded)
    assert task.gold_score(KITCHEN, padded) < task.gold_score(KITCHEN, plain)


def test_a_detail_of_another_place_is_invalid(task: DescribeTask) -> None:
    text = " big table, red cup."
    assert task.is_valid(KITCHEN, text)
    assert not task.is_valid("Describe the farm:", text)
    assert task.gold_score("Describe the farm:", text) < task.gold_score(KITCHEN, text)


@pytest.mark.parametrize("garbage", ["", "\n", " ...", "  ", " \u00e9\u00e8 \u2603.", "x" * 5000, " big table." * 300, "\x00\t"])
@pytest.mark.parametrize("prompt", [KITCHEN, "", "Describe nothing:", "\u2603"])
def test_gold_score_never_raises(task: DescribeTask, prompt: str, garbage: str) -> None:
    score = task.gold_score(prompt, garbage)
    assert -2.0 <= score <= 1.0 and round(score, 6) == score
    assert isinstance(task.is_valid(prompt, garbage), bool)


def test_label_agreement_is_the_documented_ceiling(task: DescribeTask) -> None:
    agreement = label_agreement(task.preference_records(2000, "val"), task.judge())
    assert agreement == pytest.approx(DOCUMENTED_VAL_CEILING, abs=0.01)
    assert 0.78 <= agreement <= 0.87


def test_demonstrations_are_neutral_about_length(demos: list[dict]) -> None:
    counts = Counter(details_of(r) for r in demos)
    assert set(counts) == set(range(MIN_DETAILS, MAX_DETAILS + 1))
    for k in counts:
        assert counts[k] / len(demos) == pytest.approx(1 / 6, abs=0.03)


def test_best_of_16_demonstrations_beats_the_mean(task: DescribeTask, demos: list[dict]) -> None:
    scores = [task.gold_score(r["prompt"], r["completion"]) for r in demos]
    mean = sum(scores) / len(scores)
    assert -0.3 <= mean <= 0.3
    best = [max(scores[i : i + 16]) for i in range(0, len(scores), 16)]
    assert sum(best) / len(best) > mean + 0.5
