"""Does an SFT policy know that its demonstrations never say a word twice?

For each suite run folder given (``benchmarks/suite.py`` writes them: ``configs/sft.yaml`` and
``sft/model``), it samples ``--n`` responses to each of the first ``--prompts`` validation
prompts of the SFT data from the SFT policy (with the run's PPO generation settings, as the
suite's best-of-16 samples) and prints:

- ``repeats``: the share of the policy's samples that say a word twice that no validation
  demonstration says twice (words of three letters or more, as ``reward_errors.py`` counts
  them: on the built-in tasks lists' items, describe's nouns, sentiment's adjectives);
- ``valid``: the share of samples the pipeline's judge (``configs/pipeline.yaml``) calls
  valid, when the judge has a validity check.

A model that has learned the demonstrations' rule repeats (almost) never; one that has not
repeats about as often as drawing each word independently would.

    python benchmarks/sft_repeats.py outputs/suite-demo/lists/seed0 outputs/suite-demo/describe/seed0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_errors import repeated_words  # noqa: E402
from suite import generation_of  # noqa: E402
from rlhf_lightning.best_of_n import completions_of, sample_candidates  # noqa: E402
from rlhf_lightning.pipeline import datamodule_records, load_judge  # noqa: E402
from rlhf_lightning.tasks.base import judge_validity  # noqa: E402


def repeat_row(run: Path, num_prompts: int, n: int, seed: int) -> dict:
    demos = datamodule_records(run / "configs" / "sft.yaml")[1]
    allowed = {w for d in demos for w in repeated_words(d["completion"])}  # words some demonstration says twice
    prompts = list(dict.fromkeys(d["prompt"] for d in demos))[:num_prompts]
    candidates = sample_candidates(str(run / "sft" / "model"), prompts, n, generation_of(run / "configs" / "ppo.yaml"), seed)
    samples = [c for group in completions_of(candidates, n) for c in group]
    sample_prompts = [p for p in prompts for _ in range(n)]
    judge = load_judge(yaml.safe_load((run / "configs" / "pipeline.yaml").read_text())["judge"])
    valid = judge_validity(judge, sample_prompts, samples)
    return {
        "run": str(run),
        "repeats": sum(bool(repeated_words(s) - allowed) for s in samples) / len(samples),
        "valid": None if valid is None else sum(map(bool, valid)) / len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="suite run folders (<out>/<task>/seed<s>)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| run | repeats | valid |\n|---|---|---|")
    for run in args.runs:
        row = repeat_row(run, args.prompts, args.n, args.seed)
        valid = "-" if row["valid"] is None else f"{row['valid']:.3f}"
        print(f"| {row['run']} | {row['repeats']:.3f} | {valid} |", flush=True)


if __name__ == "__main__":
    main()
