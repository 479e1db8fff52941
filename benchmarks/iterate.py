"""The online loop against the one-pass pipeline on the task suite, at an equal label budget.

For each task and seed the stage configs are the suite's (:func:`suite.write_configs`: one recipe,
only data paths, output folders, seed and judge changed). ``rlhf-lightning iterate`` then runs
on them: round 0 on the first ``--offline_pairs`` offline pairs, then ``--rounds`` rounds of
``--labels_per_round`` on-policy pairs labelled by the task's own noisy rater (the one that
labelled the offline pairs), ``--ppo_iterations`` PPO iterations in every round. With the
defaults that is 6500 + 3 x 500 = 8000 labels, the one-pass recipe's, and 4 x 45 = 180 PPO
iterations, twice its 90 (the demo loop's ``ppo_iterations``). ``--baseline`` also runs the one-pass pipeline beside it
(sharing the tokenizer and SFT folders, which are the same). It prints one row per round of
each run and the final rows, and writes ``<out>/iterate.json``.

    python benchmarks/iterate.py --seeds 0 1 --baseline
    python benchmarks/iterate.py --tasks menu --seeds 0 --reward_refresh retrain
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from methods import link_shared_stages  # noqa: E402

from rlhf_lightning.cli import main as cli_main  # noqa: E402
from rlhf_lightning.iterate import CRITIC, LR_SCHEDULE, REFERENCE, REFRESH  # noqa: E402
from rlhf_lightning.tasks import get_task  # noqa: E402

SETTINGS = ("rounds", "offline_pairs", "labels_per_round", "refresh_steps", "ppo_iterations", "reward_refresh", "k",
            "reference", "critic", "lr_schedule", "on_policy_weight")
COLUMNS = ("labels_total", "fresh_accuracy", "fresh_ceiling", "rm_val_accuracy", "rho_policy", "gold", "gold_sft", "win", "validity",
           "kl", "seconds")


def run_loop(args: Any, task: str, seed: int, files: dict[str, Path]) -> list[dict[str, Any]]:
    """``rlhf-lightning iterate`` on the suite's configs for (task, seed); its per-round rows."""
    run = Path(args.out) / task / f"seed{seed}"
    pipeline = yaml.safe_load(suite.write_configs(Path(args.recipe), run, files, task, seed, False, args.set,
                                                  args.redo).read_text())
    config = {key: pipeline[key] for key in ("sft", "reward", "ppo", "judge", "seed", "eval_prompts")}
    config.update(run_dir=str(run / "loop"), rater=f"rlhf_lightning.tasks.{task}.rater",
                  **{key: getattr(args, key) for key in SETTINGS})
    path = run / "configs" / "iterate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if cli_main(["iterate", "--config", str(path)]) != 0:
        raise SystemExit(f"iterate failed for {task} seed {seed}")
    return json.loads((run / "loop" / "rounds.json").read_text())


def run_baseline(args: Any, task: str, seed: int, files: dict[str, Path]) -> dict[str, Any]:
    """The one-pass pipeline on every offline pair, sharing the loop's tokenizer and SFT model."""
    loop = Path(args.out) / task / f"seed{seed}"
    run = loop.parent / f"seed{seed}-one-pass"
    link_shared_stages(loop, run)  # the tokenizer folder; the SFT model is linked below
    (run / "sft").mkdir(exist_ok=True)
    if not (run / "sft" / "model").exists():
        (run / "sft" / "model").symlink_to((loop / "loop" / "round_0" / "sft" / "model").resolve(), target_is_directory=True)
    started = time.perf_counter()
    row = suite.run_one(args, task, seed, files, run=run, best_of_n=False)
    return {"labels_total": 8000, "fresh_accuracy": None, "fresh_ceiling": None, "rm_val_accuracy": row["rm_acc"], "rho_policy": row["rho_ppo"],
            "gold": row["gold_ppo"], "gold_sft": row["gold_sft"], "win": row["win"], "validity": row["valid_ppo"],
            "kl": row["kl"], "seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    labels = ("task", "seed", "arm")
    lines = ["| " + " | ".join((*labels, *COLUMNS)) + " |", "|---" * (len(labels) + len(COLUMNS)) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key in (*labels, *COLUMNS)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = suite.argument_parser(__doc__)
    parser.set_defaults(out="outputs/iterate-suite", best_of_n_prompts=0)
    demo = yaml.safe_load((suite.ROOT / "configs" / "demo" / "iterate.yaml").read_text())  # every default: the demo loop's
    for key in ("rounds", "offline_pairs", "labels_per_round", "refresh_steps", "ppo_iterations", "on_policy_weight", "k"):
        parser.add_argument(f"--{key}", type=int, default=demo[key])
    for key, choices in (("reward_refresh", REFRESH), ("reference", REFERENCE), ("critic", CRITIC), ("lr_schedule", LR_SCHEDULE)):
        parser.add_argument(f"--{key}", choices=choices, default=demo[key])
    parser.add_argument("--baseline", action="store_true", help="also run the one-pass pipeline on all 8000 pairs")
    args = parser.parse_args(argv)
    rows = []
    for task in args.tasks:
        files = get_task(task, seed=0).write_files(Path(args.out) / "data" / task)
        for seed in args.seeds:
            rounds = run_loop(args, task, seed, files)
            loop_seconds = sum(r["seconds"] or 0.0 for r in rounds)
            rows += [{"task": task, "seed": seed, "arm": f"round {r['round']}", **r} for r in rounds[:-1]]
            rows.append({"task": task, "seed": seed, "arm": f"iterate (round {rounds[-1]['round']})",
                         **rounds[-1], "seconds": round(loop_seconds, 1)})
            if args.baseline:
                rows.append({"task": task, "seed": seed, "arm": "one-pass", **run_baseline(args, task, seed, files)})
            print(table(rows), flush=True)
            Path(args.out, "iterate.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
