"""Tests for the menu task: grammar, conditional gold score, noisy preferences, neutral demos."""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import pytest

from rlhf_lightning.tasks import label_agreement
from rlhf_lightning.tasks.menu import (
    DEGENERATE_KINDS,
    DIETS,
    MAX_COMPLETION_CHARS,
    MAX_TEXT_BYTES,
    MENU,
    PROMPTS,
    TASTES,
    MenuTask,
    degenerate_completion,
    gold_score,
    is_valid,
    parse,
    wishes_met,
)

VEG_SPICY = "Guest: no meat or fish, something hot. Waiter: Try the"
MEAT_SWEET = "Guest: I want meat, a sweet dish. Waiter: Try the"
#: The documented noise ceiling on 2000 val pairs (seed 0), see docs/task-menu.md.
VAL_CEILING = 0.8045

# (prompt, completion, hand-computed gold score)
HAND_EXAMPLES = [
    (VEG_SPICY, " lentil curry. It is spicy.", 0.8 + 0.2),  # both wishes met, claim confirms one
    (VEG_SPICY, " lentil curry.", 0.8),  # both wishes met, no claim
    (VEG_SPICY, " pepper tuna. It is spicy.", 0.1 + 0.2),  # one wish met and confirmed
    (VEG_SPICY, " pepper tuna. It has fish.", 0.1),  # one wish met, true claim about the other
    (MEAT_SWEET, " lentil curry. It is spicy.", -0.6),  # no wish met: the bottom valid score
    (VEG_SPICY, " lentil curry. It has meat.", -1.6 + 0.05 * 2),  # false claim: invalid
    (MEAT_SWEET, " honey ham honey ham.", -1.6 + 0.05 * 2 - 0.3 * 0.5),  # repeated name
]
BAD = ["", " ", " .", " the", " Try the", " lentil", " lentil curry", " lentil cur", "lentil curry.",
       " lentil salmon.", " lentil curry lentil curry.", " lentil curry. It is spicy. It is spicy.",
       " lentil curry. It has meat.", " lentil curry. It is spicy. Try the", " Lentil curry.",
       " lentil curry.  It is spicy.", " steak frites."]
GARBAGE = ["", "\n", " ...", "\t\t", "ñ café 🍜 ☕", "\x00\x01", " lentil curry." * 500, "x" * 10000, "\u202e\ufeff"]


@pytest.fixture(scope="module")
def task() -> MenuTask:
    return MenuTask(seed=0)


@pytest.fixture(scope="module")
def sft(task: MenuTask) -> list[dict]:
    return task.sft_records(2000)


def test_records_are_deterministic_and_differ_between_seeds_and_splits(task: MenuTask) -> None:
    other = MenuTask(seed=0)
    assert task.sft_records(50) == other.sft_records(50)
    assert task.preference_records(50, "val") == other.preference_records(50, "val")
    assert task.prompt_records(50) == other.prompt_records(50)
    assert task.sft_records(50, "train") != task.sft_records(50, "val")
    assert task.preference_records(50, "train") != task.preference_records(50, "val")
    assert task.prompt_records(50, "train") != task.prompt_records(50, "val")
    assert task.sft_records(50) != MenuTask(seed=1).sft_records(50)
    assert task.preference_records(50) != MenuTask(seed=1).preference_records(50)


def test_world_is_small_and_balanced() -> None:
    assert len(PROMPTS) == 36 and max(map(len, PROMPTS)) <= 60
    assert Counter(MENU.values()) == {(d, t): 2 for d in DIETS for t in TASTES}
    assert all(len(dish.split()) == 2 for dish in MENU)


def test_demonstrations_are_valid_and_sized(sft: list[dict]) -> None:
    for record in sft:
        prompt, completion = record["prompt"], record["completion"]
        assert prompt in PROMPTS
        assert is_valid(completion), completion
        assert completion.startswith(" ") and not completion.startswith("  ")
        assert len(completion) <= MAX_COMPLETION_CHARS
        assert len((prompt + completion).encode("utf-8")) < MAX_TEXT_BYTES
        assert len(re.findall(r"\w+|[^\w\s]", completion)) <= 22


def test_vocabulary_is_small_and_degenerates_reuse_it(sft: list[dict]) -> None:
    vocabulary = {w for text in [*PROMPTS, *(r["completion"] for r in sft)] for w in re.findall(r"[A-Za-z]+", text)}
    assert len(vocabulary) <= 120
    rng = random.Random(5)
    for kind in DEGENERATE_KINDS:
        for _ in range(100):
            text = degenerate_completion(rng, rng.choice(PROMPTS), kind)
            for word in re.findall(r"[A-Za-z]+", text):  # truncation leaves a prefix of a known word
                assert word in vocabulary or (kind == "truncated" and any(v.startswith(word) for v in vocabulary)), (kind, text)


def test_every_degenerate_completion_is_invalid_and_below_every_valid(task: MenuTask) -> None:
    rng = random.Random(7)
    for kind in DEGENERATE_KINDS:
        for _ in range(100):
            prompt = rng.choice(PROMPTS)
            text = degenerate_completion(rng, prompt, kind)
            assert not task.is_valid(prompt, text), (kind, text)
            assert len(text) <= MAX_COMPLETION_CHARS
            assert -2.0 <= gold_score(prompt, text) <= -1.5


@pytest.mark.parametrize(("prompt", "completion", "expected"), HAND_EXAMPLES)
def test_hand_written_examples(prompt: str, completion: str, expected: float) -> None:
    assert gold_score(prompt, completion) == pytest.approx(expected)


def test_judge_ranks_hand_examples_in_order() -> None:
    scores = [gold_score(p, c) for p, c, _ in HAND_EXAMPLES]
    assert scores == sorted(scores, reverse=True)


def test_the_same_completion_is_top_for_one_prompt_and_bottom_valid_for_another() -> None:
    for completion in (" lentil curry.", " lentil curry. It is spicy."):
        assert gold_score(VEG_SPICY, completion) >= 0.8
        assert gold_score(MEAT_SWEET, completion) == pytest.approx(-0.6)
    assert gold_score(MEAT_SWEET, " honey ham. It is sweet.") == pytest.approx(1.0)
    assert gold_score(VEG_SPICY, " honey ham. It is sweet.") == pytest.approx(-0.6)
    # every dish is the best answer for some prompt and a zero-wish answer for another
    for dish in MENU:
        scores = [gold_score(p, f" {dish}.") for p in PROMPTS]
        assert max(scores) == pytest.approx(0.8) and min(scores) == pytest.approx(-0.6)


@pytest.mark.parametrize("text", BAD)
def test_invalid_text_scores_below_every_valid_text(text: str, sft: list[dict]) -> None:
    assert not is_valid(text)
    worst_valid = min(gold_score(r["prompt"], r["completion"]) for r in sft)
    assert gold_score(VEG_SPICY, text) < worst_valid
    assert gold_score(VEG_SPICY, text) <= -1.5


def test_parser_ignores_trailing_whitespace_and_needs_a_true_claim() -> None:
    assert parse(" lentil curry. It is spicy.\n") == ("lentil curry", "spicy")
    assert parse(" lentil curry. It has meat.") == ("lentil curry", "meat")  # parses, but false
    assert is_valid(" lentil curry.\n") and not is_valid(" lentil curry. It has meat.")


@pytest.mark.parametrize("text", GARBAGE)
def test_gold_score_never_raises_on_garbage(text: str) -> None:
    for prompt in (VEG_SPICY, "", "\n", "ñ 🍜"):
        score = gold_score(prompt, text)
        assert -2.0 <= score <= -1.5
    assert gold_score(VEG_SPICY, "") == -2.0
    assert -0.6 <= gold_score("unknown prompt", " lentil curry.") <= 1.0


def test_noise_ceiling_matches_documented_value(task: MenuTask) -> None:
    assert label_agreement(task.preference_records(2000, "val"), task.judge()) == pytest.approx(VAL_CEILING, abs=0.01)


def test_demonstrations_are_neutral_about_the_wishes(sft: list[dict]) -> None:
    diets = Counter(MENU[parse(r["completion"])[0]][0] for r in sft)
    tastes = Counter(MENU[parse(r["completion"])[0]][1] for r in sft)
    for counts in (diets, tastes):
        for share in (n / len(sft) for n in counts.values()):
            assert share == pytest.approx(1 / 3, abs=0.04)
    met = Counter(wishes_met(r["prompt"], parse(r["completion"])[0]) for r in sft)
    assert met[2] / len(sft) == pytest.approx(1 / 9, abs=0.03)  # what chance alone gives
    assert -0.3 <= statistics.mean(gold_score(r["prompt"], r["completion"]) for r in sft) <= 0.3


def test_best_of_16_demonstrations_beat_the_mean(task: MenuTask) -> None:
    rng = random.Random(11)
    best, mean = [], []
    for _ in range(300):
        prompt = task.draw_prompt(rng)
        scores = [gold_score(prompt, task.good_completion(rng, prompt)) for _ in range(16)]
        best.append(max(scores))
        mean.append(statistics.mean(scores))
    assert statistics.mean(best) > statistics.mean(mean) + 0.6
