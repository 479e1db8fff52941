"""An over-optimisation stop on the task suite: PPO with :class:`rlhf_lightning.guards.JudgeAgreementStop`.

Starts from the runs of ``benchmarks/methods.py`` (or ``suite.py``): for each (task, seed) it runs
that run's PPO config again, from the same SFT policy against the same reward model, with the
callback added (``--ratio``, ``--patience``): PPO stops at the first validation (every 10
iterations in the demo config) where the reward model's Spearman correlation with the judge on
the policy's samples falls below ``ratio`` times its value on the SFT policy's samples. The policy
is compared with SFT exactly as the pipeline does; ``iterations`` says where it stopped (90: it
never fired, and the run is the plain PPO run again). The judge's verdicts on the validation
prompts decide the stop, and the comparison samples the same prompts anew: a user's judge is
then a held-out labelled set or a stronger model, scored as the task's judge is here.

    python benchmarks/early_stop.py --runs outputs/methods-rm --seeds 0 1 --ratio 0.5
    python benchmarks/early_stop.py --runs outputs/methods-rm --seeds 0 1 --plain   # the same runs without it

Finished runs (an export, a row) are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from rlhf_lightning.models import is_complete_hf_folder  # noqa: E402
from rlhf_lightning.report import read_scalars  # noqa: E402


def ppo_with_stop(run: Path, out: Path, ratio: float | None, patience: int) -> tuple[Path, float | None]:
    """The run's PPO config, with the stop (none when ``ratio`` is None), logging and exporting under ``out``:
    the export, and the fit's seconds (None: an earlier run's export, not timed)."""
    export = out / "ppo" / "policy"
    if is_complete_hf_folder(export):
        return export, None
    started = time.perf_counter()
    for stale in (out / "ppo").glob("events.out.tfevents*"):
        stale.unlink()  # an interrupted fit's log: the iterations counted are this fit's
    config = suite.replace_strings(yaml.safe_load((run / "configs" / "ppo.yaml").read_text()), str(run), str(out))
    config["model"]["init_args"].update(policy=str(run / "sft" / "model"), reward_model=str(run / "reward" / "model"))
    if ratio is not None:
        config["trainer"]["callbacks"].append({"class_path": "rlhf_lightning.guards.JudgeAgreementStop",
                                               "init_args": {"ratio": ratio, "patience": patience}})
    suite.fit(config, out / "configs" / "ppo.yaml")
    return export, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = suite.runs_argument_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--plain", action="store_true",
                        help="the same PPO run without the stop, with today's code (the methods runs may be older)")
    args = parser.parse_args(argv)
    ratio = None if args.plain else args.ratio
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            run = Path(args.runs) / task / f"seed{seed}" / args.method
            name = "plain" if args.plain else f"ratio{args.ratio:g}-patience{args.patience}"
            out = Path(args.runs) / "early-stop" / name / task / f"seed{seed}"
            row_path = out / "row.json"
            if row_path.is_file():
                rows.append(json.loads(row_path.read_text()))
                continue
            policy, seconds = ppo_with_stop(run, out, ratio, args.patience)
            iterations = len(read_scalars(out)["ppo"]["objective/kl"])
            row = {"task": task, "seed": seed, "ratio": ratio, "iterations": iterations,
                   **suite.compare_with_sft(run, policy, task, seed, seconds)}
            suite.keep_row(row_path, row, rows)
    suite.print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
