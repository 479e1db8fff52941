"""A "waiter recommends a dish" world whose right answer depends on the prompt's own words.

* **World**: a menu of 18 two-word dishes. Each dish has one value on each of two dimensions:
  a diet (meat / fish / vegetarian) and a taste (spicy / sweet / sour); every one of the nine
  (diet, taste) combinations has two dishes.
* **Prompts** (36): a guest states one wish on each dimension, in one of two phrasings each,
  and the waiter starts to answer: ``"Guest: no meat or fish, something hot. Waiter: Try the"``.
* **Completions** follow this grammar (built from the word lists below, as is the parser)::

      completion := " " DISH "." [" " CLAIM "."]
      DISH       := one of the 18 menu names, e.g. "lentil curry"
      CLAIM      := "It has meat" | "It has fish" | "It is vegetarian"
                  | "It is spicy" | "It is sweet" | "It is sour"

  and the claim, when present, must be TRUE of the dish (a false description is invalid).
* **Gold score** (range [-2, 1], each tier strictly below the one above):

  * valid: ``WISH_SCORES[met]`` for the number of the guest's wishes the dish meets
    (0 -> -0.6, 1 -> 0.1, 2 -> 0.8), plus ``CLAIM_BONUS`` (0.2) when the claim tells the guest
    that one of their wishes is met; in [-0.6, 1.0];
  * invalid (unknown or glued dish names, truncated or repeated names, a false claim, run-on
    text, a bare word): ``-1.6 + 0.05 * met - 0.3 * repeated`` clipped to [-2, -1.5], where
    ``met`` is for the first menu dish named anywhere in the text and ``repeated`` is
    ``1 - distinct words / words``;
  * no words at all: -2.

* **Demonstrations** name a dish drawn uniformly from the whole menu, independent of the
  prompt's wishes, with a (true) claim half the time: the SFT model learns the menu, not the
  rater's preference.

Why it is in the suite: the rater's preference is **conditional**. No dish is globally best:
"lentil curry." is the top answer for a vegetarian who wants something spicy and a bottom
valid one for a guest who wants sweet meat. A policy (and a reward model) can only win by
reading the prompt, unlike the sentiment task whose rater ignores it. The false-claim
degenerate ("lentil curry. It has meat." to a meat eater) is the matching reward hack: it
echoes the wish without being true.

Standard library only; everything is deterministic given a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .base import BuiltinTask, TaskJudge, TaskRater

DIETS = ("meat", "fish", "vegetarian")
TASTES = ("spicy", "sweet", "sour")
#: How a guest states each wish (two phrasings per value).
DIET_WISHES: dict[str, tuple[str, ...]] = {
    "meat": ("I want meat", "meat please"),
    "fish": ("I want fish", "fish please"),
    "vegetarian": ("I am vegetarian", "no meat or fish"),
}
TASTE_WISHES: dict[str, tuple[str, ...]] = {
    "spicy": ("something spicy", "something hot"),
    "sweet": ("something sweet", "a sweet dish"),
    "sour": ("something sour", "something tangy"),
}
#: dish -> (diet, taste); two dishes per combination.
MENU: dict[str, tuple[str, str]] = {
    "chicken curry": ("meat", "spicy"), "beef chili": ("meat", "spicy"),
    "honey ham": ("meat", "sweet"), "glazed pork": ("meat", "sweet"),
    "lemon chicken": ("meat", "sour"), "tamarind beef": ("meat", "sour"),
    "cajun salmon": ("fish", "spicy"), "pepper tuna": ("fish", "spicy"),
    "teriyaki salmon": ("fish", "sweet"), "maple trout": ("fish", "sweet"),
    "lime cod": ("fish", "sour"), "pickled herring": ("fish", "sour"),
    "lentil curry": ("vegetarian", "spicy"), "chili tofu": ("vegetarian", "spicy"),
    "carrot cake": ("vegetarian", "sweet"), "rice pudding": ("vegetarian", "sweet"),
    "pickled beets": ("vegetarian", "sour"), "lemon salad": ("vegetarian", "sour"),
}
DISHES = tuple(MENU)
#: attribute value -> the sentence (without its period) that claims it.
CLAIMS: dict[str, str] = {
    "meat": "It has meat", "fish": "It has fish", "vegetarian": "It is vegetarian",
    "spicy": "It is spicy", "sweet": "It is sweet", "sour": "It is sour",
}
CLAIM_VALUES = {sentence: value for value, sentence in CLAIMS.items()}

PROMPT_TEMPLATE = "Guest: {diet}, {taste}. Waiter: Try the"
#: prompt -> (diet wish, taste wish)
PROMPT_WISHES: dict[str, tuple[str, str]] = {
    PROMPT_TEMPLATE.format(diet=d_words, taste=t_words): (diet, taste)
    for diet in DIETS for d_words in DIET_WISHES[diet]
    for taste in TASTES for t_words in TASTE_WISHES[taste]
}
PROMPTS = tuple(PROMPT_WISHES)

WISH_SCORES = (-0.6, 0.1, 0.8)  # by number of wishes met: 0, 1, 2
CLAIM_BONUS = 0.2  # the description confirms one of the guest's wishes
MAX_COMPLETION_CHARS = 80
MAX_TEXT_BYTES = 120
DEGENERATE_KINDS = ("repeat_name", "repeat_claim", "truncated", "glued", "false_claim", "run_on", "empty")
#: The slips a tiny policy makes most (and a weak reward model over-rates most) come most often.
DEGENERATE_WEIGHTS = (1, 1, 1, 2, 2, 2, 1)


def _alt(words: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_GRAMMAR = re.compile(rf" ({_alt(DISHES)})\.(?: ({_alt(CLAIMS.values())})\.)?")
_ANY_DISH = re.compile(_alt(DISHES))
_WORD = re.compile(r"[A-Za-z]+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def parse(completion: str) -> tuple[str, str | None] | None:
    """``(dish, claimed value or None)`` if ``completion`` follows the grammar, else None."""
    match = _GRAMMAR.fullmatch(completion.rstrip())
    if match is None:
        return None
    dish, claim = match.groups()
    return dish, (CLAIM_VALUES[claim] if claim else None)


def _is_true(parsed: tuple[str, str | None] | None) -> bool:
    """Whether a parse exists and its claim, if any, is one of the dish's attributes."""
    return parsed is not None and (parsed[1] is None or parsed[1] in MENU[parsed[0]])


def is_valid(completion: str) -> bool:
    """True iff the completion parses and its claim (if any) is true of the dish."""
    return _is_true(parse(completion))


def wishes_met(prompt: str, dish: str) -> int:
    """How many of the guest's wishes ``dish`` meets (0 for a prompt that is not a task prompt)."""
    return len(set(PROMPT_WISHES.get(prompt.strip(), ())) & set(MENU[dish]))


def gold_score(prompt: str, completion: str) -> float:
    """The gold rater, range [-2, 1]; see the module docstring for the tiers."""
    words = _words(completion)
    if not words:
        return -2.0
    parsed = parse(completion)
    if parsed is not None and _is_true(parsed):
        dish, claim = parsed
        confirms_wish = claim is not None and claim in PROMPT_WISHES.get(prompt.strip(), ())
        score = WISH_SCORES[wishes_met(prompt, dish)] + (CLAIM_BONUS if confirms_wish else 0.0)
    else:
        named = _ANY_DISH.search(completion.lower())
        met = wishes_met(prompt, named.group()) if named else 0
        repeated = 1.0 - len(set(words)) / len(words)
        score = max(-2.0, min(-1.5, -1.6 + 0.05 * met - 0.3 * repeated))
    return round(score, 6)


def sample_completion(rng: random.Random) -> str:
    """A valid completion: a dish uniform over the menu, a true claim half the time."""
    dish = rng.choice(DISHES)
    if rng.random() < 0.5:
        return f" {dish}."
    return f" {dish}. {CLAIMS[rng.choice(MENU[dish])]}."


def _degenerate_text(rng: random.Random, prompt: str, kind: str) -> str:
    """One attempt at a degenerate completion of ``kind`` (may happen to be valid)."""
    dish = rng.choice(DISHES)
    first, second = dish.split()
    base = sample_completion(rng)
    if kind == "repeat_name":
        text = rng.choice((f" {dish} {dish}.", f" {dish}. {dish}.", f" {first} {first} {second}.", f" {first} {second} {second}."))
    elif kind == "repeat_claim":
        claim = CLAIMS[rng.choice(MENU[dish])]
        text = f" {dish}." + f" {claim}." * rng.randint(2, 3)
    elif kind == "truncated":  # cut inside a word, or stop after the first half of the name
        spans = [m.span() for m in _WORD.finditer(base) if m.end() - m.start() >= 3]
        start, end = rng.choice(spans)
        text = rng.choice((base[: rng.randint(start + 1, end - 1)], f" {first}."))
    elif kind == "glued":  # the first half of one dish and the second half of another
        other = rng.choice(DISHES).split()[1]
        text = f" {first} {other}." + (f" {CLAIMS[rng.choice(MENU[dish])]}." if rng.random() < 0.5 else "")
    elif kind == "false_claim":  # usually the hack: echo the guest's wish whether or not it is true
        wishes = PROMPT_WISHES.get(prompt.strip(), DIETS[:1])
        value = rng.choice(wishes) if rng.random() < 0.7 else rng.choice(DIETS + TASTES)
        text = f" {dish}. {CLAIMS[value]}."
    elif kind == "run_on":  # a valid answer that does not stop
        tail = rng.choice((" Try the", " It is", " the", f" {first}", " please.", f" {rng.choice(DISHES)}."))
        text = base + tail
    elif kind == "empty":
        text = rng.choice((" .", " the", " It is.", " Try the", " please.", f" {first}"))
    else:
        raise ValueError(f"kind must be one of {DEGENERATE_KINDS}, got {kind!r}")
    return text


def degenerate_completion(rng: random.Random, prompt: str, kind: str | None = None) -> str:
    """An invalid completion of the kinds in ``DEGENERATE_KINDS`` (weighted by ``DEGENERATE_WEIGHTS``)."""
    kind = kind or rng.choices(DEGENERATE_KINDS, weights=DEGENERATE_WEIGHTS)[0]
    while True:
        text = _degenerate_text(rng, prompt, kind)
        if not is_valid(text) and len(text) <= MAX_COMPLETION_CHARS:
            return text


class MenuTask(BuiltinTask):
    """Deterministic data for SFT, reward modelling and PPO on the menu world."""

    name = "menu"

    def draw_prompt(self, rng: random.Random) -> str:
        return rng.choice(PROMPTS)

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        return sample_completion(rng)

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        return degenerate_completion(rng, prompt)

    def gold_score(self, prompt: str, completion: str) -> float:
        return gold_score(prompt, completion)

    def is_valid(self, prompt: str, completion: str) -> bool:
        return is_valid(completion)


#: The menu task's gold judge, for YAML: ``judge: rlhf_lightning.tasks.menu.judge``.
judge = TaskJudge(MenuTask())
#: The menu task's noisy rater, for YAML: ``rater: rlhf_lightning.tasks.menu.rater``.
rater = TaskRater(MenuTask())
