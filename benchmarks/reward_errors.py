"""Where a reward model loses its accuracy: the held-out pairs of suite runs, by kind of pair.

For each run folder (``<runs>/<task>/seed<seed>``, as ``benchmarks/suite.py`` writes them) it
scores the reward stage's validation pairs with the run's reward model and with the judge its
reward config names, and splits them by the judge's validity check into valid / valid, valid /
invalid (split again by whether the invalid response repeats a word) and invalid / invalid
pairs (a judge without a validity check gives one row of all pairs). Per kind it prints:

- ``n``: pairs of that kind;
- ``acc``: the reward model's accuracy against the noisy labels (ties 0.5), as ``val/accuracy``;
- ``ceiling``: the judge's agreement with those labels (ties 0.5), what a reward model that
  ranks as the judge does would reach (a kind's ``acc`` can exceed it by chance or by the
  model ranking like the rater's noise, as on pairs of two invalid responses);
- ``rm~judge``: how often the reward model orders the pair as the judge does (judge ties left
  out, a reward-model tie counts one half);
- ``lost``: ``(ceiling - acc) * n / N`` in points, that kind's share of the run's gap to the
  ceiling (the kinds' ``lost`` add up to the gap).

A response repeats a word when a word of three letters or more occurs twice in it that no valid
response of the validation pairs ever repeats (so describe's shared adjectives and "very", which
valid descriptions may use twice, do not count; its nouns do): the item, detail or adjective said
twice that the built-in tasks' judges mark invalid.

``--synthetic N`` adds a second table: the reward model's accuracy on the first ``N``
synthetic pairs of its own training draw (``chosen`` over the corruption of ``chosen``,
:mod:`rlhf_lightning.data.corruptions`; a run trained without them gets the pairs that
``synthetic_pairs: 0.25`` would have added), which tells whether it fits the fault at all.

    python benchmarks/reward_errors.py --runs outputs/suite-demo --seeds 0 1
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

from rlhf_lightning.evaluation import reward_pair_scores
from rlhf_lightning.pipeline import stage_datamodule, stage_init_args
from rlhf_lightning.rlhf_math import pair_accuracy
from rlhf_lightning.tasks import BUILTIN_TASKS, import_object
from rlhf_lightning.tasks.base import compare, judge_validity

_WORD = re.compile(r"[a-z]{3,}")
KINDS = ("valid / valid", "valid / invalid, repeats a word", "valid / invalid, other", "invalid / invalid")
ALL_PAIRS = "all pairs (the judge has no validity check)"


def repeated_words(text: str) -> set[str]:
    """The words of three letters or more that occur more than once in ``text`` (lowercased)."""
    return {w for w, c in Counter(_WORD.findall(text.lower())).items() if c > 1}


def pair_kind(valid_chosen: bool, valid_rejected: bool, invalid_text: str, allowed_repeats: set[str]) -> str:
    """The kind of a pair; ``allowed_repeats``: the words some valid response repeats."""
    if valid_chosen and valid_rejected:
        return KINDS[0]
    if valid_chosen or valid_rejected:
        return KINDS[1] if repeated_words(invalid_text) - allowed_repeats else KINDS[2]
    return KINDS[3]


def error_table(run: Path) -> list[dict]:
    """One row per kind of the run's held-out pairs (see the module docstring)."""
    config_path = run / "configs" / "reward.yaml"
    data = stage_datamodule(config_path)
    records = data.load_records()[1]
    judge = import_object(stage_init_args(config_path)["judge"])
    prompts = [r["prompt"] for r in records]
    chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
    gold_chosen, gold_rejected = judge(prompts, chosen), judge(prompts, rejected)
    valid_chosen, valid_rejected = judge_validity(judge, prompts, chosen), judge_validity(judge, prompts, rejected)
    scores = reward_pair_scores(str(run / "reward" / "model"), records, data.max_length)
    accuracy = pair_accuracy(scores[:, 0], scores[:, 1]).tolist()
    if valid_chosen is None or valid_rejected is None:
        kinds = [ALL_PAIRS] * len(records)
    else:
        allowed = {w for texts, valid in ((chosen, valid_chosen), (rejected, valid_rejected))
                   for text, ok in zip(texts, valid) if ok for w in repeated_words(text)}
        kinds = [pair_kind(bool(valid_chosen[i]), bool(valid_rejected[i]),
                           rejected[i] if not valid_rejected[i] else chosen[i], allowed) for i in range(len(records))]
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0])  # n, acc, ceiling, agree, untied
    for i, kind in enumerate(kinds):
        row = sums[kind]
        row[0] += 1
        row[1] += accuracy[i]
        judged = compare(gold_chosen[i], gold_rejected[i])
        row[2] += judged
        if judged != 0.5:
            row[4] += 1
            row[3] += 1 - abs(compare(scores[i, 0].item(), scores[i, 1].item()) - judged)
    total = len(records)
    return [
        {"kind": kind, "n": n, "acc": acc / n, "ceiling": ceiling / n, "rm~judge": agree / untied if untied else None,
         "lost": 100 * (ceiling - acc) / total}
        for kind in (*KINDS, ALL_PAIRS) if kind in sums for n, acc, ceiling, agree, untied in [sums[kind]]
    ]


def synthetic_fit(run: Path, n: int) -> tuple[float, int]:
    """Accuracy of ``run``'s reward model on the first ``n`` synthetic pairs of its training
    records (its data config; ``synthetic_pairs`` 0.25 where the config has none), and how many."""
    data = stage_datamodule(run / "configs" / "reward.yaml")
    data.synthetic_pairs = data.synthetic_pairs or 0.25
    pairs = data.corrupted_pairs(data.load_records()[0])[:n]
    scores = reward_pair_scores(str(run / "reward" / "model"), pairs, data.max_length)
    return pair_accuracy(scores[:, 0], scores[:, 1]).mean().item(), len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="outputs/suite", help="a suite.py output folder")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also score the first N synthetic pairs of each run's training draw")
    args = parser.parse_args(argv)
    runs = []
    for task in args.tasks:
        for seed in args.seeds:
            run = Path(args.runs) / task / f"seed{seed}"
            if (run / "reward" / "model").is_dir():
                runs.append((task, seed, run))
            else:
                print(f"(no reward model in {run})", flush=True)
    print("| task | seed | kind | n | acc | ceiling | rm~judge | lost (points) |\n|---|---|---|---|---|---|---|---|")
    for task, seed, run in runs:
        for row in error_table(run):
            agree = "-" if row["rm~judge"] is None else f"{row['rm~judge']:.3f}"
            print(f"| {task} | {seed} | {row['kind']} | {row['n']} | {row['acc']:.3f} | {row['ceiling']:.3f} | "
                  f"{agree} | {row['lost']:.1f} |", flush=True)
    if args.synthetic:
        print("\n| task | seed | synthetic training pairs | accuracy |\n|---|---|---|---|")
        for task, seed, run in runs:
            accuracy, n = synthetic_fit(run, args.synthetic)
            print(f"| {task} | {seed} | {n} | {accuracy:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
