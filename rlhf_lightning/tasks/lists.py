"""A "list N things of a category" world: the rater checks structure, not content.

* **Prompts** ask for one to five items of a category, in about half of them in alphabetical
  order: ``"List three animals:"``, ``"List four fruits in alphabetical order:"`` (five
  categories x five counts x with/without order = 50 prompts; "one" takes the singular noun).
* **Completions** are comma-separated lists that continue the prompt with one space::

      completion := " " ITEM ("," " " ITEM)* "."
      ITEM       := a word of the asked category (see ``CATEGORIES``), no item twice

  A valid list may have any length (up to the eight items of its category) and any order:
  count and order are what the rater scores, not what the form checks. The generator, the
  parser and the gold score are all built from ``CATEGORIES`` and ``PROMPTS``.
* **Demonstrations** have a length drawn uniformly from 1..5, independent of the count asked
  for, with items in random order: the SFT model learns the form without being told that the
  count (or the order) matters; RLHF has to learn that from the preference pairs.
* :func:`gold_score` (range [-2, 1]), in tiers each strictly below the one above:

  - valid list: ``1 - 0.5 * |n - count| - 0.4 * disorder`` clipped to [-1, 1], where ``n`` is
    the number of items and ``disorder`` the share of out-of-order item pairs (counted only when
    the prompt asks for alphabetical order). Each missing or extra item costs 0.5, a reversed
    list 0.4: the count matters most, the order next. A one-item list for "three" scores 0.0,
    far below a correct three-item list (>= 0.6) but far above any invalid text;
  - invalid (repeated item, off-category word, no final period, truncated item, wrong
    separator, run-on text, near-empty): ``-1.5 - 0.25 * repeated - 0.25 * off_category`` in
    [-2, -1.5], lower the more repetitive and the more words are not items of the category;
  - no words at all: -2.

**Why it is in the suite**: the sentiment task rewards *content* (which words); here the rater
rewards *structure* (how many items, in which order) that depends on the prompt, so one and the
same list is the best answer to one prompt and a poor one to another. A reward model that only
learned the form (or that short, clean answers are safe) over-rates one-item lists; a policy
must read the count in the prompt and stop at the right comma.

Standard library only; everything is deterministic given the rng passed in.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from .base import BuiltinTask, TaskJudge, TaskRater

#: Category (plural, as in the prompts) -> its eight items, each a distinct initial letter.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("bear", "cat", "dog", "fox", "goat", "horse", "lion", "mouse"),
    "colours": ("blue", "green", "orange", "purple", "red", "silver", "white", "yellow"),
    "fruits": ("apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "peach"),
    "tools": ("axe", "chisel", "drill", "hammer", "pliers", "rake", "saw", "wrench"),
    "vegetables": ("bean", "carrot", "leek", "onion", "pea", "radish", "spinach", "turnip"),
}
SINGULAR = {"animals": "animal", "colours": "colour", "fruits": "fruit", "tools": "tool", "vegetables": "vegetable"}
COUNT_WORDS = ("one", "two", "three", "four", "five")
ORDER_PHRASE = " in alphabetical order"
ITEMS: frozenset[str] = frozenset(item for items in CATEGORIES.values() for item in items)

COUNT_PENALTY = 0.5  # per missing or extra item
ORDER_PENALTY = 0.4  # for a fully reversed list, when alphabetical order is asked for
MAX_COMPLETION_CHARS = 80
MAX_TEXT_BYTES = 120  # prompt + completion is always strictly shorter, in UTF-8 bytes
DEGENERATE_KINDS = ("repeat_item", "other_category", "no_period", "truncated", "wrong_separator", "run_on", "near_empty")
#: Repeats, stray words and not stopping are what a tiny policy produces most often.
DEGENERATE_WEIGHTS = (3, 2, 1, 1, 1, 2, 1)


class Request(NamedTuple):
    """What a prompt asks for."""

    category: str
    count: int
    ordered: bool


def _prompt_text(request: Request) -> str:
    noun = SINGULAR[request.category] if request.count == 1 else request.category
    return f"List {COUNT_WORDS[request.count - 1]} {noun}{ORDER_PHRASE if request.ordered else ''}:"


#: Every prompt and what it asks for; :func:`parse_prompt` is a lookup in this table.
REQUESTS: dict[str, Request] = {
    _prompt_text(r): r
    for r in (Request(c, n, o) for c in CATEGORIES for n in range(1, 6) for o in (False, True))
}
PROMPTS: tuple[str, ...] = tuple(REQUESTS)
_LIST_FORM = re.compile(r" ([a-z]+(?:, [a-z]+)*)\.")
_WORD = re.compile(r"[A-Za-z]+")


def parse_prompt(prompt: str) -> Request | None:
    """The request of one of the task's prompts (surrounding whitespace ignored), else None."""
    return REQUESTS.get(prompt.strip()) if isinstance(prompt, str) else None


def parse_items(prompt: str, completion: str) -> list[str] | None:
    """The items of a valid list answering ``prompt``, or None when the completion is invalid.

    Valid: one leading space, lowercase items separated by ``", "``, a final period (trailing
    whitespace ignored), every item from the asked category and none twice.
    """
    request = parse_prompt(prompt)
    match = _LIST_FORM.fullmatch(completion.rstrip()) if isinstance(completion, str) else None
    if request is None or match is None:
        return None
    items = match.group(1).split(", ")
    allowed = CATEGORIES[request.category]
    if len(set(items)) != len(items) or any(item not in allowed for item in items):
        return None
    return items


def is_valid(prompt: str, completion: str) -> bool:
    return parse_items(prompt, completion) is not None


def disorder(items: list[str]) -> float:
    """Share of item pairs out of alphabetical order: 0 sorted, 1 reversed (0 for one item)."""
    pairs = len(items) * (len(items) - 1) // 2
    inversions = sum(a > b for i, a in enumerate(items) for b in items[i + 1 :])
    return inversions / pairs if pairs else 0.0


def gold_score(prompt: str, completion: str) -> float:
    """The gold rater, in [-2, 1] (tiers in the module docstring). Never raises."""
    request = parse_prompt(prompt)
    items = parse_items(prompt, completion)
    if items is not None and request is not None:
        score = 1.0 - COUNT_PENALTY * abs(len(items) - request.count)
        if request.ordered:
            score -= ORDER_PENALTY * disorder(items)
        return round(max(-1.0, score), 6)
    words = [w.lower() for w in _WORD.findall(completion)] if isinstance(completion, str) else []
    if not words:
        return -2.0
    repeated = 1.0 - len(set(words)) / len(words)
    allowed = CATEGORIES[request.category] if request else ()
    off_category = sum(w not in allowed for w in words) / len(words)
    return round(-1.5 - 0.25 * repeated - 0.25 * off_category, 6)


def format_list(items: list[str]) -> str:
    return " " + ", ".join(items) + "."


def sample_list(rng: random.Random, category: str, length: int | None = None) -> list[str]:
    """``length`` (default uniform 1..5) distinct items of ``category`` in random order."""
    return rng.sample(CATEGORIES[category], length or rng.randint(1, 5))


def _degenerate_text(rng: random.Random, request: Request, kind: str) -> str:
    """One attempt at a degenerate completion of ``kind`` (may happen to be valid or too long)."""
    length = request.count if rng.random() < 0.5 else rng.randint(1, 5)  # often the right count
    items = sample_list(rng, request.category, length)
    if kind == "repeat_item":  # " cat, cat, cat." or " cat, dog, cat."
        if rng.random() < 0.4:
            items = [items[0]] * rng.randint(2, 5)
        else:
            items.insert(rng.randint(0, len(items)), rng.choice(items))
    elif kind == "other_category":  # an item of another category, or a prompt word as an item
        others = [w for c, words in CATEGORIES.items() if c != request.category for w in words]
        stray = rng.choice(others) if rng.random() < 0.7 else rng.choice((request.category, COUNT_WORDS[request.count - 1]))
        items[rng.randrange(len(items))] = stray
    elif kind == "no_period":
        return format_list(items)[:-1]
    elif kind == "truncated":  # cut inside the last item
        text = format_list(items)[:-1]
        return text[: len(text) - rng.randint(1, len(items[-1]) - 1)]
    elif kind == "wrong_separator":
        items = items if len(items) > 1 else sample_list(rng, request.category, rng.randint(2, 5))
        return " " + rng.choice((" ", ",", " , ", "; ", ". ", ",, ")).join(items) + "."
    elif kind == "run_on":  # a valid list that does not stop
        tail = rng.choice((format_list(sample_list(rng, request.category)), " " + rng.choice(PROMPTS), " " + rng.choice(CATEGORIES[request.category])))
        return format_list(items) + tail
    elif kind == "near_empty":
        return rng.choice((" .", " ,", " ...", " " + items[0], f" {request.category}.", " List.", f" {COUNT_WORDS[request.count - 1]}."))
    else:
        raise ValueError(f"kind must be one of {DEGENERATE_KINDS}, got {kind!r}")
    return format_list(items)


def degenerate_completion(rng: random.Random, prompt: str, kind: str | None = None) -> str:
    """An invalid completion for ``prompt`` of ``kind`` (default: drawn by ``DEGENERATE_WEIGHTS``)."""
    request = parse_prompt(prompt) or Request(rng.choice(sorted(CATEGORIES)), rng.randint(1, 5), False)
    while True:
        chosen = kind or rng.choices(DEGENERATE_KINDS, weights=DEGENERATE_WEIGHTS)[0]
        text = _degenerate_text(rng, request, chosen)
        if not is_valid(prompt, text) and len(text) <= MAX_COMPLETION_CHARS:
            return text


class ListsTask(BuiltinTask):
    """Deterministic data for SFT, reward modelling and PPO on the lists world.

    Prompts are drawn uniformly from the 50 ``PROMPTS``; demonstrations are valid lists whose
    length (1..5) and order are drawn independently of the prompt.
    """

    name = "lists"

    def draw_prompt(self, rng: random.Random) -> str:
        return rng.choice(PROMPTS)

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        request = parse_prompt(prompt)
        category = request.category if request else rng.choice(sorted(CATEGORIES))
        return format_list(sample_list(rng, category))

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        return degenerate_completion(rng, prompt)

    def gold_score(self, prompt: str, completion: str) -> float:
        return gold_score(prompt, completion)

    def is_valid(self, prompt: str, completion: str) -> bool:
        return is_valid(prompt, completion)


#: The lists task's gold judge, for YAML: ``judge: rlhf_lightning.tasks.lists.judge``.
judge = TaskJudge(ListsTask())
#: The lists task's noisy rater, for YAML: ``rater: rlhf_lightning.tasks.lists.rater``.
rater = TaskRater(ListsTask())
