"""Tests for the built-in sentiment task: grammar, gold annotator, noisy preferences, files."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from rlhf_lightning.tasks import DEFAULT_NOISE_TEMPERATURE, DEFAULT_SIZES, SentimentTask, win_rate
from rlhf_lightning.tasks import label_agreement as judged_agreement
from rlhf_lightning.tasks.sentiment import (
    DEGENERATE_KINDS,
    MAX_TEXT_BYTES,
    PROMPTS,
    SENTIMENTS,
    degenerate_completion,
    gold_score,
    is_fluent,
    judge,
    sample_completion,
    sentiment_label,
)


def label_agreement(records: list[dict]) -> float:
    return judged_agreement(records, judge)


def fluency_rate(completions: list[str]) -> float:
    if not completions:
        raise ValueError("no completions")
    return sum(judge.is_valid([P] * len(completions), completions)) / len(completions)


def write_task_files(out_dir: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    return SentimentTask(seed).write_files(out_dir, sizes)

P = PROMPTS[0]
POSITIVE = " really great and fun. I loved the music."
NEGATIVE = " boring and awful. The plot was weak."
NEUTRAL = " okay and quite long. I noticed the ending."
DEGENERATE = [
    "",
    " ",
    " .",
    " great",  # no period
    " great great great great great.",  # repeated word, the classic reward hack
    " great and great.",  # grammatical shape, but a repeated word
    " great and fun. great and fun. great and fun.",  # repeated clause
    " The music was lovely. The music was lovely.",  # repeated sentence
    " and fun great really.",  # shuffled words
    " loved I music the great.",  # shuffled words
    " really wonderful and bril",  # truncated mid-word
    " superb and stunning.",  # out-of-vocabulary word
    "great and fun.",  # missing the leading space that continues the prompt
    " great and fun. The",  # runs on past the end
    " excellent but but silly.",  # a doubled word (what a word-level policy slips into)
    " wonderful and but short.",  # a stray connector
    " excellent. but brilliant.",  # a connector after the sentence ended
]


@pytest.fixture(scope="module")
def task() -> SentimentTask:
    return SentimentTask(seed=0)


@pytest.fixture(scope="module")
def sft(task: SentimentTask) -> list[dict]:
    return task.sft_records(2000)


@pytest.fixture(scope="module")
def prefs(task: SentimentTask) -> list[dict]:
    return task.preference_records(1500)


def test_every_sft_completion_is_fluent_and_sized(sft: list[dict]) -> None:
    assert fluency_rate([r["completion"] for r in sft]) == 1.0
    for record in sft:
        completion = record["completion"]
        assert record["prompt"] in PROMPTS
        assert completion.startswith(" ") and completion.endswith(".")
        assert 20 <= len(completion) <= 80
        assert len((record["prompt"] + completion).encode("utf-8")) < MAX_TEXT_BYTES


def test_sft_sentiment_is_balanced(sft: list[dict]) -> None:
    shares = Counter(sentiment_label(r["completion"]) for r in sft)
    assert set(shares) == set(SENTIMENTS)
    for label in SENTIMENTS:
        assert 0.18 <= shares[label] / len(sft) <= 0.32, shares


def test_hand_written_examples_are_fluent() -> None:
    for text in (POSITIVE, NEGATIVE, NEUTRAL, " good but dull.", " fine. The cast was so silly.", " great and fun.\n"):
        assert is_fluent(text), text


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_text_is_not_fluent_and_below_every_fluent(text: str, sft: list[dict]) -> None:
    assert not is_fluent(text)
    worst_fluent = min(gold_score(r["prompt"], r["completion"]) for r in sft)
    assert gold_score(P, text) < worst_fluent
    assert gold_score(P, text) < gold_score(P, NEGATIVE)
    assert -2.0 <= gold_score(P, text) <= 1.0


def test_generated_degenerates_are_never_fluent() -> None:
    rng = random.Random(7)
    for kind in DEGENERATE_KINDS:
        for _ in range(100):
            text = degenerate_completion(rng, kind)
            assert not is_fluent(text), (kind, text)
            assert gold_score(P, text) <= -1.5


def test_word_level_degenerates_look_like_a_word_level_policys_mistakes() -> None:
    """repeat_word comes as the blunt hack and as a fluent-shaped review reusing one adjective;
    word_slip keeps every word a task word (no misspelling) but breaks the grammar."""
    from rlhf_lightning.tasks.sentiment import ADJECTIVES, LEXICON

    grammar_words = LEXICON | {"and", "but", "the", "was", "i"}

    rng = random.Random(3)
    repeats = [degenerate_completion(rng, "repeat_word") for _ in range(200)]
    blunt = [t for t in repeats if len(set(t.strip(" .").split())) == 1]
    subtle = [t for t in repeats if t not in blunt]
    assert len(blunt) > 50 and len(subtle) > 50
    for text in subtle:
        adjectives = [w.rstrip(".") for w in text.split() if w.rstrip(".") in ADJECTIVES]
        assert len(adjectives) >= 2 and len(set(adjectives)) == 1, text
    for _ in range(200):
        slip = degenerate_completion(rng, "word_slip")
        assert set(slip.replace(".", "").lower().split()) <= grammar_words, slip


def test_repetition_scores_below_its_clean_version() -> None:
    assert gold_score(P, " great great great great great.") < gold_score(P, " great great.")
    assert gold_score(P, " great and great.") < gold_score(P, " great and fun.")
    assert gold_score(P, " The plot was fun. The plot was fun.") < gold_score(P, " fun. The plot was dull.")


def test_very_short_fluent_text_is_punished() -> None:
    assert is_fluent(" great.")
    assert gold_score(P, " great.") < gold_score(P, NEGATIVE)
    assert gold_score(P, " great.") > gold_score(P, " great")  # still above non-fluent text


def test_sentiment_order() -> None:
    pos, neu, neg = (gold_score(P, t) for t in (POSITIVE, NEUTRAL, NEGATIVE))
    assert pos > neu > neg
    assert gold_score(P, " good but dull. I liked the cast.") > gold_score(P, " good but dull. I hated the cast.")
    assert gold_score(P, " really great and fun.") > gold_score(P, " great and fun.")  # emphasis counts
    assert -1.0 <= neg and pos <= 1.0


def test_win_rate_on_hand_written_examples() -> None:
    prompts = [P, P, P, P]
    a = [POSITIVE, NEUTRAL, " great great great.", POSITIVE]
    b = [NEGATIVE, NEGATIVE, NEGATIVE, POSITIVE]
    assert win_rate(judge, prompts, a, b) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert win_rate(judge, prompts, b, a) == pytest.approx((0 + 0 + 1 + 0.5) / 4)
    with pytest.raises(ValueError):
        win_rate(judge, prompts, a, b[:2])


def test_judge_is_the_gold_score_and_the_fluency_check() -> None:
    texts = [POSITIVE, NEGATIVE, " great great.", ""]
    assert judge([P] * 4, texts) == [gold_score(P, t) for t in texts]
    assert judge.is_valid([P] * 4, texts) == [True, True, False, False]


def test_preference_records_are_noisy_but_mostly_right(prefs: list[dict]) -> None:
    agreement = label_agreement(prefs)
    assert 0.75 <= agreement <= 0.92, agreement
    # Noise comes from the temperature: near-zero temperature gives (almost) perfect labels.
    # (Ties, where gold is indifferent, stay a coin flip, so compare on the untied records.)
    sharp = SentimentTask(seed=0, noise_temperature=1e-3).preference_records(500)
    untied = [r for r in sharp if gold_score(P, r["chosen"]) != gold_score(P, r["rejected"])]
    assert len(untied) > 400
    assert label_agreement(untied) == 1.0
    assert label_agreement(sharp) > agreement + 0.05
    assert DEFAULT_NOISE_TEMPERATURE > 0


def test_preference_candidates_include_degenerates(prefs: list[dict]) -> None:
    for record in prefs:
        assert set(record) == {"prompt", "chosen", "rejected"}
        assert record["chosen"] != record["rejected"]
        for text in (record["chosen"], record["rejected"]):
            assert len((record["prompt"] + text).encode("utf-8")) < MAX_TEXT_BYTES
    candidates = [t for r in prefs for t in (r["chosen"], r["rejected"])]
    degenerate_share = 1.0 - fluency_rate(candidates)
    assert 0.15 <= degenerate_share <= 0.25, degenerate_share


def test_label_agreement_counts_ties_as_half() -> None:
    records = [
        {"prompt": P, "chosen": POSITIVE, "rejected": NEGATIVE},
        {"prompt": P, "chosen": NEGATIVE, "rejected": POSITIVE},
        {"prompt": P, "chosen": " great and fun.", "rejected": " fun and great."},
    ]
    assert label_agreement(records) == pytest.approx(0.5)
    assert label_agreement(records[:1]) == 1.0


def test_records_are_deterministic_and_splits_differ(task: SentimentTask) -> None:
    other = SentimentTask(seed=0)
    assert task.sft_records(50) == other.sft_records(50)
    assert task.preference_records(50, "val") == other.preference_records(50, "val")
    assert task.prompt_records(50) == other.prompt_records(50)
    assert task.sft_records(50, "train") != task.sft_records(50, "val")
    assert task.prompt_records(50, "train") != task.prompt_records(50, "val")
    assert task.sft_records(50) != SentimentTask(seed=1).sft_records(50)
    assert all(set(r) == {"prompt"} and r["prompt"] in PROMPTS for r in task.prompt_records(50))
    assert sample_completion(random.Random(3)) == sample_completion(random.Random(3))


def test_write_files_valid_jsonl_and_byte_identical(tmp_path: Path) -> None:
    sizes = {"sft_train": 60, "prefs_train": 40, "prompts_val": 7}
    paths = write_task_files(tmp_path / "a", seed=5, sizes=sizes)
    again = SentimentTask(seed=5).write_files(tmp_path / "b", sizes=sizes)
    fields = {"sft": {"prompt", "completion"}, "prefs": {"prompt", "chosen", "rejected"}, "prompts": {"prompt"}}
    assert set(paths) == set(DEFAULT_SIZES)
    for name, path in paths.items():
        assert path == tmp_path / "a" / f"{name}.jsonl"
        assert path.read_bytes() == again[name].read_bytes()
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == sizes.get(name, DEFAULT_SIZES[name])
        for line in lines:
            record = json.loads(line)
            assert set(record) == fields[name.split("_")[0]]
            assert all(isinstance(v, str) for v in record.values())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"{n}.jsonl" for n in DEFAULT_SIZES)
    different = write_task_files(tmp_path / "c", seed=6, sizes=sizes)
    assert different["sft_train"].read_bytes() != paths["sft_train"].read_bytes()
    with pytest.raises(ValueError):
        write_task_files(tmp_path / "d", sizes={"sft_test": 3})
