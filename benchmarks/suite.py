"""The task suite: one recipe, every built-in task, several seeds.

For each task the script writes the task's six JSONL files once (task seed 0), then for each
seed derives the stage configs from one recipe (default: ``configs/demo/``) by changing only:
the data paths (the task's files, and ``task`` to match), the output folders (``outputs/demo`` ->
this run's folder), ``seed_everything`` (the seed) and the judge (the task's own, for evaluation
only). It runs
``rlhf-lightning pipeline`` on them and then, on the SFT policy, best-of-16 sampling ranked by
the judge and by the reward model, the reference points of PPO. It prints one row per run and
the mean over seeds per task, and writes everything to ``<out>/suite.json``.

``--reward oracle`` gives PPO the task's judge as its reward (no reward model): does the
optimiser learn the task's content at all?

    python benchmarks/suite.py --seeds 0 1                      # the demo recipe, every task
    python benchmarks/suite.py --reward oracle --tasks lists    # PPO against the exact judge
    python benchmarks/suite.py --set ppo:model.init_args.kl.coef=0.1 --out outputs/suite-kl01

A finished stage is skipped when its folder is complete (the pipeline's rule), so an
interrupted suite continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf_lightning.best_of_n import best_of_n_kl, sample_candidates, score_candidates
from rlhf_lightning.cli import main as cli_main
from rlhf_lightning.models import load_sequence_scorer, load_tokenizer
from rlhf_lightning.reward_sources import CallableScorer, RewardModelScorer
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.tasks import BUILTIN_TASKS, get_task, import_object

ROOT = Path(__file__).resolve().parents[1]
DATA = {"sft": ("sft_train", "sft_val"), "reward": ("prefs_train", "prefs_val"), "ppo": ("prompts_train", "prompts_val"),
        "dpo": ("prefs_train", "prefs_val")}
BEST_OF = 16


def replace_strings(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string, at any depth."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [replace_strings(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: replace_strings(v, old, new) for k, v in value.items()}
    return value


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def write_configs(recipe: Path, run: Path, files: dict[str, Path], task: str, seed: int, oracle: bool,
                  overrides: list[str], redo: list[str], ppo_config: Path | None = None, dpo_config: Path | None = None) -> Path:
    """The recipe's stage configs for one (task, seed) run; returns the pipeline config.
    ``ppo_config`` replaces the recipe's ``ppo.yaml`` (another method's config); ``dpo_config``
    makes the run SFT -> DPO on the reward stage's preference files."""
    judge = f"rlhf_lightning.tasks.{task}.judge"
    paths = {}
    for stage, (train, val) in DATA.items():
        if stage == "dpo" and dpo_config is None:
            continue
        source = {"ppo": ppo_config, "dpo": dpo_config}.get(stage) or recipe / f"{stage}.yaml"
        config = replace_strings(yaml.safe_load(source.read_text()), "outputs/demo", str(run))
        config["seed_everything"] = seed
        config["data"]["init_args"].update(train_file=str(files[train]), val_file=str(files[val]), task=task)
        if stage in ("reward", "ppo"):
            config["model"]["init_args"]["judge"] = judge
        if oracle and stage == "ppo":
            config["model"]["init_args"].pop("reward_model", None)
            config["model"]["init_args"]["reward_fn"] = judge
        for override in overrides:
            target, _, assignment = override.partition(":")
            key, _, value = assignment.partition("=")
            if target == stage:
                set_key(config, key, yaml.safe_load(value))
        paths[stage] = run / "configs" / f"{stage}.yaml"
        paths[stage].parent.mkdir(parents=True, exist_ok=True)
        paths[stage].write_text(yaml.safe_dump(config, sort_keys=False))
    pipeline = replace_strings(yaml.safe_load((recipe / "pipeline.yaml").read_text()), "outputs/demo", str(run))
    pipeline.update(sft=str(paths["sft"]), reward=str(paths["reward"]), ppo=str(paths["ppo"]), dpo=paths.get("dpo"),
                    judge=judge, seed=seed, redo=redo)
    pipeline["dpo"] = None if pipeline["dpo"] is None else str(pipeline["dpo"])
    path = run / "configs" / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def best_of_n_reference(run: Path, task: str, prompts: list[str], generation: GenerationSettings, seed: int,
                        with_reward_model: bool) -> dict[str, float]:
    """Best-of-16 SFT samples, ranked by the judge and by the reward model: mean judge score."""
    judge = import_object(f"rlhf_lightning.tasks.{task}.judge")
    sft = str(run / "sft" / "model")
    candidates = sample_candidates(sft, prompts, BEST_OF, generation, seed)
    gold = score_candidates(candidates, BEST_OF, CallableScorer(judge))  # (prompts, 16)
    result = {"bo16_judge_gold": gold.max(dim=1).values.mean().item()}
    if with_reward_model:
        reward_dir = str(run / "reward" / "model")
        tokenizer = load_tokenizer(reward_dir)
        scorer = RewardModelScorer(load_sequence_scorer(reward_dir, tokenizer).eval(), tokenizer, load_tokenizer(sft))
        rm_scores = score_candidates(candidates, BEST_OF, scorer)
        result["bo16_rm_gold"] = gold.gather(1, rm_scores.argmax(1, keepdim=True)).mean().item()
    return result


def comparison_columns(c: dict[str, Any]) -> dict[str, Any]:
    """The table's columns of a policy comparison (``PolicyComparison.to_dict()``, or a summary's
    ``comparison``): the policy against SFT."""
    return {"win": c["gold_win_rate"], "gold_sft": c["baseline_gold_score"], "gold_ppo": c["gold_score"],
            "valid_sft": c["baseline_validity"], "valid_ppo": c["validity"], "kl": c["kl"],
            "rho_sft": c["baseline_reward_gold_spearman"], "rho_ppo": c["reward_gold_spearman"],
            "len_sft": c["baseline_response_length"], "len_ppo": c["response_length"]}


def judge_path(task: str) -> str:
    """The import path of a built-in task's judge."""
    return f"rlhf_lightning.tasks.{task}.judge"


def generation_of(ppo_config: Path) -> GenerationSettings:
    """The sampling settings of a PPO stage config."""
    return GenerationSettings(**(yaml.safe_load(ppo_config.read_text())["model"]["init_args"].get("generation") or {}))


def compare_with_sft(run: Path, policy: Path, task: str, seed: int, seconds: float | None) -> dict[str, Any]:
    """The pipeline's comparison of ``policy`` with ``run``'s SFT policy (its PPO config's
    validation prompts and sampling, the task's judge, ``run``'s reward model for ``rho``): the
    table's columns, and ``seconds``."""
    from rlhf_lightning.evaluation import compare_policies
    from rlhf_lightning.pipeline import datamodule_records

    ppo_config = run / "configs" / "ppo.yaml"
    comparison, _ = compare_policies(str(policy), str(run / "sft" / "model"), datamodule_records(ppo_config)[1],
                                     reward_model_dir=str(run / "reward" / "model"), generation=generation_of(ppo_config),
                                     judge=import_object(judge_path(task)), seed=seed)
    return {**comparison_columns(comparison.to_dict()), "seconds": None if seconds is None else round(seconds, 1)}


def run_one(args: argparse.Namespace, task: str, seed: int, files: dict[str, Path], run: Path | None = None,
            ppo_config: Path | None = None, best_of_n: bool = True, dpo_config: Path | None = None) -> dict[str, Any]:
    """One pipeline run (default folder ``<out>/<task>/seed<seed>``) and its row of the table."""
    run = run or Path(args.out) / task / f"seed{seed}"
    pipeline = write_configs(Path(args.recipe), run, files, task, seed, args.reward == "oracle", args.set, args.redo,
                             ppo_config, dpo_config)
    started = time.perf_counter()
    if cli_main(["pipeline", "--config", str(pipeline)]) != 0:
        raise SystemExit(f"pipeline failed for {task} seed {seed}")
    seconds = time.perf_counter() - started
    summary = json.loads((run / "summary.json").read_text())
    reward = summary["reward"]
    row = {
        "task": task, "seed": seed,
        "rm_acc": reward.get("val/accuracy"), "ceiling": reward.get("label_ceiling"),
        **comparison_columns(summary["comparison"]),
        "stage_seconds": summary["stage_seconds"], "seconds": round(seconds, 1),
    }
    if row["rm_acc"] is not None and row["ceiling"] is not None:
        row["gap"] = 100 * (row["ceiling"] - row["rm_acc"])
    if best_of_n and args.best_of_n_prompts:
        generation = generation_of(run / "configs" / "ppo.yaml")
        prompts = [r["prompt"] for r in get_task(task).prompt_records(args.best_of_n_prompts, "val")]
        row.update(best_of_n_reference(run, task, prompts, generation, seed, args.reward != "oracle"))
    (run / "suite_row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


COLUMNS = ("rm_acc", "ceiling", "gap", "win", "gold_sft", "gold_ppo", "bo16_judge_gold", "bo16_rm_gold",
           "valid_sft", "valid_ppo", "kl", "rho_sft", "rho_ppo", "len_sft", "len_ppo", "seconds")


def table(rows: list[dict[str, Any]], group_by: tuple[str, ...] = ("task",)) -> str:
    """One line per row, then the mean over seeds of each ``group_by`` group."""
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    labels = (*group_by, "seed")
    lines = ["| " + " | ".join((*labels, *COLUMNS)) + " |", "|---" * (len(COLUMNS) + len(labels)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k in (*labels, *COLUMNS)) + " |")
    for group in dict.fromkeys(tuple(r[k] for k in group_by) for r in rows):
        mine = [r for r in rows if tuple(r[k] for k in group_by) == group]
        means = []
        for key in COLUMNS:
            values = [r[key] for r in mine if r.get(key) is not None]
            means.append(fmt(statistics.mean(values)) if values else "-")
        names = " | ".join(f"**{name}**" for name in group)
        lines.append(f"| {names} | mean of {len(mine)} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def argument_parser(description: str | None) -> argparse.ArgumentParser:
    """The suite's options (``benchmarks/methods.py`` adds its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--reward", choices=("model", "oracle"), default="model",
                        help="PPO's reward: the reward stage's model, or the task's judge (oracle)")
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "demo"), help="folder of sft/reward/ppo/pipeline.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="override one key of one stage's config, e.g. reward:model.init_args.learning_rate=0.001")
    parser.add_argument("--redo", nargs="*", default=[], choices=("tokenizer", "sft", "reward", "ppo"),
                        help="stages to rerun although their folder is complete (e.g. after changing --set)")
    parser.add_argument("--best_of_n_prompts", type=int, default=100,
                        help=f"validation prompts for the best-of-{BEST_OF} reference (0: skip it)")
    parser.add_argument("--out", default="outputs/suite")
    return parser


def fit(config: dict[str, Any], path: Path, *extra: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if cli_main(["fit", "--config", str(path), "--model.init_args.overwrite_export=true", *extra]) != 0:
        raise SystemExit(f"fit failed: {path}")


def runs_argument_parser(description: str | None) -> argparse.ArgumentParser:
    """The options of a script that starts from finished methods.py / suite.py runs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="outputs/methods-rm", help="the methods.py / suite.py output folder")
    parser.add_argument("--method", default="ppo", help="the method sub-run whose SFT, reward and PPO config are reused")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    return parser


def keep_row(path: Path, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``row`` to ``path`` (a rerun skips its run), add it to ``rows`` and print it."""
    path.write_text(json.dumps(row, indent=2) + "\n")
    rows.append(row)
    print(json.dumps(row), flush=True)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """One line of ``key=value`` per row."""
    for row in rows:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def main(argv: list[str] | None = None) -> int:
    args = argument_parser(__doc__).parse_args(argv)
    rows = []
    for task in args.tasks:
        files = get_task(task, seed=0).write_files(Path(args.out) / "data" / task)
        for seed in args.seeds:
            rows.append(run_one(args, task, seed, files))
            print(table(rows), flush=True)
    print(f"\nbest-of-{BEST_OF} KL to SFT: at most {best_of_n_kl(BEST_OF):.2f} nats")
    Path(args.out, "suite.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
