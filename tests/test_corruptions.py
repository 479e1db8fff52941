"""Synthetic preference pairs: the corruption and the data module option that adds them."""

from __future__ import annotations

import logging
import random
import re

import pytest

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.corruptions import repeat_word
from rlhf_lightning.errors import UserInputError

from .conftest import write_lines


def test_repeat_word_says_an_earlier_word_again_in_place_of_a_later_one():
    outcomes = {repeat_word(" apple, banana, cherry.", random.Random(seed)) for seed in range(200)}
    # (source, replaced word): (apple, banana), (apple, cherry), (banana, cherry); punctuation kept
    assert outcomes == {" apple, apple, cherry.", " apple, banana, apple.", " apple, banana, banana."}


def test_repeat_word_never_repeats_a_short_or_already_repeated_word():
    # "a" is too short and "cat" is said twice already: only "and" and "dog" are repeated,
    # each in place of any later word
    outcomes = {repeat_word(" a cat and a dog, a cat.", random.Random(seed)) for seed in range(400)}
    assert outcomes == {
        " a cat and and dog, a cat.", " a cat and a and, a cat.", " a cat and a dog, and cat.", " a cat and a dog, a and.",
        " a cat and a dog, dog cat.", " a cat and a dog, a dog.",
    }


@pytest.mark.parametrize("text", [" saw.", " axe, axe.", " a b.", ""])
def test_repeat_word_is_none_when_no_word_can_be_repeated(text):
    assert repeat_word(text, random.Random(0)) is None


def pairs(n: int) -> list[dict]:
    fruits = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
    return [{"prompt": f"List three fruits ({i}):", "chosen": " " + ", ".join(fruits[i % 3:i % 3 + 3]) + ".",
             "rejected": " fruit."} for i in range(n)]


def trained_on(**kwargs) -> PreferenceDataModule:
    """A data module after setup (what a fit trains and validates on)."""
    data = PreferenceDataModule(tokenizer="preset:micro-gpt2", max_length=64, **kwargs)
    data.setup("fit")
    return data


def test_synthetic_pairs_add_chosen_over_its_corruption_to_training_records_only(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", pairs(8))
    val = write_lines(tmp_path / "val.jsonl", pairs(3))
    data = trained_on(train_file=str(train), val_file=str(val), synthetic_pairs=0.5, seed=3)
    records, held_out = data.train_records, data.val_records
    assert records[:8] == pairs(8) and held_out == pairs(3)
    assert len(data.train_dataset) == 12 and len(data.val_dataset) == 3
    # the records read stay the files' own (the iterate loop counts them as labels)
    assert data.load_records() == (pairs(8), pairs(3))
    synthetic = records[8:]
    assert len(synthetic) == 4 and all(r["synthetic"] for r in synthetic)
    originals = {r["prompt"]: r for r in pairs(8)}
    for record in synthetic:
        assert record["chosen"] == originals[record["prompt"]]["chosen"]
        assert record["rejected"] in {repeat_word(record["chosen"], random.Random(s)) for s in range(100)}
    # drawn with the seed: the same records again, other ones for another seed
    assert trained_on(train_file=str(train), val_file=str(val), synthetic_pairs=0.5, seed=3).train_records == records
    other = trained_on(train_file=str(train), val_file=str(val), synthetic_pairs=0.5, seed=4).train_records
    assert other[8:] != synthetic
    assert trained_on(train_file=str(train), val_file=str(val)).train_records == pairs(8)


def shout(text: str, rng: random.Random) -> str | None:
    return None if "cherry" in text else text.upper()


def test_synthetic_pairs_take_a_corruption_by_import_path_and_skip_what_it_cannot_corrupt(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", pairs(6))
    data = trained_on(train_file=str(train), val_fraction=0.0, synthetic_pairs=1.0,
                      corruption="tests.test_corruptions.shout")
    synthetic = data.train_records[6:]
    assert [r["rejected"] for r in synthetic] == [r["chosen"].upper() for r in pairs(6) if "cherry" not in r["chosen"]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"synthetic_pairs": 1.5}, "data.init_args.synthetic_pairs must be in [0, 1], got 1.5"),
    ({"synthetic_pairs": 0.5, "corruption": "tests.test_corruptions.nothing"}, "data.init_args.corruption: cannot import"),
])
def test_synthetic_pair_options_are_checked(kwargs, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        PreferenceDataModule(train_file="unused.jsonl", **kwargs)


def test_cli_takes_synthetic_pairs_and_names_a_bad_corruption(tmp_path, byte_gpt2_dir, capfd, caplog):
    from rlhf_lightning.cli import main

    from .test_reward import _demo_config, _pairs

    config = _demo_config(tmp_path, str(byte_gpt2_dir), write_lines(tmp_path / "train.jsonl", _pairs(8)))
    run = ["fit", "--config", str(config), "--trainer.max_steps=1", "--data.init_args.synthetic_pairs=0.5"]
    with caplog.at_level(logging.INFO):
        assert main([*run, "--data.init_args.corruption=tests.test_corruptions.shout"]) == 0
    # half of the 6 training pairs (8 less the 0.25 held out) give a synthetic pair
    assert "3 synthetic pairs added to 6 training pairs (data.init_args.synthetic_pairs=0.5)" in caplog.text
    assert main([*run, "--data.init_args.corruption=tests.test_corruptions.nothing"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert "data.init_args.corruption: cannot import 'tests.test_corruptions.nothing'" in err[-1]
