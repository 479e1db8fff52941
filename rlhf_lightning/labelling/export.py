"""From annotations to the reward stage's preference pairs, and agreement between annotators.

* A judgement of two responses is one pair; a ranking of K responses is its K*(K-1)/2 pairs
  (every better-ranked response is ``chosen`` against every worse-ranked one), as InstructGPT
  trained on rankings.
* Ties and skips carry no preference. They are left out, or kept with ``"tie": true`` /
  ``"skipped": true`` (``chosen``/``rejected`` then in the order shown) when asked for.
* Every annotator's judgement counts: an item labelled by three people gives three sets of
  pairs. Agreement is reported on the items that more than one person labelled.

The output is ``{"prompt", "chosen", "rejected", "annotator", "item"[, "tie"|"skipped"]}``,
which :func:`rlhf_lightning.records.read_preferences` reads (extra fields are ignored).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from ..records import DataFormatError, Record, write_jsonl
from .storage import judgements, read_annotations

KEEP_CHOICES = ("drop", "flag")


def judgement_pairs(judgement: Record, ties: str = "drop", skips: str = "drop") -> list[Record]:
    """The preference records one judgement gives (see the module docstring)."""
    responses, choice = judgement["responses"], judgement["choice"]
    base = {"prompt": judgement["prompt"], "annotator": judgement["annotator"], "item": judgement["item"]}
    if choice in ("tie", "skip"):
        if (ties if choice == "tie" else skips) != "flag":
            return []
        flag = {"tie": True} if choice == "tie" else {"skipped": True}
        return [{**base, "chosen": responses[a], "rejected": responses[b], **flag}
                for a, b in combinations(judgement["shown"], 2)]
    return [{**base, "chosen": responses[a], "rejected": responses[b]}
            for a, b in combinations(judgement["ranking"], 2)]


def verdicts(judgement: Record) -> dict[tuple[int, int], str]:
    """For each candidate pair ``(i, j)`` with ``i < j``: ``"i"``, ``"j"`` (the better one) or
    ``"tie"``. A skip has no verdicts."""
    if judgement["choice"] == "skip":
        return {}
    if judgement["choice"] == "tie":
        return {pair: "tie" for pair in combinations(sorted(judgement["shown"]), 2)}
    position = {candidate: rank for rank, candidate in enumerate(judgement["ranking"])}
    return {(i, j): "i" if position[i] < position[j] else "j" for i, j in combinations(sorted(position), 2)}


@dataclass
class Agreement:
    """How often two annotators gave the same verdict on the same response pair."""

    items: int = 0  # items with verdicts from more than one annotator
    comparisons: int = 0  # (annotator pair, response pair) verdicts compared
    agreeing: int = 0
    by_annotators: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (a, b) -> [agreeing, compared]

    @property
    def rate(self) -> float | None:
        return self.agreeing / self.comparisons if self.comparisons else None

    def lines(self) -> list[str]:
        """A short human-readable report."""
        if not self.comparisons:
            return ["agreement: no item was labelled by more than one annotator"]
        out = [f"agreement: {self.agreeing}/{self.comparisons} = {self.rate:.0%} of comparisons on "
               f"{self.items} items labelled by more than one annotator (ties count as a verdict, skips do not)"]
        for (a, b), (agree, total) in sorted(self.by_annotators.items()):
            out.append(f"  {a} vs {b}: {agree}/{total} = {agree / total:.0%}")
        return out


def agreement(in_force: list[Record]) -> Agreement:
    """Pairwise agreement over the judgements in force (each annotator's latest per item)."""
    per_item: dict[str, dict[str, dict[tuple[int, int], str]]] = defaultdict(dict)
    for judgement in in_force:
        found = verdicts(judgement)
        if found:
            per_item[judgement["item"]][judgement["annotator"]] = found
    result = Agreement()
    for by_annotator in per_item.values():
        if len(by_annotator) < 2:
            continue
        result.items += 1
        for a, b in combinations(sorted(by_annotator), 2):
            counts = result.by_annotators.setdefault((a, b), [0, 0])
            for pair, verdict in by_annotator[a].items():
                if pair in by_annotator[b]:
                    same = int(verdict == by_annotator[b][pair])
                    counts[0] += same
                    counts[1] += 1
                    result.agreeing += same
                    result.comparisons += 1
    return result


@dataclass
class ExportSummary:
    judgements: int
    pairs: int
    agreement: Agreement


def export_annotations(annotations: str | os.PathLike[str], out: str | os.PathLike[str],
                       ties: str = "drop", skips: str = "drop") -> ExportSummary:
    """Write the preference pairs of an annotations file to ``out`` (atomically)."""
    for name, value in (("ties", ties), ("skips", skips)):
        if value not in KEEP_CHOICES:
            raise ValueError(f"{name} must be one of {KEEP_CHOICES}, got {value!r}")
    if not os.path.isfile(annotations):
        raise DataFormatError(annotations, 0, None, "file does not exist")
    events = read_annotations(annotations)  # checked: a bad line names file, line and field
    in_force = judgements(events)
    if not in_force:
        raise DataFormatError(annotations, 0, None, "no judgements to export" if events else "file holds no records")
    pairs = [pair for judgement in in_force for pair in judgement_pairs(judgement, ties, skips)]
    if not pairs:
        raise DataFormatError(annotations, 0, None, "every judgement is a tie or a skip, so there is no pair to export")
    write_jsonl(out, pairs)
    return ExportSummary(len(in_force), len(pairs), agreement(in_force))
