"""Which token ids end a response: the one rule that generation, masking, the missing-EOS rule,
the statistics and the training sequences all follow.

A plain model's response ends with the tokenizer's EOS. A chat model's assistant turn ends with
the token its chat template writes after the answer (ChatML's ``<|im_end|>``, Llama 3's
``<|eot_id|>``), which is often not the tokenizer's EOS, and its ``generation_config`` may list
several ids that end a response (``eos_token_id: [151645, 151643]`` for Qwen2.5-Instruct).
"""

from __future__ import annotations

import weakref
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

# A one-turn conversation whose answer is found again in the rendering.
_ANSWER = "Fine, thanks."
_PROBE = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": _ANSWER}]


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids of the tokenizer's special tokens: its named ones (EOS, pad, ...), its additional
    special tokens, and every added token marked special (a chat template's markers)."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


#: tokenizer -> (what the result depends on, :func:`chat_turn_end_id`); weak keys, so that a
#: tokenizer is freed as usual (and a new one never reuses an old one's entry).
_TURN_END_IDS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, int], int | None]] = weakref.WeakKeyDictionary()


def chat_turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token that the tokenizer's chat template writes right after an assistant
    message's content: what ends an assistant turn (``<|im_end|>`` for ChatML templates, EOS
    for the byte tokenizer's). None without a chat template, for a template that cannot render a
    one-turn conversation, or when it writes no special token after the answer.

    Rendering the template costs far more than the lookups of encoding a record, so the result
    is kept per tokenizer object, until its template or vocabulary size changes (a tokenizer
    that cannot be a weak key is probed each time)."""
    depends_on = (getattr(tokenizer, "chat_template", None), len(tokenizer))
    try:
        cached = _TURN_END_IDS.get(tokenizer)
        if cached is None or cached[0] != depends_on:
            cached = _TURN_END_IDS[tokenizer] = (depends_on, _probe_turn_end_id(tokenizer))
    except TypeError:  # unhashable, or no weak reference to it
        return _probe_turn_end_id(tokenizer)
    return cached[1]


def _probe_turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """:func:`chat_turn_end_id`, found by rendering a one-turn conversation."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except (jinja2.TemplateError, ValueError):
        return None
    position = rendered.rfind(_ANSWER)
    if position < 0:  # the template rewrites the answer
        return None
    special = special_token_ids(tokenizer)
    after = tokenizer(rendered[position + len(_ANSWER) :], add_special_tokens=False)["input_ids"]
    return next((token for token in after if token in special), None)


def stop_token_ids(source: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a response, without repeats: the tokenizer's EOS, the token its chat
    template ends an assistant turn with (:func:`chat_turn_end_id`), and every id that the
    generation config's ``eos_token_id`` names (an int or a list) and that is a special token of
    ``tokenizer`` (an id from another vocabulary, left by a model loaded with another tokenizer,
    is not).

    ``source``: a model (its ``generation_config`` is read), a ``GenerationConfig``, or None.
    """
    config = getattr(source, "generation_config", source)
    configured = getattr(config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    special = special_token_ids(tokenizer)
    ids = [tokenizer.eos_token_id, chat_turn_end_id(tokenizer), *(i for i in configured if i in special)]
    return list(dict.fromkeys(i for i in ids if i is not None))
