"""Train a byte-level BPE tokenizer on demonstrations, for a model trained from scratch.

A preset (``preset:tiny-gpt2``) starts from random weights, so it can take any tokenizer. The
byte tokenizer needs no training but spells every word out, and a tiny model then spends its
few layers assembling bytes into words: a reward model built on it learns word-level
judgements (is a word misspelt? which words carry sentiment?) slowly and poorly. A BPE
vocabulary trained on the demonstrations gives the domain's words one token each (as a
pretrained model's tokenizer does for its own domain) and keeps every byte encodable, as
GPT-2's does, so misspelt or unseen words still tokenize, into rarer pieces.

``rlhf-lightning tokenizer --output_dir DIR`` writes one (see :func:`tokenizer_command`); the
SFT stage uses it through ``tokenizer_name_or_path`` and saves it with its export, so every
later stage reads it from there.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .records import Record, sft_kind
from .models import BYTE_CHAT_TEMPLATE, PAD_TOKEN, save_hf_folder

EOS_TOKEN = "<|endoftext|>"
#: The 256 byte symbols plus EOS and pad: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + 2
DEFAULT_VOCAB_SIZE = 8000


def demonstration_text(record: Record) -> str:
    """The text of a (checked) SFT record as the model reads it: prompt + completion, the
    ``text``, or the messages' contents one per line (the chat template's role tags are few
    and fixed, so they need no merges of their own)."""
    kind = sft_kind(record)
    if kind == "messages":
        return "\n".join(message["content"] for message in record["messages"])
    if kind == "text":
        return record["text"]
    return record["prompt"] + record["completion"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer learned from ``texts``.

    ``vocab_size`` is an upper bound: merges stop early once every word of ``texts`` is one
    token. EOS (``<|endoftext|>``, also BOS) and pad (``<|pad|>``) are ids 0 and 1; the
    tokenizer carries the byte preset's chat template, decodes exactly what it encoded, and
    adds no special tokens of its own when encoding.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + EOS + pad), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def train_tokenizer_folder(
    output_dir: str | os.PathLike[str],
    data_args: dict[str, Any] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Path:
    """Train on the records that ``SFTDataModule(**data_args)`` trains on (its training split;
    no ``train_file``: the built-in task's) and write the tokenizer to ``output_dir``
    atomically; returns the folder. ``data_args`` are the SFT config's ``data.init_args``, so
    the tokenizer never sees the SFT validation records."""
    from .data import SFTDataModule

    records, _ = SFTDataModule(**(data_args or {})).load_records()
    tokenizer = train_bpe_tokenizer(map(demonstration_text, records), vocab_size)
    return save_hf_folder(output_dir, None, tokenizer)


def tokenizer_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-lightning tokenizer",
        description="Train a byte-level BPE tokenizer on SFT demonstrations (for a preset model).",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write the tokenizer into")
    parser.add_argument("--train_file", default=None, help="SFT JSONL (default: the demonstrations of --task)")
    parser.add_argument("--task", default="sentiment", help="built-in task (or import path) when no --train_file")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="upper bound on the vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's data")
    options = parser.parse_args(list(argv))
    if options.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + EOS + pad), got {options.vocab_size}")
    data_args = {"train_file": options.train_file, "val_fraction": 0.0, "seed": options.seed, "task": options.task}
    folder = train_tokenizer_folder(options.output_dir, data_args, options.vocab_size)
    print(f"tokenizer: {folder}")
    return 0
