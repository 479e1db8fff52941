"""Training a BPE tokenizer on demonstrations, and a preset model that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from transformers import AutoTokenizer

from rlhf_lightning.cli import main
from rlhf_lightning.data import SFTDataModule
from rlhf_lightning.models import ModelLoadError, is_complete_hf_folder, load_causal_lm, load_tokenizer
from rlhf_lightning.modules import RewardModule, SFTModule
from rlhf_lightning.tasks import SentimentTask
from rlhf_lightning.tasks.sentiment import LEXICON, PROMPTS
from rlhf_lightning.tokenizer_training import (
    MIN_VOCAB_SIZE,
    demonstration_text,
    train_bpe_tokenizer,
    train_tokenizer_folder,
)

from .conftest import write_lines

TASK_TEXTS = [demonstration_text(r) for r in SentimentTask(0).sft_records(1000)]


@pytest.fixture(scope="module")
def task_tokenizer():
    return train_bpe_tokenizer(TASK_TEXTS)


def test_every_task_word_is_one_token_and_misspellings_split(task_tokenizer):
    for word in sorted(LEXICON):
        assert len(task_tokenizer.tokenize(" " + word)) == 1, word
    assert len(task_tokenizer.tokenize(" seperb")) > 1
    # The vocabulary stops growing once every word is whole: far below the default bound.
    assert len(task_tokenizer) < 1000


def test_special_tokens_and_exact_round_trip(task_tokenizer):
    assert (task_tokenizer.eos_token_id, task_tokenizer.pad_token_id) == (0, 1)
    assert task_tokenizer.bos_token_id == task_tokenizer.eos_token_id
    for text in (PROMPTS[0] + " quite good . I notced  the plot.", " café ☕ ünïcode!\n", " "):
        ids = task_tokenizer(text)["input_ids"]
        assert task_tokenizer.eos_token_id not in ids and task_tokenizer.pad_token_id not in ids
        assert task_tokenizer.decode(ids) == text
    rendered = task_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "great."}], tokenize=False
    )
    assert rendered == "<|user|>hi<|assistant|>great.<|endoftext|>"


def test_vocab_size_is_an_upper_bound_and_has_a_floor():
    assert len(train_bpe_tokenizer(TASK_TEXTS, vocab_size=300)) <= 300
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_bpe_tokenizer(TASK_TEXTS, vocab_size=100)


def test_folder_from_every_sft_record_kind_loads_with_auto_tokenizer(tmp_path: Path):
    train = write_lines(tmp_path / "sft.jsonl", [
        {"prompt": "Q: zebra?", "completion": " zebrafish"},
        {"text": "zebrafish swim"},
        {"messages": [{"role": "user", "content": "zebra"}, {"role": "assistant", "content": "zebrafish"}]},
    ] * 20)
    folder = train_tokenizer_folder(tmp_path / "tok", {"train_file": str(train), "val_fraction": 0.0}, vocab_size=400)
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.tokenize(" zebrafish") == ["Ġzebrafish"]  # learned from all three kinds
    ours = load_tokenizer(str(folder))
    assert ours.pad_token_id == 1 and ours.eos_token_id == 0 and len(ours) == len(reloaded)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left behind


def test_command_trains_on_the_builtin_task_and_reports_bad_input(tmp_path: Path, capsys):
    assert main(["tokenizer", "--output_dir", str(tmp_path / "tok")]) == 0
    assert load_tokenizer(str(tmp_path / "tok")).tokenize(" superb") == ["Ġsuperb"]
    assert main(["tokenizer", "--output_dir", str(tmp_path / "menu"), "--task", "menu"]) == 0
    assert load_tokenizer(str(tmp_path / "menu")).tokenize(" lentil curry") == ["Ġlentil", "Ġcurry"]
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    assert main(["tokenizer", "--output_dir", str(tmp_path / "t2"), "--train_file", str(bad)]) == 2
    assert f"{bad}:2: field 'completion': missing" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()
    with pytest.raises(SystemExit) as caught:
        main(["tokenizer", "--output_dir", str(tmp_path / "t3"), "--vocab_size", "10"])
    assert caught.value.code == 2 and "--vocab_size must be at least" in capsys.readouterr().err


def test_preset_trains_with_the_named_tokenizer_and_exports_it(tmp_path: Path):
    folder = train_tokenizer_folder(tmp_path / "tok")
    export = tmp_path / "sft"
    module = SFTModule(model_name_or_path="preset:micro-gpt2", tokenizer_name_or_path=str(folder),
                       export_dir=str(export), num_samples=1, sample_max_new_tokens=4)
    data = SFTDataModule(batch_size=8, max_length=64)
    trainer = Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    bpe = load_tokenizer(str(folder))
    assert module.model.get_input_embeddings().num_embeddings == len(bpe)
    assert is_complete_hf_folder(export)
    exported = load_tokenizer(str(export))
    assert exported.get_vocab() == bpe.get_vocab()  # later stages read the same tokenizer
    assert load_causal_lm(str(export), exported).config.vocab_size == len(bpe)
    # A reward model from the export needs no tokenizer_name_or_path: it is in the folder.
    assert RewardModule(model_name_or_path=str(export)).tokenizer.get_vocab() == bpe.get_vocab()


def test_missing_tokenizer_folder_names_the_command_that_makes_it(tmp_path: Path):
    module = SFTModule(tokenizer_name_or_path=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="rlhf-lightning tokenizer --output_dir .*nope"):
        module.tokenizer
