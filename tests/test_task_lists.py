"""Tests for the lists task: list form, count/order gold score, neutral demos, noisy preferences."""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import pytest

from rlhf_lightning.tasks import label_agreement
from rlhf_lightning.tasks.lists import (
    CATEGORIES,
    DEGENERATE_KINDS,
    ITEMS,
    MAX_COMPLETION_CHARS,
    MAX_TEXT_BYTES,
    PROMPTS,
    ListsTask,
    degenerate_completion,
    disorder,
    gold_score,
    is_valid,
    parse_prompt,
)

THREE = "List three animals:"
THREE_SORTED = "List three animals in alphabetical order:"
DOCUMENTED_VAL_CEILING = 0.8205  # label_agreement on preference_records(2000, "val"), seed 0

# (prompt, completion, hand-computed gold): 1 - 0.5 |n - count| - 0.4 disorder (if asked);
# invalid: -1.5 - 0.25 repeated - 0.25 off-category.
HAND_EXAMPLES = [
    (THREE, " cat, dog, horse.", 1.0),
    (THREE_SORTED, " dog, cat, horse.", 1 - 0.4 / 3),  # one of three pairs out of order
    (THREE_SORTED, " horse, dog, cat.", 0.6),  # reversed
    ("List two colours:", " red, blue, green.", 0.5),  # one extra item
    (THREE, " cat.", 0.0),  # the tempting short answer: two items missing
    ("List five fruits:", " apple.", -1.0),  # four missing, clipped
    (THREE, " cat, dog, horse", -1.5),  # no final period
    (THREE, " cat, dog, hammer.", -1.5 - 0.25 / 3),  # a tool among animals
    (THREE, " cat, cat, cat.", -1.5 - 0.25 * 2 / 3),  # repeated item
    (THREE, " .", -2.0),
]
GARBAGE = ["", "\n", " ", " ...", "ünïcødé ✓ 🐱", "cat, dog, horse.", " Cat, Dog, Horse.", " cat,dog.", " cat, dog. " + "cat " * 500, "\x00"]


@pytest.fixture(scope="module")
def task() -> ListsTask:
    return ListsTask(seed=0)


@pytest.fixture(scope="module")
def sft(task: ListsTask) -> list[dict]:
    return task.sft_records(2000)


def test_prompts_cover_categories_counts_and_order() -> None:
    requests = [parse_prompt(p) for p in PROMPTS]
    assert len(PROMPTS) == 50 and all(len(p) <= 60 for p in PROMPTS)
    assert {r.category for r in requests} == set(CATEGORIES)
    assert {r.count for r in requests} == {1, 2, 3, 4, 5}
    assert sum(r.ordered for r in requests) == 25
    assert parse_prompt("List one animal:").count == 1 and parse_prompt("  List two tools:\n").category == "tools"
    assert parse_prompt("List six animals:") is None


def test_records_are_deterministic_and_differ_between_seeds_and_splits(task: ListsTask) -> None:
    other = ListsTask(seed=0)
    assert task.sft_records(50) == other.sft_records(50)
    assert task.preference_records(50, "val") == other.preference_records(50, "val")
    assert task.prompt_records(50) == other.prompt_records(50)
    assert task.sft_records(50, "train") != task.sft_records(50, "val")
    assert task.preference_records(50, "train") != task.preference_records(50, "val")
    assert task.sft_records(50) != ListsTask(seed=1).sft_records(50)
    assert task.preference_records(50) != ListsTask(seed=1).preference_records(50)


def test_demonstrations_are_valid_and_within_limits(sft: list[dict]) -> None:
    for record in sft:
        prompt, completion = record["prompt"], record["completion"]
        assert prompt in PROMPTS and is_valid(prompt, completion)
        assert completion.startswith(" ") and not completion.startswith("  ")
        assert len(completion) <= MAX_COMPLETION_CHARS
        assert len((prompt + completion).encode("utf-8")) < MAX_TEXT_BYTES
        assert len(re.findall(r"\w+|[^\w\s]", completion)) <= 22


def test_every_degenerate_is_invalid_scores_low_and_uses_task_words() -> None:
    vocabulary = {w.lower() for p in PROMPTS for w in re.findall(r"[A-Za-z]+", p)} | ITEMS
    rng = random.Random(5)
    for kind in DEGENERATE_KINDS:
        for _ in range(150):
            prompt = rng.choice(PROMPTS)
            text = degenerate_completion(rng, prompt, kind)
            assert not is_valid(prompt, text), (kind, text)
            assert len(text) <= MAX_COMPLETION_CHARS and text.startswith(" ")
            assert -2.0 <= gold_score(prompt, text) <= -1.5
            for word in re.findall(r"[A-Za-z]+", text):  # whole task words, or a truncated item
                assert word.lower() in vocabulary or any(i.startswith(word) for i in ITEMS), (kind, text)


@pytest.mark.parametrize(("prompt", "completion", "expected"), HAND_EXAMPLES)
def test_hand_written_examples(prompt: str, completion: str, expected: float) -> None:
    assert gold_score(prompt, completion) == pytest.approx(expected, abs=1e-6)
    assert is_valid(prompt, completion) == (expected >= -1.0)


def test_short_answer_sits_between_correct_count_and_invalid_text() -> None:
    correct, one_item = gold_score(THREE, " fox, cat, lion."), gold_score(THREE, " fox.")
    assert correct - one_item >= 0.9
    assert one_item > max(gold_score(THREE, t) for t in (" fox", " fox, fox, fox.", " fox cat lion."))


def test_same_list_is_top_for_one_prompt_and_low_for_another() -> None:
    answer = " cat, dog, horse."
    assert gold_score(THREE, answer) == 1.0
    assert gold_score("List one animal:", answer) == 0.0
    assert gold_score("List five animals:", answer) == 0.0
    assert gold_score("List three fruits:", answer) < -1.5  # wrong category: invalid


def test_order_matters_only_when_asked() -> None:
    sorted_list, reversed_list = " apple, cherry, lemon, peach.", " peach, lemon, cherry, apple."
    assert gold_score("List four fruits:", sorted_list) == gold_score("List four fruits:", reversed_list) == 1.0
    ordered = "List four fruits in alphabetical order:"
    assert gold_score(ordered, sorted_list) == 1.0 > gold_score(ordered, reversed_list) == pytest.approx(0.6)
    # the count still matters more: right count, reversed beats one item short, sorted
    assert gold_score(ordered, reversed_list) > gold_score(ordered, " apple, cherry, lemon.")
    assert disorder(["cat"]) == 0.0 and disorder(["dog", "cat", "horse"]) == pytest.approx(1 / 3)


def test_invalid_text_always_scores_below_valid_text(sft: list[dict]) -> None:
    worst_valid = min(gold_score(r["prompt"], r["completion"]) for r in sft)
    assert worst_valid >= -1.0
    for prompt in PROMPTS[:10]:
        for text in GARBAGE:
            assert gold_score(prompt, text) < worst_valid


@pytest.mark.parametrize("text", GARBAGE)
def test_gold_score_never_raises_on_garbage(text: str) -> None:
    for prompt in (THREE, "", "garbage ✓", "\n"):
        score = gold_score(prompt, text)
        assert -2.0 <= score <= -1.5 and score == round(score, 6)
        assert not is_valid(prompt, text)
    assert gold_score(THREE, "") == -2.0 and gold_score(THREE, "\n") == -2.0


def test_label_agreement_equals_documented_ceiling(task: ListsTask) -> None:
    records = task.preference_records(2000, "val")
    assert label_agreement(records, task.judge()) == pytest.approx(DOCUMENTED_VAL_CEILING, abs=0.01)
    assert 0.78 <= DOCUMENTED_VAL_CEILING <= 0.87


def test_demonstrations_are_neutral_about_count_and_order(sft: list[dict]) -> None:
    lengths = Counter(r["completion"].count(",") + 1 for r in sft)
    assert set(lengths) == {1, 2, 3, 4, 5}
    for n in range(1, 6):
        assert 0.17 <= lengths[n] / len(sft) <= 0.23, lengths
    exact = sum(r["completion"].count(",") + 1 == parse_prompt(r["prompt"]).count for r in sft)
    assert 0.17 <= exact / len(sft) <= 0.23  # the asked count is not favoured

    def sorted_share(ordered: bool) -> float:
        lists = [r["completion"].strip(" .").split(", ") for r in sft if parse_prompt(r["prompt"]).ordered == ordered]
        return sum(items == sorted(items) for items in lists) / len(lists)

    assert sorted_share(True) == pytest.approx(sorted_share(False), abs=0.05)  # order not favoured


def test_best_of_16_demonstrations_beats_the_mean(task: ListsTask) -> None:
    rng = random.Random(11)
    best, mean = [], []
    for prompt in PROMPTS:
        scores = [gold_score(prompt, task.good_completion(rng, prompt)) for _ in range(16)]
        best.append(max(scores))
        mean.append(statistics.mean(scores))
    assert statistics.mean(best) > statistics.mean(mean) + 0.5
    assert -0.3 <= statistics.mean(mean) <= 0.3
