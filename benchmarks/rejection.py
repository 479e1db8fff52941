"""Rejection-sampling fine-tuning (best-of-n distillation), alone and before PPO, on the task suite.

Starts from the runs of ``benchmarks/methods.py`` (or ``suite.py``): for each (task, seed) it
reuses that run's SFT policy, reward model and PPO config. It draws ``--n`` SFT samples for each
of ``--prompts`` training prompts, keeps the one the reward model scores highest
(:func:`rlhf_lightning.best_of_n.best_of_n`), and fine-tunes the SFT policy on those kept
responses with the run's own SFT config (starting from the SFT export, ``--steps`` steps at
``--lr``; "rejection sampling" in Llama 2, RAFT, ReST's improve step). PPO then runs the run's PPO
config from that policy (its reference is the policy it starts from). Both policies are compared
with SFT exactly as the pipeline does (the same prompts, sampling, judge and seed; KL is to SFT).
With ``--reward oracle`` the task's judge ranks the samples and is PPO's reward (no reward model:
does the method learn the task's content at all?); ``rho`` still reads the run's reward model.

    python benchmarks/rejection.py --runs outputs/methods-rm --seeds 0 1
    python benchmarks/rejection.py --runs outputs/methods-rm --seeds 0 1 --reward oracle   # the judge ranks and rewards

Finished steps (the kept samples, an export, a row) are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

from rlhf_lightning.best_of_n import best_of_n, best_of_n_kl, load_scorer, sample_candidates  # noqa: E402
from rlhf_lightning.models import is_complete_hf_folder  # noqa: E402
from rlhf_lightning.pipeline import datamodule_records  # noqa: E402
from rlhf_lightning.records import write_jsonl  # noqa: E402


def kept_samples(run: Path, out: Path, args: argparse.Namespace, task: str, seed: int) -> Path:
    """Best-of-n SFT samples on the first ``args.prompts`` training prompts, ranked by the reward
    model (or the judge), as SFT records."""
    path = out / "best.jsonl"
    if path.is_file():
        return path
    sft = str(run / "sft" / "model")
    prompts = [r["prompt"] for r in datamodule_records(run / "configs" / "ppo.yaml")[0][: args.prompts]]
    candidates = sample_candidates(sft, prompts, args.n, suite.generation_of(run / "configs" / "ppo.yaml"), seed)
    reward_model, judge = (None, suite.judge_path(task)) if args.reward == "oracle" else (str(run / "reward" / "model"), None)
    best, _ = best_of_n(candidates, args.n, load_scorer(sft, reward_model, judge))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [{"prompt": p, "completion": c} for p, c in zip(prompts, best)])
    return path


def fine_tune(run: Path, out: Path, kept: Path, args: argparse.Namespace) -> Path:
    """The run's SFT config, from the SFT export, on the kept samples."""
    export = out / "rsft" / "model"
    if is_complete_hf_folder(export):
        return export
    config = suite.replace_strings(yaml.safe_load((run / "configs" / "sft.yaml").read_text()), str(run / "sft"), str(out / "rsft"))
    config["trainer"].update(max_steps=args.steps, val_check_interval=args.steps)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), name="rsft")
    init = config["model"]["init_args"]
    init.update(model_name_or_path=str(run / "sft" / "model"), tokenizer_name_or_path=None, learning_rate=args.lr,
                warmup_steps=min(init.get("warmup_steps", 0), args.steps // 10))
    config["data"]["init_args"]["train_file"] = str(kept)
    suite.fit(config, out / "configs" / "rsft.yaml")
    return export


def ppo_from(run: Path, out: Path, policy: Path, task: str, oracle: bool) -> Path:
    export = out / "ppo" / "policy"
    if is_complete_hf_folder(export):
        return export
    config = suite.replace_strings(yaml.safe_load((run / "configs" / "ppo.yaml").read_text()), str(run), str(out))
    init = config["model"]["init_args"]
    init["policy"] = str(policy)
    if oracle:
        init.pop("reward_model", None)
        init["reward_fn"] = suite.judge_path(task)
    else:
        init["reward_model"] = str(run / "reward" / "model")
    suite.fit(config, out / "configs" / "ppo.yaml")
    return export


def main(argv: list[str] | None = None) -> int:
    parser = suite.runs_argument_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=1024, help="training prompts to sample (default 1024)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default 100)")
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (default 5e-4)")
    parser.add_argument("--reward", choices=("model", "oracle"), default="model",
                        help="rank the samples and reward PPO by the run's reward model, or by the task's judge")
    parser.add_argument("--no-ppo", action="store_true", help="the fine-tuned policy only")
    args = parser.parse_args(argv)
    name = f"n{args.n}-p{args.prompts}-s{args.steps}-lr{args.lr:g}" + ("-oracle" if args.reward == "oracle" else "") + ("-no-ppo" if args.no_ppo else "")
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            run = Path(args.runs) / task / f"seed{seed}" / args.method
            out = Path(args.runs) / "rejection" / name / task / f"seed{seed}"
            row_path = out / "rows.json"
            if row_path.is_file():
                rows.extend(json.loads(row_path.read_text()))
                continue
            started = time.perf_counter()
            rsft = fine_tune(run, out, kept_samples(run, out, args, task, seed), args)
            found = [{"task": task, "seed": seed, "policy": "rsft", **suite.compare_with_sft(run, rsft, task, seed, time.perf_counter() - started)}]
            if not args.no_ppo:
                started = time.perf_counter()
                found.append({"task": task, "seed": seed, "policy": "rsft+ppo",
                              **suite.compare_with_sft(run, ppo_from(run, out, rsft, task, args.reward == "oracle"), task, seed, time.perf_counter() - started)})
            row_path.write_text(json.dumps(found, indent=2) + "\n")
            rows.extend(found)
            for row in found:
                print(json.dumps(row), flush=True)
    print(f"\nbest-of-{args.n} KL to SFT: at most {best_of_n_kl(args.n):.2f} nats")
    suite.print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
