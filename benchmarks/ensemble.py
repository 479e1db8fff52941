"""A reward-model ensemble with an uncertainty penalty as PPO's reward, on the task suite.

Starts from the runs of ``benchmarks/methods.py`` (or ``suite.py``): for each (task, seed) it
reuses that run's SFT policy and reward model (member 1) and trains a second reward model on the
same pairs with the same config, changing only ``seed_everything`` (seed + 1000: the head's
initialisation and the order of the pairs). PPO then runs the run's own PPO config with the two
members as its reward, ``mean - k * std`` of their scores (``scores.ensemble_penalty = k``), and
the policy is compared with SFT exactly as the pipeline does (the same prompts, sampling, judge
and seed; ``rho`` is member 1's Spearman correlation with the judge, so it reads the same
reward model as the single-model row). Each member's held-out accuracy and the ensemble mean's
are printed beside it.

    python benchmarks/ensemble.py --runs outputs/methods-rm --seeds 0 1 --penalty 1.0
    python benchmarks/ensemble.py --runs outputs/methods-rm --seeds 0 1 --penalty 0.0   # the mean alone

Finished steps (a member's export, a PPO export, a row) are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from rlhf_lightning.evaluation import reward_pair_scores  # noqa: E402
from rlhf_lightning.models import is_complete_hf_folder  # noqa: E402
from rlhf_lightning.pipeline import datamodule_records  # noqa: E402
from rlhf_lightning.rlhf_math import pair_accuracy  # noqa: E402
from rlhf_lightning.tasks import import_object, label_agreement  # noqa: E402

MEMBER_SEED_OFFSET = 1000


def train_member(run: Path, out: Path, seed: int, normalize_file: Path) -> Path:
    """The run's reward config with another seed, logging and exporting under ``out/reward2``."""
    export = out / "reward2" / "model"
    if is_complete_hf_folder(export):
        return export
    config = suite.replace_strings(yaml.safe_load((run / "configs" / "reward.yaml").read_text()),
                                   str(run / "reward"), str(out / "reward2"))
    config["seed_everything"] = seed + MEMBER_SEED_OFFSET
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), name="reward2")
    suite.fit(config, out / "configs" / "reward2.yaml", f"--model.init_args.normalize_file={normalize_file}")
    return export


def run_ppo(run: Path, out: Path, members: list[Path], penalty: float) -> Path:
    export = out / "ppo" / "policy"
    if is_complete_hf_folder(export):
        return export
    config = suite.replace_strings(yaml.safe_load((run / "configs" / "ppo.yaml").read_text()), str(run), str(out))
    init = config["model"]["init_args"]
    init.update(policy=str(run / "sft" / "model"), reward_model=[str(m) for m in members])
    init.setdefault("scores", {})["ensemble_penalty"] = penalty
    suite.fit(config, out / "configs" / "ppo.yaml")
    return export


def main(argv: list[str] | None = None) -> int:
    parser = suite.runs_argument_parser(__doc__)
    parser.add_argument("--penalty", type=float, default=1.0)
    parser.add_argument("--members-only", action="store_true", help="train the second members and stop")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    rows = []
    for task in args.tasks:
        judge = import_object(suite.judge_path(task))
        for seed in args.seeds:
            run = runs / task / f"seed{seed}" / args.method
            out = runs / "ensemble" / task / f"seed{seed}"
            started = time.perf_counter()
            member2 = train_member(run, out, seed, runs / "data" / task / "sft_val.jsonl")
            member_seconds = time.perf_counter() - started
            if args.members_only:
                continue
            row_path = out / f"row_k{args.penalty:g}.json"
            if row_path.is_file():
                rows.append(json.loads(row_path.read_text()))
                continue
            members = [run / "reward" / "model", member2]
            reward_config = run / "configs" / "reward.yaml"
            held_out = datamodule_records(reward_config)[1]
            max_length = yaml.safe_load(reward_config.read_text())["data"]["init_args"]["max_length"]
            scores = torch.stack([reward_pair_scores(str(m), held_out, max_length, 256) for m in members])  # (2, n, 2)
            accuracy = [pair_accuracy(s[:, 0], s[:, 1]).mean().item() for s in (*scores, scores.mean(0))]
            started = time.perf_counter()
            policy = run_ppo(run, out / f"k{args.penalty:g}", members, args.penalty)
            ppo_seconds = time.perf_counter() - started
            row = {
                "task": task, "seed": seed, "penalty": args.penalty,
                "acc_member1": accuracy[0], "acc_member2": accuracy[1], "acc_mean": accuracy[2],
                "ceiling": label_agreement(held_out, judge), "member_seconds": round(member_seconds, 1),
                # rho reads member 1, the run's own reward model, as in the single-model rows
                **suite.compare_with_sft(run, policy, task, seed, ppo_seconds),
            }
            suite.keep_row(row_path, row, rows)
    suite.print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
