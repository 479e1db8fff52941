"""What every task is, and what the built-in tasks share.

A **task** is a source of records (SFT demonstrations, preference pairs, prompts) together with
a **gold judge** (the score raters are noisy about) and a **noisy rater** (how those pairs were
labelled). Generic code (data modules, stage modules, evaluation, the pipeline) only ever sees
the :class:`Task` protocol or a judge (a callable ``(prompts, completions) -> scores``, optionally
with ``is_valid``); it never imports a particular task.

The built-in tasks subclass :class:`BuiltinTask`: each supplies how to draw a prompt, a good
(valid) completion and a degenerate (invalid) one, and its gold score; the base class turns
those into the six JSONL splits with Bradley-Terry label noise, exactly as for every other task.
Standard library only; everything is deterministic given a seed.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..records import write_jsonl

#: Records per split that ``write_files`` and the data modules use when no size is given.
DEFAULT_SIZES: dict[str, int] = {
    "sft_train": 4000, "sft_val": 200,
    "prefs_train": 8000, "prefs_val": 2000,
    "prompts_train": 2000, "prompts_val": 200,
}
#: Bradley-Terry temperature of the built-in raters (on gold scores in [-2, 1]).
DEFAULT_NOISE_TEMPERATURE = 0.4


@runtime_checkable
class Task(Protocol):
    """The records of the three stages, a gold score and a validity check.

    ``split`` is ``"train"`` or ``"val"``; each (kind, split) draws from its own seeded stream,
    so validation records differ from training records.
    """

    name: str

    def sft_records(self, n: int, split: str = "train") -> list[dict]:
        """``n`` demonstrations ``{"prompt", "completion"}``."""
        ...

    def preference_records(self, n: int, split: str = "train") -> list[dict]:
        """``n`` pairs ``{"prompt", "chosen", "rejected"}`` labelled by the task's noisy rater."""
        ...

    def prompt_records(self, n: int, split: str = "train") -> list[dict]:
        """``n`` prompts ``{"prompt"}``."""
        ...

    def gold_score(self, prompt: str, completion: str) -> float:
        """What the raters are noisy about: higher is better."""
        ...

    def is_valid(self, prompt: str, completion: str) -> bool:
        """Whether ``completion`` is a well-formed answer to ``prompt`` (grammar, form, constraints)."""
        ...


def task_records(task: Task, kind: str, split: str, n: int | None = None) -> list[dict]:
    """A task's records of ``kind`` (``sft``, ``prefs`` or ``prompts``) for ``split``; ``n``
    defaults to the split's size in :data:`DEFAULT_SIZES`."""
    make = {"sft": task.sft_records, "prefs": task.preference_records, "prompts": task.prompt_records}[kind]
    return make(DEFAULT_SIZES[f"{kind}_{split}"] if n is None else n, split)


class TaskJudge:
    """A task's gold score and validity check as a judge: ``judge(prompts, completions) -> scores``
    and ``judge.is_valid(prompts, completions) -> list[bool]``."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.task.gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]

    def is_valid(self, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
        return [self.task.is_valid(p, c) for p, c in zip(prompts, completions, strict=True)]

    def __repr__(self) -> str:
        return f"TaskJudge({self.task.name})"


class TaskRater:
    """A task's simulated rater as a pairwise labeller: ``rater(prompts, firsts, seconds)`` gives,
    per pair, 1.0 when it prefers the first response, 0.0 when it prefers the second (a
    :data:`RaterFn`). It is the task's noisy Bradley-Terry rater, seeded by ``seed`` and the
    pair's text, so labelling the same pair again gives the same label (a resumed labelling
    round repeats nothing)."""

    def __init__(self, task: BuiltinTask, seed: int = 0) -> None:
        self.task, self.seed = task, seed

    def __call__(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[float | None]:
        labels: list[float | None] = []
        for prompt, first, second in zip(prompts, firsts, seconds, strict=True):
            rng = random.Random(json.dumps([self.task.name, self.seed, prompt, first, second]))
            labels.append(1.0 if self.task.rater_prefers_first(rng, prompt, first, second) else 0.0)
        return labels

    def __repr__(self) -> str:
        return f"TaskRater({self.task.name})"


#: A rater labels pairs of responses: ``(prompts, firsts, seconds) -> labels``, each label 1.0
#: (the first is better), 0.0 (the second is), 0.5 (a tie) or None (skipped: no label). The
#: built-in tasks' noisy raters are one (``rlhf_lightning.tasks.sentiment.rater``); an LLM judge
#: asked "which response is better?" is another.
RaterFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float | None]]


def judge_validity(judge: Callable[..., Any], prompts: Sequence[str], completions: Sequence[str]) -> list[float] | None:
    """``judge.is_valid`` as 0/1 floats, or None when the judge has no validity check."""
    check = getattr(judge, "is_valid", None)
    if check is None:
        return None
    return [float(v) for v in check(list(prompts), list(completions))]


def bradley_terry_probability(score_a: float, score_b: float, temperature: float) -> float:
    """``P(a > b) = sigmoid((score_a - score_b) / temperature)``, without overflow."""
    z = (score_a - score_b) / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    return math.exp(z) / (1.0 + math.exp(z))


def compare(score_a: float, score_b: float) -> float:
    """1 if ``a`` scores higher, 0 if lower, 0.5 on a tie."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def label_agreement(records: Sequence[dict], judge: Callable[..., Sequence[float]]) -> float:
    """Share of preference records whose ``chosen`` the judge scores above ``rejected`` (ties 0.5).

    On noisily labelled records this is the **noise ceiling**: the accuracy, against those
    labels, of a reward model that ranks exactly like the judge.
    """
    if not records:
        raise ValueError("label_agreement needs at least one record")
    prompts = [r["prompt"] for r in records]
    chosen = judge(prompts, [r["chosen"] for r in records])
    rejected = judge(prompts, [r["rejected"] for r in records])
    return sum(map(compare, chosen, rejected)) / len(records)


def win_rate(judge: Callable[..., Sequence[float]], prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts where the judge prefers ``a[i]`` over ``b[i]`` (ties 0.5)."""
    if not (len(prompts) == len(a) == len(b)) or not prompts:
        raise ValueError("win_rate needs equally long, non-empty sequences")
    return sum(map(compare, judge(list(prompts), list(a)), judge(list(prompts), list(b)))) / len(prompts)


class BuiltinTask:
    """A deterministic toy world: subclasses supply the grammar, the base class the records.

    Subclasses set ``name`` and implement :meth:`draw_prompt`, :meth:`good_completion`,
    :meth:`degenerate_completion`, :meth:`gold_score` and :meth:`is_valid`. Demonstrations are
    good completions drawn *without* regard to what the rater prefers (RLHF's job is to find
    that out from the preference pairs); a preference candidate is degenerate with probability
    ``degenerate_share``, and the rater prefers ``a`` over ``b`` with the Bradley-Terry
    probability of their gold scores at ``noise_temperature``.
    """

    name = "task"

    def __init__(self, seed: int = 0, noise_temperature: float = DEFAULT_NOISE_TEMPERATURE, degenerate_share: float = 0.2) -> None:
        if noise_temperature <= 0:
            raise ValueError(f"noise_temperature must be > 0, got {noise_temperature}")
        if not 0.0 <= degenerate_share <= 1.0:
            raise ValueError(f"degenerate_share must be in [0, 1], got {degenerate_share}")
        self.seed = seed
        self.noise_temperature = noise_temperature
        self.degenerate_share = degenerate_share

    # --- what a task supplies ----------------------------------------------------------
    def draw_prompt(self, rng: random.Random) -> str:
        raise NotImplementedError

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        """A valid completion, drawn without regard to what the rater prefers."""
        raise NotImplementedError

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        """An invalid completion of the kind weak reward models over-rate."""
        raise NotImplementedError

    def gold_score(self, prompt: str, completion: str) -> float:
        raise NotImplementedError

    def is_valid(self, prompt: str, completion: str) -> bool:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def _rng(self, kind: str, split: str) -> random.Random:
        # String seeds are hashed with SHA-512 by `random`, stable across runs and platforms.
        return random.Random(f"rlhf-lightning/{self.name}/{self.seed}/{kind}/{split}")

    def judge(self) -> TaskJudge:
        return TaskJudge(self)

    def rater_prefers_first(self, rng: random.Random, prompt: str, a: str, b: str) -> bool:
        """The simulated rater: True when it labels ``a`` as preferred over ``b``."""
        p = bradley_terry_probability(self.gold_score(prompt, a), self.gold_score(prompt, b), self.noise_temperature)
        return rng.random() < p

    def sft_records(self, n: int, split: str = "train") -> list[dict]:
        rng = self._rng("sft", split)
        records = []
        for _ in range(n):
            prompt = self.draw_prompt(rng)
            records.append({"prompt": prompt, "completion": self.good_completion(rng, prompt)})
        return records

    def preference_records(self, n: int, split: str = "train") -> list[dict]:
        rng = self._rng("prefs", split)

        def candidate(prompt: str) -> str:
            if rng.random() < self.degenerate_share:
                return self.degenerate_completion(rng, prompt)
            return self.good_completion(rng, prompt)

        records = []
        for _ in range(n):
            prompt = self.draw_prompt(rng)
            a = candidate(prompt)
            b = candidate(prompt)
            while b == a:
                b = candidate(prompt)
            if not self.rater_prefers_first(rng, prompt, a, b):
                a, b = b, a
            records.append({"prompt": prompt, "chosen": a, "rejected": b})
        return records

    def prompt_records(self, n: int, split: str = "train") -> list[dict]:
        rng = self._rng("prompts", split)
        return [{"prompt": self.draw_prompt(rng)} for _ in range(n)]

    def write_files(self, out_dir: str | os.PathLike[str], sizes: dict[str, int] | None = None) -> dict[str, Path]:
        """Write the six JSONL files of :data:`DEFAULT_SIZES` (overridable per key) atomically.

        Returns ``{"sft_train": Path(out_dir, "sft_train.jsonl"), ...}``.
        """

        unknown = set(sizes or {}) - set(DEFAULT_SIZES)
        if unknown:
            raise ValueError(f"unknown size keys {sorted(unknown)}; expected some of {sorted(DEFAULT_SIZES)}")
        sizes = {**DEFAULT_SIZES, **(sizes or {})}
        paths = {}
        for name, n in sizes.items():
            kind, split = name.split("_")
            paths[name] = write_jsonl(Path(out_dir) / f"{name}.jsonl", task_records(self, kind, split, n))
        return paths
