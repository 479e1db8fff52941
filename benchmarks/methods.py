"""The methods beside PPO on the task suite: every method from the same SFT policy, against the
same reward model (or, with ``--reward oracle``, the same judge), on the same prompts.

For each task and seed the first method runs the whole pipeline of :mod:`suite` (tokenizer, SFT,
reward model, its PPO-stage method, the final comparison, best-of-16); every other method reuses
those tokenizer, SFT and reward folders (linked, not retrained) and runs only its own stage,
whose config is ``<recipe>/<method>.yaml`` (``configs/demo/ppo.yaml``, ``grpo.yaml``,
``rloo.yaml``, ``reinforce_pp.yaml``). The configs differ only in the estimator and what it needs
(samples per prompt, where the KL sits, no critic); every method sees 32 responses per
iteration for 90 iterations, so the label budget and the episodes are the same. It prints one
row per (task, method, seed) and the mean over seeds, and writes ``<out>/methods.json``.

    python benchmarks/methods.py --seeds 0 1                       # against the reward model
    python benchmarks/methods.py --reward oracle --seeds 0 1       # against the judge

DPO (``configs/demo/dpo.yaml``) runs SFT -> DPO on the reward stage's preference files (the same
labels the reward model learned from) and is compared with SFT as the others are (the PPO config's
prompts and generation settings); its row has no reward-model columns. The first method
must not be ``dpo`` (the reward model is trained with the first method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from rlhf_lightning.best_of_n import best_of_n_kl  # noqa: E402
from rlhf_lightning.tasks import get_task  # noqa: E402

ESTIMATORS = ("ppo", "grpo", "rloo", "reinforce_pp")  # PPOModule against the reward model, by estimator
METHODS = (*ESTIMATORS, "dpo")
SHARED_STAGES = ("tokenizer", "sft", "reward")


def link_shared_stages(source: Path, run: Path) -> None:
    """Point ``run``'s tokenizer, SFT and reward folders at ``source``'s (the pipeline then skips
    them as complete)."""
    run.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        target, link = (source / stage).resolve(), run / stage
        if target.exists() and not link.exists():
            link.symlink_to(target, target_is_directory=True)


def main(argv: list[str] | None = None) -> int:
    parser = suite.argument_parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.set_defaults(out="outputs/methods")
    args = parser.parse_args(argv)
    if args.methods[0] == "dpo":
        parser.error("--methods: put a reward-model method first (it trains the reward model the others share)")
    recipe = Path(args.recipe)
    rows = []
    for task in args.tasks:
        files = get_task(task, seed=0).write_files(Path(args.out) / "data" / task)
        for seed in args.seeds:
            first = Path(args.out) / task / f"seed{seed}" / args.methods[0]
            for method in args.methods:
                run = Path(args.out) / task / f"seed{seed}" / method
                method_args = args
                if run != first:  # the shared stages ran (or were redone) with the first method
                    link_shared_stages(first, run)
                    method_args = argparse.Namespace(**{**vars(args), "redo": [s for s in args.redo if s in ("ppo", "dpo")]})
                config = {"dpo_config" if method == "dpo" else "ppo_config": recipe / f"{method}.yaml"}
                row = suite.run_one(method_args, task, seed, files, run=run, best_of_n=run == first, **config)
                rows.append({"method": method, **row})
                print(suite.table(rows, group_by=("task", "method")), flush=True)
    print(f"\nbest-of-{suite.BEST_OF} KL to SFT: at most {best_of_n_kl(suite.BEST_OF):.2f} nats")
    Path(args.out, "methods.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
