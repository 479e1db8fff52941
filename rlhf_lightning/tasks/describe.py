"""A "describe a place" world where the rater wants a description of the right LENGTH.

* **World.** Seven places (kitchen, garden, beach, forest, city, school, farm), each with eight
  things one may see there (its *detail nouns*, no noun shared between places), and ten shared
  adjectives. A prompt asks to describe one place ("Describe the kitchen:"); the completion
  lists short details of it.
* **Grammar** (see :func:`parse_description`)::

      completion := " " DETAIL (", " DETAIL)* [", and so on"] "."     1 to 6 DETAILs
      DETAIL     := ["very "] ADJECTIVE " " NOUN                      NOUN of the asked place

  and no noun may be listed twice (the noun is the detail's identity: "red cup, big cup" is a
  repeated detail). ``very`` and the ``and so on`` tail are **filler**: they are valid, make
  the text longer, and only lower the score. That makes padding a tempting valid-but-worse
  form for a reward model that likes length.
* **Gold score** (:meth:`DescribeTask.gold_score`), tiers each strictly below the previous:

  * valid: ``clip(shape(k) - 0.3 * filler, -1, 1)`` where ``k`` is the number of details and
    ``shape`` rises by 0.6 a detail up to the optimum of 4 details (score 1) and falls by 0.7
    a detail past it: 1..6 details score -0.8, -0.2, 0.4, 1.0, 0.3, -0.4 without filler;
    ``filler`` counts each ``very`` and the ``and so on`` tail;
  * invalid (a repeated detail, a thing of another place, off-grammar, truncated, run-on,
    more than six details): ``-1.6 + 0.1 * relevance - 0.3 * repeated`` in [-1.9, -1.5], where
    ``relevance`` is the share of the nouns used that belong to the asked place and
    ``repeated`` is ``1 - distinct words / words``;
  * no words at all: -2.
* **Demonstrations** list 1 to 6 details, drawn uniformly and independently of the optimum,
  with occasional filler: the SFT model learns the form but not the best length.
* **Why in the suite.** The other tasks reward a direction (more positive, more correct);
  here more is better only up to a point and then worse. A reward model that merely
  learns "longer is better" (the length bias of real reward models) prefers padded and
  over-long lists; PPO against it overshoots. The task measures whether the pipeline finds an
  interior optimum of length.

Standard library only; everything is deterministic given the rng passed in.
"""

from __future__ import annotations

import random
import re

from .base import BuiltinTask, TaskJudge, TaskRater

DETAIL_NOUNS: dict[str, tuple[str, ...]] = {
    "kitchen": ("table", "stove", "sink", "pot", "cup", "knife", "bowl", "oven"),
    "garden": ("rose", "tree", "bench", "pond", "gate", "grass", "bee", "fence"),
    "beach": ("sand", "wave", "shell", "crab", "towel", "dune", "kite", "boat"),
    "forest": ("oak", "fox", "moss", "owl", "log", "path", "fern", "deer"),
    "city": ("car", "bus", "tower", "road", "shop", "taxi", "crowd", "cafe"),
    "school": ("desk", "book", "pen", "board", "bell", "chalk", "map", "clock"),
    "farm": ("cow", "barn", "hen", "pig", "goat", "horse", "field", "hay"),
}
SUBJECTS: tuple[str, ...] = tuple(DETAIL_NOUNS)
ADJECTIVES: tuple[str, ...] = ("big", "old", "red", "warm", "small", "cold", "green", "dark", "soft", "tall")
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Describe the {}:",
    "Tell me about the {}:",
    "Picture the {}:",
    "What does the {} look like?",
)
PROMPTS: tuple[str, ...] = tuple(t.format(s) for s in SUBJECTS for t in PROMPT_TEMPLATES)
#: Which place each noun belongs to.
SUBJECT_OF_NOUN: dict[str, str] = {n: s for s, nouns in DETAIL_NOUNS.items() for n in nouns}

INTENSIFIER = "very"  # filler before an adjective
TAIL = "and so on"  # filler after the last detail
MIN_DETAILS, MAX_DETAILS = 1, 6
OPTIMUM = 4  # the number of details the rater likes best
RISE, FALL = 0.6, 0.7  # score gained per detail below the optimum, lost per detail above it
FILLER_COST = 0.3  # per "very" and per "and so on" tail
INTENSIFIER_SHARE, TAIL_SHARE = 0.1, 0.2  # how often demonstrations use filler
MAX_COMPLETION_CHARS, MAX_TEXT_BYTES, MAX_TOKENS = 80, 120, 22
STRAY_WORDS = ("the", "and", "very", "so", "on")
DEGENERATE_KINDS = ("repeat_detail", "duplicate_detail", "other_subject", "truncated", "run_on", "near_empty", "shuffled", "word_slip")
#: The slips a tiny policy really makes (doubled or dropped words, not stopping, a repeated or
#: out-of-place thing) are drawn more often than the blunt hacks.
DEGENERATE_WEIGHTS = (1, 2, 2, 1, 2, 1, 1, 3)

_WORD = re.compile(r"[A-Za-z]+")


def subject_of(prompt: str) -> str | None:
    """The place a prompt asks about, or None for a prompt of no known place."""
    return next((w for w in _WORD.findall(prompt.lower()) if w in DETAIL_NOUNS), None)


def parse_description(subject: str | None, completion: str) -> tuple[list[str], int] | None:
    """``(nouns, filler count)`` of a valid description of ``subject``, else None.

    Valid: one leading space, 1..6 details ``[very] ADJECTIVE NOUN`` joined by ", ", an
    optional ", and so on" tail, a final period (trailing whitespace ignored), every noun a
    thing of ``subject`` and none listed twice.
    """
    text = completion.rstrip()
    if subject is None or not text.startswith(" ") or text.startswith("  ") or not text.endswith("."):
        return None
    parts = text[1:-1].split(", ")
    filler = 0
    if len(parts) > 1 and parts[-1] == TAIL:
        parts, filler = parts[:-1], 1
    nouns = []
    for part in parts:
        words = part.split(" ")
        if len(words) == 3 and words[0] == INTENSIFIER:
            words, filler = words[1:], filler + 1
        if len(words) != 2 or words[0] not in ADJECTIVES or words[1] not in DETAIL_NOUNS[subject]:
            return None
        nouns.append(words[1])
    if not MIN_DETAILS <= len(nouns) <= MAX_DETAILS or len(set(nouns)) != len(nouns):
        return None
    return nouns, filler


def length_shape(details: int) -> float:
    """The rater's taste in length: 1 at the optimum, lower the further from it."""
    if details <= OPTIMUM:
        return 1.0 - RISE * (OPTIMUM - details)
    return 1.0 - FALL * (details - OPTIMUM)


def token_count(text: str) -> int:
    """Words plus punctuation marks, what the BPE turns into roughly one token each."""
    return len(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text))


def describe(rng: random.Random, subject: str, details: int, filler: bool = True) -> str:
    """A valid description of ``subject`` with ``details`` details (filler drawn if ``filler``)."""
    nouns = rng.sample(DETAIL_NOUNS[subject], details)
    parts = []
    for noun in nouns:
        very = f"{INTENSIFIER} " if filler and rng.random() < INTENSIFIER_SHARE else ""
        parts.append(f"{very}{rng.choice(ADJECTIVES)} {noun}")
    if filler and details > 1 and rng.random() < TAIL_SHARE:
        parts.append(TAIL)
    return " " + ", ".join(parts) + "."


def fits(prompt: str, completion: str) -> bool:
    """Within the length limits every good completion keeps."""
    return (
        len(completion) <= MAX_COMPLETION_CHARS
        and len((prompt + completion).encode("utf-8")) < MAX_TEXT_BYTES
        and token_count(completion) <= MAX_TOKENS
    )


class DescribeTask(BuiltinTask):
    """Describe a place in a few short details: neither too few nor too many."""

    name = "describe"

    def draw_prompt(self, rng: random.Random) -> str:
        return rng.choice(PROMPTS)

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        """Uniformly 1..6 details (independent of the optimum), redrawn until within limits."""
        subject = subject_of(prompt) or rng.choice(SUBJECTS)
        details = rng.randint(MIN_DETAILS, MAX_DETAILS)
        while True:
            text = describe(rng, subject, details)
            if fits(prompt, text):
                return text

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        kind = rng.choices(DEGENERATE_KINDS, weights=DEGENERATE_WEIGHTS)[0]
        subject = subject_of(prompt) or rng.choice(SUBJECTS)
        while True:
            text = self._degenerate(rng, subject, kind)
            if len(text) <= MAX_COMPLETION_CHARS and not self.is_valid(prompt, text):
                return text

    @staticmethod
    def _degenerate(rng: random.Random, subject: str, kind: str) -> str:
        """One attempt at an invalid completion of ``kind`` (the caller checks it is invalid)."""
        base = describe(rng, subject, rng.randint(MIN_DETAILS, MAX_DETAILS), filler=False)
        details = base[1:-1].split(", ")
        if kind == "repeat_detail":  # the classic hack: one detail (or bare noun) over and over
            detail = rng.choice(details)
            if rng.random() < 0.5:
                return " " + ", ".join([detail] * rng.randint(3, 6)) + "."
            return " " + " ".join([detail.split(" ")[-1]] * rng.randint(3, 7)) + "."
        if kind == "duplicate_detail":  # its subtle form: one thing listed twice
            noun = rng.choice(details).split(" ")[-1]
            details.insert(rng.randint(0, len(details)), f"{rng.choice(ADJECTIVES)} {noun}")
            return " " + ", ".join(details) + "."
        if kind == "other_subject":  # things of another place: one of them or all
            other = rng.choice([s for s in SUBJECTS if s != subject])
            swap = range(len(details)) if rng.random() < 0.5 else [rng.randrange(len(details))]
            strangers = iter(rng.sample(DETAIL_NOUNS[other], len(details)))
            for at in swap:
                details[at] = f"{details[at].split(' ')[0]} {next(strangers)}"
            return " " + ", ".join(details) + "."
        if kind == "truncated":  # cut inside a word, or the final period missing
            if rng.random() < 0.3:
                return base[:-1]
            spans = [m.span() for m in _WORD.finditer(base) if m.end() - m.start() >= 3]
            start, end = rng.choice(spans)
            return base[: rng.randint(start + 1, end - 1)]
        if kind == "run_on":  # does not stop: stray words after the period, or too many details
            if rng.random() < 0.5:
                base = describe(rng, subject, 8, filler=False)
                return " " + ", ".join(base[1:-1].split(", ")[: rng.randint(7, 8)]) + "."
            tail = [rng.choice(STRAY_WORDS), rng.choice(ADJECTIVES + DETAIL_NOUNS[subject])]
            return base + " " + " ".join(tail[: rng.randint(1, 2)]) + rng.choice((".", "", ","))
        if kind == "near_empty":
            return rng.choice((" .", " the", " and so on.", " very.", f" {rng.choice(ADJECTIVES)}.", f" {rng.choice(DETAIL_NOUNS[subject])}."))
        if kind == "shuffled":  # the words of a list in a scrambled order
            words = base[1:-1].replace(",", "").split(" ")
            rng.shuffle(words)
            return " " + " ".join(words) + "."
        if kind == "word_slip":  # a word doubled, dropped or stray, or a separator lost
            words = base.split(" ")
            at = rng.randrange(1, len(words))
            slip = rng.choice(("double", "drop", "stray", "separator"))
            if slip == "double":
                words.insert(at, words[at].rstrip(".,"))
            elif slip == "drop":
                del words[at]
            elif slip == "stray":
                words.insert(at, rng.choice(STRAY_WORDS))
            else:
                return base.replace(", ", rng.choice((" ", " and ", ". ")), 1)
            return " ".join(words)
        raise ValueError(f"kind must be one of {DEGENERATE_KINDS}, got {kind!r}")

    def gold_score(self, prompt: str, completion: str) -> float:
        """Valid: the length trade-off less filler, in [-1, 1]; invalid: [-1.9, -1.5]; no words: -2."""
        words = [w.lower() for w in _WORD.findall(completion)]
        if not words:
            return -2.0
        subject = subject_of(prompt)
        parsed = parse_description(subject, completion)
        if parsed is not None:
            nouns, filler = parsed
            score = max(-1.0, min(1.0, length_shape(len(nouns)) - FILLER_COST * filler))
        else:
            nouns = [w for w in words if w in SUBJECT_OF_NOUN]
            relevance = sum(SUBJECT_OF_NOUN[n] == subject for n in nouns) / len(nouns) if nouns else 0.0
            repeated = 1.0 - len(set(words)) / len(words)
            score = -1.6 + 0.1 * relevance - 0.3 * repeated
        return round(score, 6)  # equal in exact arithmetic -> an exact tie, not a float-noise win

    def is_valid(self, prompt: str, completion: str) -> bool:
        return parse_description(subject_of(prompt), completion) is not None


#: The describe task's gold judge, for YAML: ``judge: rlhf_lightning.tasks.describe.judge``.
judge = TaskJudge(DescribeTask())
#: The describe task's noisy rater, for YAML: ``rater: rlhf_lightning.tasks.describe.rater``.
rater = TaskRater(DescribeTask())
