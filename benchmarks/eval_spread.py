"""How far the pipeline's final comparison of a finished run moves with its samples: the judge
score, validity (and SFT's), win rate over SFT and KL of each run's final policy against its SFT
policy, as the pipeline's evaluation draws them (``rlhf_lightning.pipeline.final_comparison``:
one sample of each policy per held-out prompt), drawn ``--samples`` times with different sampling
seeds (the run's own seed first, the pipeline's figure, then 1000, 2000, ...): the mean, the
standard deviation and the range of the judge score over the draws, and the means of the rest.

    python benchmarks/eval_spread.py outputs/oracle-b10/*/seed* --samples 5
    python benchmarks/eval_spread.py configs/demo/pipeline.yaml

A run is a pipeline config (``rlhf-lightning pipeline --config FILE``, run to the end) or a
``benchmarks/suite.py`` run folder, ``<out>/<task>/seed<S>``, whose ``configs/pipeline.yaml`` is
that config. Nothing is trained.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from rlhf_lightning.pipeline import PipelineConfig, final_comparison, load_judge, parse_settings, stage_outputs


def draw_seeds(run_seed: int, samples: int) -> list[int]:
    """The sampling seeds of the draws: the run's own (the pipeline's figure), then 1000, 2000, ..."""
    return [run_seed] + [1000 * k for k in range(1, samples)]


def pipeline_config(run: Path) -> PipelineConfig:
    """The pipeline config ``run`` is, or that of a suite run folder (read as ``rlhf-lightning
    pipeline --config`` reads it)."""
    path = run if run.is_file() else run / "configs" / "pipeline.yaml"
    if not path.is_file():
        raise SystemExit(f"{run}: neither a pipeline config nor a benchmarks/suite.py run folder with configs/pipeline.yaml")
    config = parse_settings(PipelineConfig, "eval_spread", None, ["--config", str(path)])
    if config.judge is None:
        raise SystemExit(f"{path}: judge is null; the spread is the judge score's, so the config needs one")
    return config


def spread(run: Path, samples: int) -> dict[str, float | None]:
    """The draws' judge score (mean, sd, min, max) and mean validity (the policy's and SFT's),
    win rate and KL for ``run``."""
    config = pipeline_config(run)
    outputs, judge = stage_outputs(config), load_judge(config.judge)
    draws = [final_comparison(replace(config, seed=seed), outputs, judge)[0] for seed in draw_seeds(config.seed, samples)]
    gold = [d.gold_score for d in draws]
    return {"gold": statistics.mean(gold), "sd": statistics.stdev(gold) if len(gold) > 1 else 0.0,
            "min": min(gold), "max": max(gold), "valid": mean_or_none([d.validity for d in draws]),
            "valid_sft": mean_or_none([d.baseline_validity for d in draws]),
            "win": statistics.mean(d.gold_win_rate for d in draws), "kl": statistics.mean(d.kl for d in draws)}


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None where the judge has no validity check (its figures are None)."""
    return None if None in values else statistics.mean(values)


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="pipeline configs, or suite run folders <out>/<task>/seed<S>")
    parser.add_argument("--samples", type=int, default=5, help="draws per run (at least 1)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    print("| run | judge mean | sd | min | max | valid | valid SFT | win | KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = spread(run, args.samples)
        print(f"| {run} | {r['gold']:.3f} | {r['sd']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {cell(r['valid'])} "
              f"| {cell(r['valid_sft'])} | {r['win']:.3f} | {r['kl']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
