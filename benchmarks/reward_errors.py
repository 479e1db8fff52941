"""Where a reward model loses its accuracy: the held-out pairs of suite runs, by kind of pair.

For each run folder (``<runs>/<task>/seed<seed>``, as ``benchmarks/suite.py`` writes them) it
scores the reward stage's validation pairs with the run's reward model and the run's judge, and
splits them by the judge's validity check into valid / valid, valid / invalid (split again by
whether the invalid response repeats a word) and invalid / invalid pairs. Per kind it prints:

- ``n``: pairs of that kind;
- ``acc``: the reward model's accuracy against the noisy labels (ties 0.5), as ``val/accuracy``;
- ``ceiling``: the judge's agreement with those labels (ties 0.5), the best ``acc`` can be;
- ``rm~judge``: how often the reward model orders the pair as the judge does (judge ties left out);
- ``lost``: ``(ceiling - acc) * n / N`` in points, that kind's share of the run's gap to the
  ceiling (the kinds' ``lost`` add up to the gap).

A word repeats when a word of three letters or more (other than "the" and "and") occurs twice:
the item, detail or adjective said twice that the built-in tasks' judges mark invalid.

    python benchmarks/reward_errors.py --runs outputs/suite-demo --seeds 0 1
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from rlhf_lightning.evaluation import reward_pair_scores  # noqa: E402
from rlhf_lightning.pipeline import datamodule_records  # noqa: E402
from rlhf_lightning.rlhf_math import pair_accuracy  # noqa: E402
from rlhf_lightning.tasks import BUILTIN_TASKS, import_object  # noqa: E402
from rlhf_lightning.tasks.base import compare  # noqa: E402

_WORD = re.compile(r"[a-z]{3,}")
_COMMON = {"the", "and"}
KINDS = ("valid / valid", "valid / invalid, repeats a word", "valid / invalid, other", "invalid / invalid")


def repeats_a_word(text: str) -> bool:
    counts = Counter(w for w in _WORD.findall(text.lower()) if w not in _COMMON)
    return any(c > 1 for c in counts.values())


def pair_kind(valid_chosen: bool, valid_rejected: bool, invalid_text: str | None) -> str:
    if valid_chosen and valid_rejected:
        return KINDS[0]
    if valid_chosen or valid_rejected:
        return KINDS[1] if repeats_a_word(invalid_text or "") else KINDS[2]
    return KINDS[3]


def error_table(run: Path) -> list[dict]:
    """One row per kind of the run's held-out pairs (see the module docstring)."""
    config = run / "configs" / "reward.yaml"
    records = datamodule_records(config)[1]
    judge = import_object(suite.judge_path(run.parent.name))
    prompts = [r["prompt"] for r in records]
    chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
    gold_chosen, gold_rejected = judge(prompts, chosen), judge(prompts, rejected)
    valid_chosen, valid_rejected = judge.is_valid(prompts, chosen), judge.is_valid(prompts, rejected)
    scores = reward_pair_scores(str(run / "reward" / "model"), records)
    accuracy = pair_accuracy(scores[:, 0], scores[:, 1]).tolist()
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])  # n, acc, ceiling, agree, untied
    for i in range(len(records)):
        invalid = rejected[i] if not valid_rejected[i] else chosen[i] if not valid_chosen[i] else None
        row = sums[pair_kind(valid_chosen[i], valid_rejected[i], invalid)]
        row[0] += 1
        row[1] += accuracy[i]
        row[2] += compare(gold_chosen[i], gold_rejected[i])
        if gold_chosen[i] != gold_rejected[i]:
            row[4] += 1
            row[3] += (scores[i, 0] > scores[i, 1]).item() == (gold_chosen[i] > gold_rejected[i])
    total = len(records)
    return [
        {"kind": kind, "n": n, "acc": acc / n, "ceiling": ceiling / n, "rm~judge": agree / untied if untied else None,
         "lost": 100 * (ceiling - acc) / total}
        for kind in KINDS if kind in sums for n, acc, ceiling, agree, untied in [sums[kind]]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="outputs/suite", help="a suite.py output folder")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args(argv)
    print("| task | seed | kind | n | acc | ceiling | rm~judge | lost (points) |\n|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for seed in args.seeds:
            run = Path(args.runs) / task / f"seed{seed}"
            if not (run / "reward" / "model").is_dir():
                print(f"| {task} | {seed} | (no reward model in {run}) |", flush=True)
                continue
            for row in error_table(run):
                agree = "-" if row["rm~judge"] is None else f"{row['rm~judge']:.3f}"
                print(f"| {task} | {seed} | {row['kind']} | {row['n']} | {row['acc']:.3f} | {row['ceiling']:.3f} | "
                      f"{agree} | {row['lost']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
