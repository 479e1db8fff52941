"""Held-out accuracy of a reward recipe on the built-in task, over several seeds.

Trains the reward stage of a config (default: the demo's) once per seed through the real CLI
(`rlhf-lightning fit`), then scores the task's 2000 validation pairs with the exported folder
and prints, per seed and as mean and standard deviation over seeds: pairwise accuracy, the
ceiling the label noise allows (the gold annotator's agreement with the noisy labels), the gap
in points, accuracy by pair kind (fluent/fluent, fluent/non-fluent, non-fluent/non-fluent, each
with its own ceiling), accuracy against gold's verdicts and Spearman with gold scores.

One run's gap moves by 1-2 points with the seed (see docs/reward.md), so judge a recipe by the
mean. Needs the SFT export the config starts from (run the demo's SFT stage first). Usage:

    python benchmarks/reward_accuracy.py --seeds 0 1 2
    python benchmarks/reward_accuracy.py --config my_reward.yaml --set model.init_args.learning_rate=0.001
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from rlhf_lightning.data.encoding import attention_mask_for, encode_preference, pad
from rlhf_lightning.evaluation import rank_correlation
from rlhf_lightning.models import load_sequence_scorer, load_tokenizer
from rlhf_lightning.forwards import score_sequences
from rlhf_lightning.rlhf_math import pair_accuracy
from rlhf_lightning.tasks import DEFAULT_SIZES, SentimentTask
from rlhf_lightning.tasks import label_agreement as judged_agreement
from rlhf_lightning.tasks.sentiment import gold_score, is_fluent, judge


def label_agreement(records: list[dict]) -> float:
    return judged_agreement(records, judge)


def pair_kind(record: dict) -> str:
    """``fl/fl``, ``fl/nf`` or ``nf/nf``: whether each side of a pair parses under the grammar."""
    return "/".join(sorted("fl" if is_fluent(record[side]) else "nf" for side in ("chosen", "rejected")))


def evaluate(model_dir: str, records: list[dict], max_length: int) -> dict[str, Any]:
    """Accuracy of the exported reward model on ``records``, overall and by pair kind."""
    tokenizer = load_tokenizer(model_dir)
    model = load_sequence_scorer(model_dir, tokenizer)
    sequences = []
    for record in records:
        encoded = encode_preference(record, tokenizer, max_length)
        sequences += [encoded["chosen"], encoded["rejected"]]
    scores = score_sequences(model, pad(sequences, tokenizer.pad_token_id), attention_mask_for(sequences),
                             batch_size=256, apply_offset=False)
    correct = pair_accuracy(scores[0::2], scores[1::2])
    golds = torch.tensor([(gold_score(r["prompt"], r["chosen"]), gold_score(r["prompt"], r["rejected"])) for r in records])
    gold_label = pair_accuracy(golds[:, 0], golds[:, 1])  # what the reward module logs as val/gold_accuracy
    decided = gold_label != 0.5
    result: dict[str, Any] = {
        "accuracy": correct.mean().item(),
        "ceiling": label_agreement(records),
        "gold_accuracy": (1.0 - (correct - gold_label).abs())[decided].mean().item(),
        "gold_spearman": rank_correlation(scores.tolist(), golds.reshape(-1).tolist()),
    }
    result["gap_points"] = 100 * (result["ceiling"] - result["accuracy"])
    kinds = [pair_kind(r) for r in records]
    for kind in ("fl/fl", "fl/nf", "nf/nf"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            result[kind] = {"pairs": len(rows), "accuracy": correct[rows].mean().item(),
                            "ceiling": label_agreement([records[i] for i in rows])}
    return result


def train(config_path: str, seed: int, out_dir: Path, overrides: list[str]) -> str:
    """Run the reward stage of ``config_path`` with ``seed``, writing only under ``out_dir``;
    returns the export folder."""
    config = yaml.safe_load(Path(config_path).read_text())
    config["seed_everything"] = seed
    config["trainer"]["logger"] = False
    config["trainer"]["callbacks"] = []
    config["trainer"]["enable_checkpointing"] = False
    export = out_dir / f"seed{seed}" / "model"
    config["model"]["init_args"]["export_dir"] = str(export)
    run_config = out_dir / f"seed{seed}.yaml"
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "rlhf_lightning.cli", "fit", "--config", str(run_config)]
    command += [f"--{override}" for override in overrides]
    subprocess.run(command, check=True)
    return str(export)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo/reward.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a CLI override without its dashes, e.g. model.init_args.learning_rate=0.001")
    parser.add_argument("--out_dir", default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args()

    data_args = yaml.safe_load(Path(args.config).read_text())["data"].get("init_args", {})
    if data_args.get("train_file") or data_args.get("val_file"):
        parser.error(f"{args.config}: data.init_args.train_file/val_file must be null (the built-in task)")
    # The data seed fixes the task's pairs and their order; --seeds varies the rest (the head's init).
    # Scored at the config's max_length (256 is the data module's default); a --set of
    # data.init_args.max_length changes training only.
    records = SentimentTask(seed=data_args.get("seed", 0)).preference_records(DEFAULT_SIZES["prefs_val"], split="val")
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(args.out_dir or scratch)
        results = []
        for seed in args.seeds:
            export = train(args.config, seed, out_dir, args.overrides)
            result = {"seed": seed, **evaluate(export, records, data_args.get("max_length", 256))}
            results.append(result)
            print(json.dumps(result), flush=True)

    print(f"\n{'seed':>6} {'accuracy':>9} {'ceiling':>8} {'gap':>6} {'fl/fl':>6} {'fl/nf':>6} {'nf/nf':>6} "
          f"{'gold acc':>9} {'spearman':>9}")
    for r in results:
        kinds = " ".join(f"{r[k]['accuracy']:6.3f}" if k in r else f"{'-':>6}" for k in ("fl/fl", "fl/nf", "nf/nf"))
        print(f"{r['seed']:>6} {r['accuracy']:9.3f} {r['ceiling']:8.3f} {r['gap_points']:6.1f} {kinds} "
              f"{r['gold_accuracy']:9.3f} {r['gold_spearman'] or float('nan'):9.3f}")
    if len(results) > 1:
        gaps = [r["gap_points"] for r in results]
        print(f"gap: mean {statistics.fmean(gaps):.1f} points, sd {statistics.stdev(gaps):.1f} over {len(gaps)} seeds")


if __name__ == "__main__":
    main()
