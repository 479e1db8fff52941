"""Turning checked records into token ids, and padding them into batches.

The one place for the rules of what the loss sees: prompt tokens are never learned from
(label -100), completions end with EOS (a response to a chat prompt with the token its chat
template ends an assistant turn with), chat conversations are learned from on assistant turns
only, and prompts for generation are left-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UserInputError
from ..records import Record, sft_kind
from ..stop_tokens import chat_turn_end_id

IGNORE_INDEX = -100
Messages = list[dict[str, str]]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: with BOS if the tokenizer adds one, never with EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a continuation: no special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            f"tokenizer {type(tokenizer).__name__} has no chat template, so 'messages' records "
            "cannot be rendered; hint: use a chat model's tokenizer or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; only assistant turns carry labels.

    The conversation is rendered one message at a time: each message adds the text between
    two renderings, and an assistant message's own span starts after the generation prompt
    that the template puts before it. The template's end-of-turn tokens belong to the
    assistant span, so the model learns to stop.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def append(text: str, learn: bool) -> None:
        ids = encode_text(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:index], add_generation_prompt=True)
            if not header.startswith(rendered):
                raise UserInputError("chat template renders a conversation differently from its prefix")
            append(header[len(rendered) :], learn=False)
            rendered = header
        full = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not full.startswith(rendered):
            raise UserInputError(
                "chat template is not prefix-stable (rendering more messages changes earlier text), "
                "so assistant turns cannot be masked reliably"
            )
        append(full[len(rendered) :], learn=message["role"] == "assistant")
        rendered = full
    return input_ids, labels


def encode_sft(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` of one SFT record, truncated to ``max_length``.

    Returns None when truncation leaves no token to learn from (a prompt longer than
    ``max_length``): such records are dropped by the dataset, which says how many.
    """
    kind = sft_kind(record)
    if kind == "messages":
        input_ids, labels = encode_chat(tokenizer, record["messages"])
    elif kind == "text":
        input_ids = encode_prompt(tokenizer, record["text"]) + [tokenizer.eos_token_id]
        labels = list(input_ids)
    else:
        prompt = encode_prompt(tokenizer, record["prompt"])
        completion = encode_text(tokenizer, record["completion"]) + [tokenizer.eos_token_id]
        input_ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def response_end_id(tokenizer: PreTrainedTokenizerBase, record: Record) -> int:
    """The token a training response to ``record``'s prompt ends with, the one a policy's sampled
    response ends with: EOS after a plain prompt; after a chat prompt, the token the chat template
    ends an assistant turn with (:func:`~rlhf_lightning.stop_tokens.chat_turn_end_id`, e.g.
    ``<|im_end|>``; EOS when the template writes no special token there)."""
    turn_end = chat_turn_end_id(tokenizer) if _is_chat_prompt(record) else None
    return tokenizer.eos_token_id if turn_end is None else turn_end


def encode_preference(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, Any]:
    """Ids of prompt+chosen and prompt+rejected, and the length of each response (its end token
    included) as ``chosen_response_length`` / ``rejected_response_length``: the tokens DPO
    learns from. A plain prompt is followed by each response and EOS; a chat prompt (a list of
    messages) is rendered with the template's generation prompt and each response ends with
    the template's end-of-turn token (:func:`response_end_id`), as PPO responses do.

    Truncation keeps the end of the prompt and the start of the response, and always keeps the
    final end token, so the reward is read at the same kind of token in training and in PPO.
    """
    prompt = prompt_record_ids(record, tokenizer)
    end = response_end_id(tokenizer, record)
    pair: dict[str, Any] = {"margin": float(record.get("margin", 0.0))}
    for side in ("chosen", "rejected"):
        response = encode_text(tokenizer, record[side])[: max_length - 1] + [end]
        room = max_length - len(response)
        pair[side] = (prompt[-room:] if room > 0 else []) + response
        pair[f"{side}_response_length"] = len(response)
    return pair


def _is_chat_prompt(record: Record) -> bool:
    return isinstance(record.get("messages", record.get("prompt")), list)


def demonstration_pair(record: Record) -> Record:
    """An SFT demonstration as a preference record whose ``chosen`` and ``rejected`` are both the
    demonstrated response (how a reward model scores a demonstration): ``prompt``/``completion``
    as they are; ``messages`` as the conversation before its last assistant turn (the prompt)
    and that turn's content."""
    if sft_kind(record) == "prompt/completion":
        prompt, response = record["prompt"], record["completion"]
    else:
        messages = record["messages"]
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        prompt, response = messages[:last], messages[last]["content"]
    return {"prompt": prompt, "chosen": response, "rejected": response}


def prompt_record_text(record: Record, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a policy continues for a prompt record: the plain prompt, or the chat messages
    rendered with the tokenizer's template and the generation prompt."""
    if _is_chat_prompt(record):
        return _render(tokenizer, record.get("messages", record.get("prompt")), add_generation_prompt=True)
    return record["prompt"]


def prompt_record_ids(record: Record, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Prompt ids for generation (see :func:`prompt_record_text`); a rendered chat template
    carries its own special tokens, a plain prompt gets BOS where the tokenizer adds one."""
    text = prompt_record_text(record, tokenizer)
    return encode_text(tokenizer, text) if _is_chat_prompt(record) else encode_prompt(tokenizer, text)


def encode_prompt_record(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """:func:`prompt_record_ids`, over-long prompts keeping their last ``max_length`` tokens (the
    part next to the response)."""
    return prompt_record_ids(record, tokenizer)[-max_length:]


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack lists of ids into a ``(b, max_len)`` tensor padded with ``value`` on ``side``."""
    width = max(len(s) for s in sequences)
    rows = []
    for sequence in sequences:
        filler = [value] * (width - len(sequence))
        rows.append(filler + sequence if side == "left" else sequence + filler)
    return torch.tensor(rows, dtype=torch.long)


def attention_mask_for(sequences: list[list[int]], side: str = "right") -> torch.Tensor:
    return pad([[1] * len(s) for s in sequences], 0, side)


@dataclass
class SFTCollator:
    """Right-pads ``input_ids``/``labels`` examples into a batch with an attention mask."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": attention_mask_for(ids),
            "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
        }


@dataclass
class PreferenceCollator:
    """Batches pairs as one concatenated batch: chosen rows first, then rejected rows.

    ``response_mask`` is 1 on each row's response tokens (EOS included), 0 on its prompt and on
    padding.
    """

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = [(p[side], p[f"{side}_response_length"]) for side in ("chosen", "rejected") for p in pairs]
        sequences = [ids for ids, _ in sides]
        response_flags = [[0] * (len(ids) - n) + [1] * n for ids, n in sides]
        return {
            "input_ids": pad(sequences, self.pad_token_id, self.padding_side),
            "attention_mask": attention_mask_for(sequences, self.padding_side),
            "response_mask": pad(response_flags, 0, self.padding_side),
            "margin": torch.tensor([p["margin"] for p in pairs], dtype=torch.float),
        }


@dataclass
class PromptCollator:
    """Left-pads prompt ids for generation and keeps the prompt records for scoring/logging."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["prompt_ids"] for e in examples]
        return {
            "prompt_ids": pad(ids, self.pad_token_id, side="left"),
            "prompt_mask": attention_mask_for(ids, side="left"),
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        }
