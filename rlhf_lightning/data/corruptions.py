"""Corruptions: a response made worse in one known way, for synthetic preference pairs.

A corruption is any callable ``(text, rng) -> str | None``: the response with one fault added,
or ``None`` when it cannot add that fault to this text (the pair is then not made).
:class:`~rlhf_lightning.data.PreferenceDataModule` with ``synthetic_pairs > 0`` adds, for that
fraction of its training records, the pair ``chosen`` (preferred) over ``corruption(chosen)``,
to the same prompt; validation records are never touched, so held-out accuracy stays a
measure on the raters' own pairs.

Why: a reward model learns from the contrasts its pairs contain. A fault that the raters
always punish but that only comes with other differences (a list that repeats an item is
also another list) can stay unlearned (docs/reward.md, "The repetition blind spot"); the same
response with and without the fault isolates it.
"""

from __future__ import annotations

import random
import re
from collections import Counter

_WORD = re.compile(r"[^\W\d_]+")


def repeat_word(text: str, rng: random.Random, min_length: int = 3) -> str | None:
    """``text`` with one word replaced by an earlier word of it, so that word is said twice:
    ``" apple, banana, cherry."`` -> ``" apple, banana, apple."``.

    The repeated word is one of at least ``min_length`` letters that ``text`` says only once (so
    "the" or "a" said twice, which fluent text does, is never the fault); the replaced word is
    any later word that differs from it. Punctuation and spacing are kept. ``None`` when no
    such pair of words exists (fewer than two words, or every long word already repeated).
    """
    words = list(_WORD.finditer(text))
    lowered = [match.group().lower() for match in words]
    counts = Counter(lowered)
    choices = [
        (i, j)
        for i, word in enumerate(lowered)
        if len(word) >= min_length and counts[word] == 1
        for j in range(i + 1, len(words))
        if lowered[j] != word
    ]
    if not choices:
        return None
    i, j = rng.choice(choices)
    target = words[j]
    return text[: target.start()] + words[i].group() + text[target.end() :]
