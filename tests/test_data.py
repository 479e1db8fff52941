"""Record checks, encoding rules (masking, EOS, truncation) and the data modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.data import (
    IGNORE_INDEX,
    DataFormatError,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    encode_chat,
    encode_preference,
    encode_prompt_record,
    encode_sft,
    read_preferences,
    read_prompts,
    read_sft,
)
from rlhf_lightning.models import byte_tokenizer

from .conftest import write_lines


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_prompt_tokens_never_carry_labels(tok):
    example = encode_sft({"prompt": "Hi", "completion": " there"}, tok, max_length=64)
    prompt_len = len(tok("Hi", add_special_tokens=False).input_ids)
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tok.eos_token_id  # EOS appended and learned
    assert tok.decode(example["input_ids"][prompt_len:-1]) == " there"


def test_text_records_learn_every_token(tok):
    example = encode_sft({"text": "abc"}, tok, max_length=64)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tok.eos_token_id


def test_chat_learns_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    ids, labels = encode_chat(tok, messages)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    learned = [[]]
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if learned[-1]:
                learned.append([])
        else:
            assert label == token
            learned[-1].append(token)
    spans = [tok.decode(span) for span in learned if span]
    # Each assistant turn's content and its EOS (end of turn) are learned; nothing else.
    assert spans == ["hi there</s>", "see you</s>"]
    assert "hello" not in "".join(spans) and "<|assistant|>" not in "".join(spans)


def test_truncation_keeps_max_length_and_drops_unlearnable(tok):
    long = encode_sft({"prompt": "p", "completion": "x" * 100}, tok, max_length=10)
    assert len(long["input_ids"]) == 10 and len(long["labels"]) == 10
    assert encode_sft({"prompt": "p" * 20, "completion": "x"}, tok, max_length=10) is None


def test_preference_ends_with_eos_and_keeps_prompt_end(tok):
    pair = encode_preference({"prompt": "abcdef", "chosen": "XY", "rejected": "Z"}, tok, max_length=5)
    assert tok.decode(pair["chosen"]) == "efXY</s>"
    assert tok.decode(pair["rejected"]) == "defZ</s>"
    assert pair["margin"] == 0.0
    assert (pair["chosen_response_length"], pair["rejected_response_length"]) == (3, 2)  # "XY</s>", "Z</s>"
    # a response that fills max_length leaves no room for the prompt
    assert encode_preference({"prompt": "ab", "chosen": "WXYZ", "rejected": "Z"}, tok, max_length=3)["chosen_response_length"] == 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_preference_batch_marks_the_response_tokens(tok, side: str):
    from rlhf_lightning.data.encoding import PreferenceCollator

    pairs = [encode_preference({"prompt": "ab", "chosen": "XY", "rejected": "Z"}, tok, max_length=64),
             encode_preference({"prompt": "abcd", "chosen": "X", "rejected": "VWXYZ"}, tok, max_length=64)]
    batch = PreferenceCollator(tok.pad_token_id, side)(pairs)
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["response_mask"])]
    assert texts == ["XY</s>", "X</s>", "Z</s>", "VWXYZ</s>"]  # chosen rows, then rejected rows
    assert not (batch["response_mask"].bool() & ~batch["attention_mask"].bool()).any()  # never on padding


def test_prompt_record_renders_chat_with_generation_prompt(tok):
    ids = encode_prompt_record({"prompt": [{"role": "user", "content": "hey"}]}, tok, max_length=64)
    assert tok.decode(ids) == "<|user|>hey<|assistant|>"
    assert encode_prompt_record({"prompt": "abcdef"}, tok, max_length=3) == tok("def", add_special_tokens=False).input_ids


BAD_SFT = [
    ('{"prompt": "a", "completion": "b"', 1, None, "malformed JSON"),
    ({"prompt": "a"}, 1, "completion", "missing"),
    ({"prompt": "a", "completion": 3}, 1, "completion", "expected a string"),
    ({"prompt": "a", "completion": "  "}, 1, "completion", "empty string"),
    ({"messages": [{"role": "user"}]}, 1, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": "x"}]}, 1, "messages", "no assistant turn"),
    ({"chosen": "a", "rejected": "b"}, 1, None, "not an SFT record"),
    ("[1, 2]", 1, None, "expected a JSON object"),
]


@pytest.mark.parametrize("line, number, field, message", BAD_SFT)
def test_bad_sft_record_names_file_line_field(tmp_path: Path, line, number, field, message):
    path = write_lines(tmp_path / "sft.jsonl", [{"prompt": "ok", "completion": "fine"}, "", line])
    with pytest.raises(DataFormatError) as caught:
        read_sft(path)
    err = caught.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: ") and message in str(err)


def test_non_utf8_and_empty_files(tmp_path: Path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataFormatError, match=r"bytes.jsonl:2: bytes that are not UTF-8"):
        read_sft(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="holds no records"):
        read_sft(empty)
    with pytest.raises(DataFormatError, match="does not exist"):
        read_sft(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "p", "chosen": "a"}, "rejected"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
    ],
)
def test_bad_preference_record(tmp_path: Path, record, field):
    path = write_lines(tmp_path / "prefs.jsonl", [record])
    with pytest.raises(DataFormatError) as caught:
        read_preferences(path)
    assert caught.value.field == field and caught.value.line == 1


def test_sft_file_given_to_preference_stage_says_so(tmp_path: Path):
    path = write_lines(tmp_path / "sft.jsonl", [{"text": "hello"}])
    with pytest.raises(DataFormatError, match="not a preference record"):
        read_preferences(path)


def test_prompt_records_accept_text_and_chat(tmp_path: Path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    assert len(read_prompts(path)) == 2
    with pytest.raises(DataFormatError, match="field 'prompt'"):
        read_prompts(write_lines(tmp_path / "bad.jsonl", [{"prompt": 7}]))


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path: Path):
    records = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(40)]
    path = write_lines(tmp_path / "sft.jsonl", records)
    splits = []
    for _ in range(2):
        dm = SFTDataModule(train_file=str(path), val_fraction=0.25, tokenizer="preset:tiny-gpt2", seed=3)
        dm.setup("fit")
        splits.append(([r["prompt"] for r in dm.train_records], [r["prompt"] for r in dm.val_records]))
    (train, val), (train2, val2) = splits
    assert (train, val) == (train2, val2)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_builtin_task_feeds_every_datamodule():
    for cls in (SFTDataModule, PreferenceDataModule, PromptDataModule):
        dm = cls(tokenizer="preset:tiny-gpt2", batch_size=4)
        dm.setup("fit")
        assert dm.train_dataset and dm.val_dataset
        assert next(iter(dm.train_dataloader()))


def test_prompt_batches_are_left_padded():
    dm = PromptDataModule(tokenizer="preset:tiny-gpt2", batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mask = batch["prompt_mask"]
    assert mask[:, -1].all()  # every prompt ends at the right edge, ready for generation
    assert (batch["prompt_ids"][mask == 0] == dm.tokenizer.pad_token_id).all()


def test_preference_pairs_from_builtin_task_carry_no_labels_of_their_own():
    dm = PreferenceDataModule(tokenizer="preset:tiny-gpt2", batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "margin"}
    assert batch["input_ids"].shape[0] == 2 * batch["margin"].shape[0]