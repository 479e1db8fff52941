"""SFT -> reward model -> PPO (or SFT -> DPO) in one command, with a report.

Each stage is an ordinary ``rlhf-lightning fit`` run of its own YAML config. The pipeline
first trains the tokenizer that the SFT config names in ``tokenizer_name_or_path`` (on the SFT
training data) when that folder does not exist yet. Then it only chains the stages (the
reward stage starts from the SFT export, PPO from both), skips a stage whose export folder is
already complete (unless ``redo`` names it), and at the end compares the final policy (PPO's,
or DPO's with a ``dpo`` config) with the SFT policy on held-out prompts and writes ``summary.json``, ``report.md`` and plots into
``run_dir``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from .errors import UserInputError
from .models import has_tokenizer_files, is_complete_hf_folder
from .report import read_scalars, write_report
from .generation import GenerationSettings
from .tokenizer_training import DEFAULT_VOCAB_SIZE, train_tokenizer_folder

STAGES = ("sft", "reward", "ppo", "dpo")
T = TypeVar("T")
TOKENIZER = "tokenizer"


@dataclass
class PipelineConfig:
    """The pipeline: the stage configs, where the run lives, and the final evaluation.

    Args:
        run_dir: the run folder (TensorBoard sub-runs of the stages, report, summary.json).
        sft: the SFT stage config (a YAML file as given to ``rlhf-lightning fit``).
        reward: the reward-model stage config.
        ppo: the PPO stage config (any estimator: ``ppo.advantage_estimator``).
        dpo: a DPO stage config (a ``DPOModule`` on its own preference data): given, the policy
            is trained by DPO from the SFT export (SFT -> DPO) and the reward and PPO stages do
            not run. The final comparison then uses the PPO config's validation prompts and
            ``generation`` when that file exists, so that DPO and PPO policies are compared alike.
        redo: stages to run again even when their output folder is complete (``tokenizer``
            too, which reruns every stage).
        eval_prompts: held-out prompts for the final comparison: a ``{"prompt"}`` or chat
            ``{"messages"}`` JSONL file, or null for the validation prompts of the PPO config's
            data module.
        judge: import path of a gold judge ``(prompts, completions) -> scores`` (e.g.
            ``rlhf_lightning.tasks.sentiment.judge``, or your own), or null for none. It judges
            the final comparison (win rate, gold score, validity, Spearman with the reward
            model), gives the noise ceiling of the reward stage's validation pairs, and is
            passed to the reward and PPO stages whose configs name no judge of their own.
        seed: sampling seed of the final comparison.
        tokenizer_vocab_size: upper bound on the vocabulary of the tokenizer trained for the
            SFT config's ``tokenizer_name_or_path`` (see :mod:`rlhf_lightning.tokenizer_training`).
    """

    run_dir: str = "outputs/demo"
    sft: str = "configs/demo/sft.yaml"
    reward: str = "configs/demo/reward.yaml"
    ppo: str = "configs/demo/ppo.yaml"
    dpo: str | None = None
    redo: list[str] = field(default_factory=list)
    eval_prompts: str | None = None
    judge: str | None = None
    seed: int = 0
    tokenizer_vocab_size: int = DEFAULT_VOCAB_SIZE


def stage_init_args(config_path: str | Path, section: str = "model") -> dict[str, Any]:
    """The ``init_args`` of a stage config's ``model`` (or ``data``) section, read only."""
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    return (config.get(section) or {}).get("init_args") or {}


def sft_data_file(sft_config: str | Path) -> str | None:
    """The SFT config's own data file that the reward model normalises on: its ``val_file``,
    else its ``train_file`` (None when it reads a task)."""
    data = stage_init_args(sft_config, "data")
    return data.get("val_file") or data.get("train_file")


def stage_judge(judge: str | None, stage_args: dict[str, Any]) -> str | None:
    """The pipeline's judge for a stage whose config names none (one that names a judge, or
    ``judge: null``, keeps its own)."""
    return judge if judge and "judge" not in stage_args else None


def prepare_tokenizer(config: PipelineConfig) -> bool:
    """Train the SFT config's ``tokenizer_name_or_path`` on its training data when the folder
    is missing or ``redo`` names the tokenizer; True when it was (re)trained."""
    folder = stage_init_args(config.sft).get("tokenizer_name_or_path")
    if not folder:
        return False
    if TOKENIZER not in config.redo and has_tokenizer_files(folder):
        print(f"[pipeline] tokenizer: {folder} exists, skipping (redo with --redo '[tokenizer]')")
        return False
    print(f"[pipeline] tokenizer: training a BPE tokenizer (vocab <= {config.tokenizer_vocab_size}) into {folder}")
    train_tokenizer_folder(folder, stage_init_args(config.sft, "data"), config.tokenizer_vocab_size)
    return True


def pipeline_stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages to run: SFT, reward model and PPO; SFT and DPO with a ``dpo`` config; or SFT
    and PPO when the PPO config scores with its own ``reward_fn`` (a rule, or a judge as an
    oracle reward) or ``implicit_reward`` (an earlier DPO run's export) and needs no reward model."""
    if config.dpo:
        return ("sft", "dpo")
    own_reward = any(stage_init_args(config.ppo).get(key) for key in ("reward_fn", "implicit_reward"))
    return ("sft", "ppo") if own_reward else ("sft", "reward", "ppo")


def policy_stage(outputs: dict[str, str]) -> str:
    """The stage whose export is the final policy: ``dpo`` or ``ppo``."""
    return "dpo" if "dpo" in outputs else "ppo"


def stage_outputs(config: PipelineConfig) -> dict[str, str]:
    """The export folders the stage configs write (what later stages read)."""
    outputs = {}
    stages = {"sft": (config.sft, "export_dir"), "reward": (config.reward, "export_dir"),
              "ppo": (config.ppo, "policy_export_dir"), "dpo": (config.dpo, "export_dir")}
    for stage in pipeline_stages(config):
        path, key = stages[stage]
        outputs[stage] = stage_init_args(path).get(key)
        if not outputs[stage]:
            raise UserInputError(f"{path}: model.init_args.{key} must name the stage's output folder")
    return outputs


# The pipeline runs a stage only when it means to replace the stage's output (``redo``, an
# incomplete folder, or a changed earlier stage), so it lifts the stages' refusal to do so.
OVERWRITE = "--model.init_args.overwrite_export=true"


def stage_commands(config: PipelineConfig, outputs: dict[str, str]) -> dict[str, list[str]]:
    """``fit`` arguments of each stage of ``outputs``, wired to the previous stages' exports (and
    to the pipeline's judge, and to the user's SFT data for the reward model's normalisation)."""
    reward_args = stage_init_args(config.reward) if "reward" in outputs else {}
    ppo_args = stage_init_args(config.ppo) if "ppo" in outputs else {}

    def judge(stage_args: dict[str, Any]) -> list[str]:
        found = stage_judge(config.judge, stage_args)
        return [f"--model.init_args.judge={found}"] if found else []

    # Reward normalisation (mean reward of SFT demonstrations = 0) on the user's own SFT data.
    sft_file = sft_data_file(config.sft)
    normalize = [f"--model.init_args.normalize_file={sft_file}"] if sft_file and not reward_args.get("normalize_file") else []
    commands = {
        "sft": ["fit", "--config", config.sft, OVERWRITE],
        "reward": ["fit", "--config", config.reward, OVERWRITE, f"--model.init_args.model_name_or_path={outputs['sft']}",
                   *judge(reward_args), *normalize],
        "ppo": [
            "fit", "--config", config.ppo, OVERWRITE,
            f"--model.init_args.policy={outputs['sft']}",
            # a PPO config with a reward_fn or implicit_reward keeps it; otherwise it scores with the reward stage
            *([f"--model.init_args.reward_model={outputs['reward']}"] if "reward" in outputs else []),
            *judge(ppo_args),
        ],
        # the reference stays the policy's starting point (the SFT export) unless the config names one
        "dpo": ["fit", "--config", str(config.dpo), OVERWRITE, f"--model.init_args.model_name_or_path={outputs['sft']}"],
    }
    return {stage: command for stage, command in commands.items() if stage in outputs}


def run_pipeline(config: PipelineConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or skip) each stage, then evaluate and write the report; returns the summary (with
    ``extra``'s keys added)."""
    unknown = set(config.redo) - {TOKENIZER, *STAGES}
    if unknown:
        raise ValueError(f"redo: unknown stage(s) {sorted(unknown)}; choose from {(TOKENIZER, *STAGES)}")
    load_judge(config.judge)  # a wrong import path fails now, not after the stages
    outputs = stage_outputs(config)
    commands = stage_commands(config, outputs)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    timings = run_stages(config, outputs, commands, rerun=prepare_tokenizer(config))
    return finish(config, outputs, timings, extra)


def run_stages(config: PipelineConfig, outputs: dict[str, str], commands: dict[str, list[str]],
               rerun: bool = False) -> dict[str, float | None]:
    """Run each stage of ``outputs`` (in order) with its ``fit`` arguments, unless its output
    folder is complete and nothing before it ran (``rerun``) or ``redo`` names it; returns the
    seconds each stage took (None: skipped)."""
    from .lightning_cli import RLHFCLI

    timings: dict[str, float | None] = {}
    # once a stage runs, every later stage runs too: its inputs changed
    for stage in outputs:
        rerun = rerun or stage in config.redo or not is_complete_hf_folder(outputs[stage])
        if not rerun:
            print(f"[pipeline] {stage}: {outputs[stage]} is complete, skipping (redo with --redo '[{stage}]')")
            timings[stage] = None
            continue
        print(f"[pipeline] {stage}: rlhf-lightning {' '.join(commands[stage])}")
        for stale in (Path(config.run_dir) / stage).glob("events.out.tfevents*"):
            stale.unlink()  # the stage's TensorBoard sub-run shows this run only
        started = time.perf_counter()
        RLHFCLI(args=commands[stage])
        timings[stage] = round(time.perf_counter() - started, 1)
        if not is_complete_hf_folder(outputs[stage]):
            raise RuntimeError(f"stage {stage} finished without writing {outputs[stage]}")
    return timings


def finish(config: PipelineConfig, outputs: dict[str, str], timings: dict[str, float | None],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the PPO policy against the SFT policy, then write ``summary.json`` (atomically,
    last: it marks a finished run) and ``report.md`` into ``run_dir`` and print the table. The
    evaluation's seconds join ``timings`` (the stages' seconds) as ``evaluate``; ``outputs`` (the
    stages' export folders) are kept in the summary."""
    started = time.perf_counter()
    summary = evaluate(config, outputs)
    summary.update(stage_seconds={**timings, "evaluate": round(time.perf_counter() - started, 1)}, outputs=outputs,
                   **(extra or {}))
    run_dir = Path(config.run_dir)
    write_report(run_dir, summary, read_scalars(run_dir))
    write_json(run_dir / "summary.json", summary)
    print_table(summary)
    return summary


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically (temporary file, then rename)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)


def load_judge(path: str | None) -> Any:
    """The judge at import path ``path`` (None: no judge); a one-line error names the key."""
    from .tasks import load_callable

    return None if path is None else load_callable(path, "pipeline: judge")


def stage_datamodule(config_path: str | Path) -> Any:
    """The data module of a stage config, built from its ``data`` section."""
    from .tasks import import_object

    data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")).get("data") or {}
    return import_object(data["class_path"])(**(data.get("init_args") or {}))


def datamodule_records(config_path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and validation records of a stage config's data module (its files, split or task)."""
    return stage_datamodule(config_path).load_records()


def final_comparison(config: PipelineConfig, outputs: dict[str, str], judge: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Compare the final policy (PPO's or DPO's) with the SFT policy on held-out prompts (the
    ``eval_prompts``, else the validation prompts of the policy stage's data), sampled with
    ``config.seed``: the :class:`~rlhf_lightning.evaluation.PolicyComparison` and the per-prompt rows."""
    from .records import read_prompts
    from .evaluation import compare_policies

    stage = policy_stage(outputs)
    # DPO's policy is compared as PPO's would be: on the PPO config's prompts and sampling settings
    # when that file exists, else on its own pairs' prompts with default sampling
    has_ppo = stage == "ppo" or Path(config.ppo).is_file()
    prompts_from = config.ppo if has_ppo else config.dpo
    prompts = read_prompts(config.eval_prompts) if config.eval_prompts else datamodule_records(prompts_from)[1]
    if prompts_from == config.dpo:  # preference pairs repeat their prompts: each once
        prompts = list({json.dumps(r.get("messages", r.get("prompt"))): r for r in prompts}.values())
    if not prompts:
        raise UserInputError(f"{prompts_from}: no validation prompts for the final comparison; hint: set eval_prompts")
    sampling = stage_init_args(config.ppo).get("generation") if has_ppo else None
    return compare_policies(
        outputs[stage], outputs["sft"], prompts, reward_model_dir=outputs.get("reward"),
        generation=GenerationSettings(**(sampling or {})), judge=judge, seed=config.seed,
    )


def evaluate(config: PipelineConfig, outputs: dict[str, str]) -> dict[str, Any]:
    """The run's summary: the :func:`final_comparison`, the stages' last logged values and the
    reward labels' ceiling by the judge."""
    from .tasks import label_agreement

    judge = load_judge(config.judge)
    stage = policy_stage(outputs)
    comparison, rows = final_comparison(config, outputs, judge)
    scalars = read_scalars(Path(config.run_dir))
    final = {stage: {tag: values[-1][1] for tag, values in tags.items()} for stage, tags in scalars.items()}
    # (no reward stage: an old reward sub-run left in run_dir is not this run's)
    reward = {k: v for k, v in final.get("reward", {}).items() if k.startswith("val/") and "reward" in outputs}
    held_out = datamodule_records(config.reward)[1] if judge is not None and "reward" in outputs else []
    if held_out:
        # The accuracy a perfect reward model (one that ranks like the judge) would reach on
        # the noisy held-out labels.
        reward["label_ceiling"] = label_agreement(held_out, judge)
    summary = {
        "policy_stage": stage,
        "gold_win_rate": comparison.gold_win_rate,
        "comparison": comparison.to_dict(),
        "sft": {k: final.get("sft", {}).get(k) for k in ("val/loss", "val/token_accuracy", "val/perplexity")},
        "reward": reward,
        "ppo": {k: v for k, v in final.get("ppo", {}).items() if k.startswith(("eval/", "objective/"))},
        "dpo": {k: v for k, v in final.get("dpo", {}).items() if k.startswith(("val/", "rewards/"))} if stage == "dpo" else {},
        "samples": rows[:8],
    }
    return summary


def print_table(summary: dict[str, Any]) -> None:
    c, policy = summary["comparison"], summary.get("policy_stage", "ppo").upper()

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        ("SFT val loss", summary["sft"].get("val/loss")),
        ("RM val accuracy", summary["reward"].get("val/accuracy")),
        ("RM ceiling (gold vs noisy labels)", summary["reward"].get("label_ceiling")),
        ("RM gold accuracy", summary["reward"].get("val/gold_accuracy")),
        (f"gold win rate {policy} vs SFT", c["gold_win_rate"]),
        (f"gold score {policy} / SFT", f"{fmt(c['gold_score'])} / {fmt(c['baseline_gold_score'])}"),
        (f"validity {policy} / SFT", f"{fmt(c['validity'])} / {fmt(c['baseline_validity'])}"),
        (f"RM score {policy} / SFT", f"{fmt(c['score'])} / {fmt(c['baseline_score'])}"),
        (f"RM-gold Spearman, samples {policy} / SFT",
         f"{fmt(c['reward_gold_spearman'])} / {fmt(c['baseline_reward_gold_spearman'])}"),
        (f"KL({policy} || SFT) per response", c["kl"]),
    ]
    width = max(len(name) for name, _ in lines)
    print("\n".join(f"{name:<{width}}  {fmt(value)}" for name, value in lines))


def parse_settings(cls: type[T], prog: str, description: str | None, argv: list[str]) -> T:
    """The dataclass ``cls`` from ``--config FILE`` and ``--field value`` options (jsonargparse)."""
    parser = ArgumentParser(prog=prog, description=description, default_config_files=[])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(cls, as_positional=False)
    namespace = parser.parse_args(argv)
    namespace.pop("config", None)
    return cls(**namespace.as_dict())


def pipeline_command(argv: list[str]) -> int:
    run_pipeline(parse_settings(PipelineConfig, "rlhf-lightning pipeline", __doc__, argv))
    return 0
