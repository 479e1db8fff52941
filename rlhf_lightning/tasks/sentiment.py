"""A tiny "write a positive movie review" world with a programmatic gold annotator.

This is the classic RLHF sentiment demo, shrunk so that a byte-level tiny GPT-2 can learn to
write it fluently in a couple of CPU minutes:

* **Prompts** are review openers ending in a copula ("Review: The movie was"); a completion
  continues the prompt with a leading space.
* **Completions** come from a small grammar (see :func:`is_fluent`)::

      completion := " " FIRST "." [" " SECOND "."]
      FIRST      := ADJP [("and" | "but") ADJP]
      SECOND     := "The" NOUN "was" ADJP  |  "I" VERB "the" NOUN
      ADJP       := [ADVERB] ADJECTIVE

  and no lexicon word (adjective, adverb, noun, verb) may occur twice. The generator and the
  parser are both built from the word lists below, so they cannot drift apart.
* The **SFT corpus is balanced** over positive / neutral / negative / mixed completions: the
  supervised model is not pre-tilted toward what the annotator likes; that is RLHF's job.
* :func:`gold_score` stands in for human raters: mostly sentiment, but non-fluent, repetitive,
  truncated and empty text always scores below every fluent completion, which is exactly what
  a weak reward model tends to over-rate.
* Preference labels are drawn from a Bradley-Terry model on the gold score, so they are noisy
  the way human labels are; :func:`label_agreement` measures the resulting ceiling.

Standard library only; everything is deterministic given a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .base import BuiltinTask, TaskJudge, TaskRater

PROMPTS: tuple[str, ...] = (
    "Review: The movie was",
    "Review: I watched this film and it was",
    "Review: Honestly, the film was",
    "Review: The story was",
    "Review: This movie is",
    "Review: My friends said the film was",
    "Review: Overall the movie was",
    "Review: I think this film is",
    "Review: The new movie was",
    "Review: Last night the film was",
)

# Word lists: ten adjectives per sentiment class, three verbs per class, neutral nouns/adverbs.
POSITIVE_ADJECTIVES = ("great", "good", "wonderful", "fun", "brilliant", "lovely", "excellent", "beautiful", "charming", "superb")
NEUTRAL_ADJECTIVES = ("okay", "fine", "average", "long", "simple", "ordinary", "plain", "quiet", "short", "typical")
NEGATIVE_ADJECTIVES = ("bad", "boring", "awful", "dull", "terrible", "weak", "poor", "messy", "silly", "painful")
POSITIVE_VERBS = ("loved", "liked", "enjoyed")
NEUTRAL_VERBS = ("noticed", "remembered", "followed")
NEGATIVE_VERBS = ("hated", "disliked", "resented")
ADVERBS = ("really", "very", "quite", "so", "truly", "rather")
NOUNS = ("acting", "plot", "ending", "music", "cast", "dialogue", "script", "pacing", "soundtrack", "humor")

_ADJECTIVES = {1: POSITIVE_ADJECTIVES, 0: NEUTRAL_ADJECTIVES, -1: NEGATIVE_ADJECTIVES}
_VERBS = {1: POSITIVE_VERBS, 0: NEUTRAL_VERBS, -1: NEGATIVE_VERBS}
ADJECTIVES = POSITIVE_ADJECTIVES + NEUTRAL_ADJECTIVES + NEGATIVE_ADJECTIVES
VERBS = POSITIVE_VERBS + NEUTRAL_VERBS + NEGATIVE_VERBS
#: Valence of every sentiment-bearing word (adjectives and verbs); other words carry none.
VALENCE: dict[str, int] = {w: v for table in (_ADJECTIVES, _VERBS) for v, words in table.items() for w in words}
#: Words that may appear at most once in a fluent completion.
LEXICON: frozenset[str] = frozenset(VALENCE) | frozenset(ADVERBS) | frozenset(NOUNS)

SENTIMENTS = ("positive", "neutral", "negative", "mixed")
MIN_COMPLETION_CHARS = 20  # shorter fluent text counts as "very short" for the annotator
MAX_COMPLETION_CHARS = 80
MAX_TEXT_BYTES = 120  # prompt + completion is always strictly shorter, in UTF-8 bytes
DEGENERATE_KINDS = ("repeat_word", "repeat_sentence", "truncated", "empty", "shuffled", "typo", "run_on", "word_slip")
#: How often each kind is drawn: the slips a tiny policy actually makes (misspellings with a
#: byte-level vocabulary; stray, doubled or swapped words with a word-level one; run-on text
#: with both) are what the preference data shows raters judging most often.
DEGENERATE_WEIGHTS = (1, 1, 1, 1, 1, 2, 2, 3)


def _alt(words: Sequence[str]) -> str:
    return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")"


_ADJP = rf"(?:{_alt(ADVERBS)} )?{_alt(ADJECTIVES)}"
_FIRST = rf"{_ADJP}(?: (?:and|but) {_ADJP})?"
_SECOND = rf"(?:The {_alt(NOUNS)} was {_ADJP}|I {_alt(VERBS)} the {_alt(NOUNS)})"
_GRAMMAR = re.compile(rf" {_FIRST}\.(?: {_SECOND}\.)?")
_WORD = re.compile(r"[A-Za-z]+")
_LONGEST_PROMPT = max(len(p.encode("utf-8")) for p in PROMPTS)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def is_fluent(completion: str) -> bool:
    """True iff ``completion`` parses under the grammar in the module docstring.

    The completion must start with exactly one space (it continues the prompt) and use only
    the task's words, each lexicon word at most once. Trailing whitespace (e.g. a newline left
    by decoding) is ignored; anything else after the final period makes it non-fluent.
    """
    text = completion.rstrip()
    if _GRAMMAR.fullmatch(text) is None:
        return False
    lexical = [w for w in _words(text) if w in LEXICON]
    return len(lexical) == len(set(lexical))


def sentiment_label(completion: str) -> str:
    """Classify by the words used: "mixed" if it has positive and negative words, else by sign."""
    valences = {VALENCE[w] for w in _words(completion) if w in VALENCE}
    if {1, -1} <= valences:
        return "mixed"
    return "positive" if 1 in valences else "negative" if -1 in valences else "neutral"


def gold_score(prompt: str, completion: str) -> float:
    """The gold annotator: higher is better, range [-2, 1].

    Tiers, each strictly below the previous one:

    * fluent (and at least ``MIN_COMPLETION_CHARS`` long): ``0.8 * mean + 0.2 * amount``, in
      [-1, 1], where ``mean`` is the mean valence (+1 / 0 / -1) of the sentiment words and
      ``amount`` their sum with adverb-intensified words counting 1.5, over 3, clipped to
      [-1, 1]: raters like more, and more emphatic, praise; this also breaks many ties;
    * fluent but very short: in [-1.35, -1.05];
    * non-fluent (off-grammar, repeated words or sentences, shuffled, truncated): in [-2, -1.5],
      lower the more repetitive;
    * no words at all: -2.

    The prompt does not enter the score (every opener ends in a copula); it is accepted so the
    signature matches what a human rater would see.
    """
    del prompt
    words = _words(completion)
    if not words:
        return -2.0
    valences = [VALENCE[w] for w in words if w in VALENCE]
    mean = sum(valences) / len(valences) if valences else 0.0
    if not is_fluent(completion):
        repeated = 1.0 - len(set(words)) / len(words)
        score = -1.6 + 0.1 * mean - 0.3 * repeated
    elif len(completion.rstrip()) < MIN_COMPLETION_CHARS:
        score = -1.2 + 0.15 * mean
    else:
        amount = sum(VALENCE.get(w, 0) * (1.5 if prev in ADVERBS else 1.0) for prev, w in zip(["", *words], words))
        score = 0.8 * mean + 0.2 * max(-1.0, min(1.0, amount / 3))
    return round(score, 6)  # equal in exact arithmetic -> an exact tie, not a float-noise win


def _sample_valences(rng: random.Random, sentiment: str, slots: int) -> list[int]:
    """Valence per sentiment slot so that the completion's label is ``sentiment``."""
    while True:
        if sentiment == "neutral":
            return [0] * slots
        if sentiment == "mixed":
            out = rng.choices((1, -1, 0), weights=(0.4, 0.4, 0.2), k=slots)
            if {1, -1} <= set(out):
                return out
            continue
        sign = 1 if sentiment == "positive" else -1
        out = [sign if rng.random() < 0.7 else 0 for _ in range(slots)]
        if sign in out:
            return out


def sample_completion(rng: random.Random, sentiment: str | None = None) -> str:
    """One fluent completion from the grammar; ``sentiment`` defaults to a uniform class."""
    sentiment = sentiment or rng.choice(SENTIMENTS)
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
    while True:
        form = rng.choice(("two_adjectives", "adjective_sentence", "two_adjectives_sentence"))
        slots = 3 if form == "two_adjectives_sentence" else 2
        valences = _sample_valences(rng, sentiment, slots)
        adverbs = list(ADVERBS)
        rng.shuffle(adverbs)
        used: set[str] = set()

        def pick(pool: Sequence[str]) -> str:
            word = rng.choice([w for w in pool if w not in used])
            used.add(word)
            return word

        def adjp(valence: int) -> str:
            adjective = pick(_ADJECTIVES[valence])
            return f"{adverbs.pop()} {adjective}" if rng.random() < 0.35 else adjective

        first = adjp(valences[0])
        if form != "adjective_sentence":
            conj = "but" if valences[0] * valences[1] < 0 else "and"
            first += f" {conj} {adjp(valences[1])}"
        text = f" {first}."
        if form != "two_adjectives":
            valence = valences[-1]
            if rng.random() < 0.5:
                text += f" The {pick(NOUNS)} was {adjp(valence)}."
            else:
                text += f" I {pick(_VERBS[valence])} the {pick(NOUNS)}."
        if MIN_COMPLETION_CHARS <= len(text) <= MAX_COMPLETION_CHARS and _LONGEST_PROMPT + len(text.encode("utf-8")) < MAX_TEXT_BYTES:
            return text


def degenerate_completion(rng: random.Random, kind: str | None = None) -> str:
    """A non-fluent completion of the kind weak reward models over-rate (see ``DEGENERATE_KINDS``)."""
    kind = kind or rng.choices(DEGENERATE_KINDS, weights=DEGENERATE_WEIGHTS)[0]
    while True:
        base = sample_completion(rng)
        if kind == "repeat_word" and rng.random() < 0.5:  # the classic hack: "great great great great."
            word = rng.choice(POSITIVE_ADJECTIVES if rng.random() < 0.5 else sorted(LEXICON))
            text = " " + " ".join([word] * rng.randint(3, 7)) + "."
        elif kind == "repeat_word":  # its subtle form: "brilliant and brilliant. The plot was brilliant."
            words = base.split(" ")
            first = next(w.rstrip(".") for w in words if w.rstrip(".") in ADJECTIVES)
            text = " ".join(first + "." * w.endswith(".") if w.rstrip(".") in ADJECTIVES else w for w in words)
        elif kind == "repeat_sentence":
            sentence = base.split(". ")[-1].strip().rstrip(".")
            text = " " + ". ".join([sentence] * rng.randint(2, 3)) + "."
        elif kind == "truncated":  # cut strictly inside a word of three or more letters
            spans = [m.span() for m in _WORD.finditer(base) if m.end() - m.start() >= 3]
            start, end = rng.choice(spans)
            text = base[: rng.randint(start + 1, end - 1)]
        elif kind == "empty":
            text = rng.choice((" ...", " it.", " .", " the", " and.", " was."))
        elif kind == "shuffled":
            words = base.replace(".", "").split()
            rng.shuffle(words)
            text = " " + " ".join(words) + "."
        elif kind == "typo":  # one letter substituted, inserted or dropped inside one word
            spans = [m.span() for m in _WORD.finditer(base) if m.end() - m.start() >= 3]
            start, end = rng.choice(spans)
            at = rng.randrange(start + 1, end)
            letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
            edit = rng.choice(("substitute", "insert", "drop"))
            text = base[:at] + ("" if edit == "drop" else letter) + base[at + (edit != "insert") :]
        elif kind == "word_slip":  # one word doubled, a stray connector, or a word swapped for another
            words = base.split(" ")
            at = rng.randrange(1, len(words))
            slip = rng.choice(("double", "stray", "swap"))
            if slip == "double":
                words.insert(at, words[at].rstrip("."))
            elif slip == "stray":
                words.insert(at, rng.choice(("and", "but", "the", "was", "I", "so")))
            else:
                words[at] = rng.choice(sorted(LEXICON)) + ("." if words[at].endswith(".") else "")
            text = " ".join(words)
        elif kind == "run_on":  # a fluent review that does not stop: stray words after it
            tail = [rng.choice(("the", "was", "and", "I")), rng.choice(NOUNS + ADJECTIVES)]
            text = base + " " + " ".join(tail[: rng.randint(1, 2)]) + rng.choice((".", "", " the."))
        else:
            raise ValueError(f"kind must be one of {DEGENERATE_KINDS}, got {kind!r}")
        if not is_fluent(text) and len(text) <= MAX_COMPLETION_CHARS:
            return text


def gold_rewards(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The gold annotator as a PPO reward function: ``gold_score`` of each (prompt, completion)."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


class SentimentTask(BuiltinTask):
    """Deterministic data for SFT, reward modelling and PPO on the sentiment world.

    Demonstrations are drawn uniformly over the four sentiment classes; a preference candidate
    is non-fluent with probability ``degenerate_share``. Prompts are the same ten openers in
    every split; held-out prompt files differ in their draws, not their openers.
    """

    name = "sentiment"

    def draw_prompt(self, rng: random.Random) -> str:
        return rng.choice(PROMPTS)

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        return sample_completion(rng)

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        return degenerate_completion(rng)

    def gold_score(self, prompt: str, completion: str) -> float:
        return gold_score(prompt, completion)

    def is_valid(self, prompt: str, completion: str) -> bool:
        return is_fluent(completion)


#: The sentiment task's gold judge, for YAML: ``judge: rlhf_lightning.tasks.sentiment.judge``.
judge = TaskJudge(SentimentTask())
#: The sentiment task's noisy rater, for YAML: ``rater: rlhf_lightning.tasks.sentiment.rater``.
rater = TaskRater(SentimentTask())
