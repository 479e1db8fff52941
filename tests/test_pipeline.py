"""The one-command pipeline on tiny settings: report, summary, skipping, determinism."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import main
from rlhf_lightning import terminal
from rlhf_lightning.models import load_tokenizer
from tests.test_terminal import terminal_output

ROOT = Path(__file__).resolve().parents[1]


def judge_by_distinct_words(prompts: list[str], completions: list[str]) -> list[float]:
    """A user's own judge (by import path ``tests.test_pipeline.judge_by_distinct_words``)."""
    return [float(len(set(c.split()))) for c in completions]


judge_by_distinct_words.is_valid = lambda prompts, completions: [c.rstrip().endswith(".") for c in completions]
USER_JUDGE = "tests.test_pipeline.judge_by_distinct_words"

# The Python warnings a pipeline run may show (docs/pipeline.md, "What the terminal shows"):
# (category, regex of the message's start, why it is allowed). Any other warning fails the test.
ALLOWED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"\[LengthGuard\] iteration \d+: \d+% of the responses end without EOS",
     "the package's own health check (rlhf_lightning.guards), which a user acts on; the tiny run's "
     "barely trained policy rarely ends within 16 tokens"),
)

# What the package keeps off the terminal (see rlhf_lightning/terminal.py): none may show.
SILENCED = (
    "LightningCLI's args parameter",  # each stage's command line, run in-process
    "litlogger",  # Lightning's cloud-logger tip
    "LeafSpec",  # Lightning internals under torch >= 2.10
    "in eval mode at the start of training",  # PPO's frozen reference and reward model
    "pre-optimization state",  # ModelCheckpoint's advice for manual optimisation (PPO)
    "passing in an `attention_mask`",  # transformers drops the mask the package passed
    "Writing model shards",  # transformers' progress bars, for tiny local models
    "Loading weights",
    "LOAD REPORT",  # the reward model's new head: one line of the package's instead
    "will save all targets and predictions",  # SpearmanCorrCoef on small validation sets
)


def tiny_stage_configs(run: Path) -> Path:
    """The demo's stage configs, shrunk to seconds and pointed into ``run``."""
    configs = {name: yaml.safe_load((ROOT / f"configs/demo/{name}.yaml").read_text()) for name in ("sft", "reward", "ppo")}
    for name, config in configs.items():
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(run / name / "checkpoints")
    sft, reward, ppo = configs["sft"], configs["reward"], configs["ppo"]
    sft["trainer"].update(max_steps=30, val_check_interval=15)
    sft["model"]["init_args"].update(model_name_or_path="preset:micro-gpt2", export_dir=str(run / "sft/model"),
                                     tokenizer_name_or_path=str(run / "tokenizer"), warmup_steps=3)
    sft["data"]["init_args"].update(batch_size=8)
    reward["trainer"].update(max_steps=10, val_check_interval=10)
    reward["model"]["init_args"].update(export_dir=str(run / "reward/model"))
    reward["data"]["init_args"].update(batch_size=8, val_batch_size=100)
    ppo["trainer"].update(val_check_interval=2, limit_val_batches=1)
    ppo["trainer"]["callbacks"][0]["init_args"]["every_n_iterations"] = 2
    ppo["model"]["init_args"].update(max_iterations=2, policy_export_dir=str(run / "ppo/policy"),
                                     critic_export_dir=str(run / "ppo/critic"))
    ppo["model"]["init_args"]["generation"]["max_new_tokens"] = 16
    ppo["model"]["init_args"]["ppo"].update(epochs=1, num_minibatches=2)
    ppo["data"]["init_args"].update(batch_size=8, val_batch_size=8)
    for name, config in configs.items():
        config["model"]["init_args"].pop("judge", None)  # the pipeline's judge reaches every stage
        (run / f"{name}.yaml").write_text(yaml.safe_dump(config))
    pipeline = {"run_dir": str(run), "sft": str(run / "sft.yaml"), "reward": str(run / "reward.yaml"),
                "ppo": str(run / "ppo.yaml"), "eval_prompts": str(write_prompts(run / "eval.jsonl")),
                "judge": USER_JUDGE}
    path = run / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def write_prompts(path: Path) -> Path:
    from rlhf_lightning.tasks import SentimentTask

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in SentimentTask(5).prompt_records(16, "val")))
    return path


@pytest.mark.slow
def test_pipeline_report_skip_and_determinism(tmp_path: Path, capfd):
    first, second = tmp_path / "a", tmp_path / "b"
    with terminal_output() as (log_lines, caught):
        for run in (first, second):
            run.mkdir()
            assert main(["pipeline", "--config", str(tiny_stage_configs(run))]) == 0
        # the package's warning filters lasted only while its calls ran
        rules = (terminal.LIGHTNING_LEAFSPEC, terminal.MANUAL_OPTIMISATION_CHECKPOINT, terminal.SPEARMAN_BUFFER,
                 terminal.eval_mode_rule(0))
        assert not [f for f in warnings.filters if getattr(f[3], "pattern", f[3]) in {r[2] for r in rules}]
    out, err = capfd.readouterr()
    # A quiet terminal: Lightning's useful lines and the package's own, none of the silenced
    # messages, and no Python warning outside ALLOWED_WARNINGS.
    shown = "\n".join([out, err, *log_lines])
    for noise in SILENCED:
        assert noise not in shown, noise
    assert not re.search(r"Epoch \d+/-\d", shown)  # the SFT bar under max_steps reads "Epoch 0"
    for kept in ("[pipeline] sft: rlhf-lightning fit", "Trainable params", "`Trainer.fit` stopped: `max_steps=30` reached",
                 f"reward model: new scalar head on {first / 'sft/model'} (score.weight)", "gold win rate PPO vs SFT"):
        assert kept in shown, kept
    unexpected = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                  if not any(issubclass(w.category, c) and re.match(m, str(w.message)) for c, m, _ in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
    summary = json.loads((first / "summary.json").read_text())
    assert 0.0 <= summary["gold_win_rate"] <= 1.0
    # The user's judge scored the final comparison, the noise ceiling, the reward stage's
    # validation and PPO's validation.
    for row in summary["samples"]:
        assert row["gold"] == judge_by_distinct_words([], [row["response"]])[0]
        assert row["validity"] == float(row["response"].rstrip().endswith("."))
    assert 0.0 <= summary["reward"]["label_ceiling"] <= 1.0
    assert "val/gold_spearman" in summary["reward"]
    assert {"eval/gold_score", "eval/validity", "eval/reward_gold_spearman"} <= set(summary["ppo"])
    assert summary["comparison"]["num_prompts"] == 16
    for key in ("reward_gold_spearman", "baseline_reward_gold_spearman"):  # None only if samples tie
        assert summary["comparison"][key] is None or -1.0 <= summary["comparison"][key] <= 1.0
    assert summary["sft"]["val/loss"] is not None and "val/accuracy" in summary["reward"]
    report = (first / "report.md").read_text()
    assert "gold win rate" in report and "## Samples" in report and "Spearman(reward model, gold)" in report
    for plot in ("ppo_scores.png", "ppo_kl.png", "sft_loss.png", "ppo_gold_vs_kl.png"):
        assert (first / plot).stat().st_size > 1000, plot
    # The SFT config names a tokenizer folder that did not exist: the pipeline trained it, and
    # every stage's export carries it.
    vocab = load_tokenizer(str(first / "tokenizer")).get_vocab()
    for export in ("sft/model", "reward/model", "ppo/policy"):
        assert load_tokenizer(str(first / export)).get_vocab() == vocab, export
    for stage in ("sft", "reward", "ppo"):  # one TensorBoard sub-run per stage
        assert list((first / stage).glob("events.out.tfevents*")), stage

    # Same seed, separate runs: the same numbers.
    other = json.loads((second / "summary.json").read_text())
    assert other["comparison"] == summary["comparison"]
    assert other["ppo"] == summary["ppo"]

    # A second run in the same folder skips the finished stages and reports the same numbers.
    capfd.readouterr()
    assert main(["pipeline", "--config", str(first / "pipeline.yaml")]) == 0
    printed = capfd.readouterr().out
    assert printed.count("is complete, skipping") == 3
    assert "tokenizer: " + str(first / "tokenizer") + " exists, skipping" in printed
    assert json.loads((first / "summary.json").read_text())["comparison"] == summary["comparison"]


def test_overoptimisation_curve_pairs_tags_logged_at_the_same_step():
    from rlhf_lightning.report import against

    scalars = {"eval/kl": [(10, 0.5), (20, 1.5), (30, 3.0)], "eval/gold_score": [(10, 0.1), (30, -0.2), (40, 9.0)]}
    assert against(scalars, "eval/kl", "eval/gold_score") == [(0.5, 0.1), (3.0, -0.2)]
    assert against(scalars, "eval/kl", "eval/missing") == []


def test_pipeline_without_a_reward_stage_when_ppo_has_a_reward_fn(tmp_path: Path):
    from rlhf_lightning.pipeline import PipelineConfig, pipeline_stages, stage_commands, stage_outputs

    config = PipelineConfig(**yaml.safe_load(tiny_stage_configs(tmp_path).read_text()))
    assert pipeline_stages(config) == ("sft", "reward", "ppo")
    ppo = yaml.safe_load(Path(config.ppo).read_text())
    ppo["model"]["init_args"]["reward_fn"] = "rlhf_lightning.tasks.lists.judge"  # an oracle reward
    Path(config.ppo).write_text(yaml.safe_dump(ppo))
    assert pipeline_stages(config) == ("sft", "ppo")
    outputs = stage_outputs(config)
    assert set(outputs) == {"sft", "ppo"}
    commands = stage_commands(config, outputs)
    assert not any("reward_model" in arg for arg in commands["ppo"])
    assert f"--model.init_args.judge={USER_JUDGE}" in commands["ppo"]


def test_pipeline_without_a_reward_stage_when_ppo_has_an_implicit_reward(tmp_path: Path):
    from rlhf_lightning.pipeline import PipelineConfig, pipeline_stages, stage_commands, stage_outputs

    config = PipelineConfig(**yaml.safe_load(tiny_stage_configs(tmp_path).read_text()))
    ppo = yaml.safe_load(Path(config.ppo).read_text())
    ppo["model"]["init_args"]["implicit_reward"] = {"policy": str(tmp_path / "dpo-export")}  # an earlier DPO run's
    Path(config.ppo).write_text(yaml.safe_dump(ppo))
    assert pipeline_stages(config) == ("sft", "ppo")
    assert not any("reward_model" in arg for arg in stage_commands(config, stage_outputs(config))["ppo"])


def test_pipeline_passes_the_users_sft_data_to_reward_normalisation(tmp_path: Path):
    from rlhf_lightning.pipeline import PipelineConfig, stage_commands, stage_outputs

    config = PipelineConfig(**yaml.safe_load(tiny_stage_configs(tmp_path).read_text()))
    assert not any("normalize_file" in a for a in stage_commands(config, stage_outputs(config))["reward"])
    sft = yaml.safe_load(Path(config.sft).read_text())
    sft["data"]["init_args"].update(train_file="mine/sft.jsonl", val_file="mine/sft_val.jsonl")
    Path(config.sft).write_text(yaml.safe_dump(sft))
    assert "--model.init_args.normalize_file=mine/sft_val.jsonl" in stage_commands(config, stage_outputs(config))["reward"]


def test_pipeline_refuses_a_judge_it_cannot_import(tmp_path: Path, capsys):
    config = yaml.safe_load(tiny_stage_configs(tmp_path).read_text())
    config["judge"] = "tests.test_pipeline.no_such_judge"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "judge" in err and "no_such_judge" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sft").exists()  # nothing ran


def test_pipeline_rejects_unknown_stage_and_key(tmp_path: Path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("run_dir: x\nrdeo: [sft]\n")
    with pytest.raises(SystemExit):
        main(["pipeline", "--config", str(config)])
    assert "rdeo" in capsys.readouterr().err


def test_pipeline_reruns_stages_with_overwrite_export(tmp_path: Path, capsys):
    """A stage the pipeline runs replaces its old output on purpose, so each command lifts the
    stages' refusal to overwrite a finished export folder, and each stage accepts the key."""
    from rlhf_lightning.pipeline import (
        OVERWRITE,
        PipelineConfig,
        stage_commands,
        stage_outputs,
    )

    config = PipelineConfig(**yaml.safe_load(tiny_stage_configs(tmp_path).read_text()))
    for stage, command in stage_commands(config, stage_outputs(config)).items():
        assert OVERWRITE in command, stage
        with pytest.raises(SystemExit) as caught:
            main([*command, "--print_config"])
        assert caught.value.code == 0
        assert "overwrite_export: true" in capsys.readouterr().out, stage


def tiny_dpo_config(run: Path) -> Path:
    """The demo's DPO config shrunk to seconds, on a few of the task's preference pairs."""
    from rlhf_lightning.tasks import SentimentTask

    pairs = run / "prefs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in SentimentTask(3).preference_records(48, "train")))
    config = yaml.safe_load((ROOT / "configs/demo/dpo.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=4)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(run / "dpo/checkpoints")
    config["model"]["init_args"].update(export_dir=str(run / "dpo/model"), warmup_steps=1)
    config["data"]["init_args"].update(train_file=str(pairs), val_file=str(pairs), batch_size=8, val_batch_size=16)
    path = run / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_sft_then_dpo(tmp_path: Path, capsys):
    """With a dpo config the pipeline runs SFT -> DPO (no reward model, no PPO), wires the SFT
    export in as DPO's starting point, and reports the DPO policy against SFT."""
    from rlhf_lightning.pipeline import (PipelineConfig, datamodule_records, pipeline_stages, stage_commands,
                                         stage_outputs)

    config = yaml.safe_load(tiny_stage_configs(tmp_path).read_text())
    config["dpo"] = str(tiny_dpo_config(tmp_path))
    path = tmp_path / "pipeline-dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = PipelineConfig(**config)
    assert pipeline_stages(settings) == ("sft", "dpo")
    outputs = stage_outputs(settings)
    assert outputs == {"sft": str(tmp_path / "sft/model"), "dpo": str(tmp_path / "dpo/model")}
    assert f"--model.init_args.model_name_or_path={tmp_path / 'sft/model'}" in stage_commands(settings, outputs)["dpo"]

    assert main(["pipeline", "--config", str(path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["policy_stage"] == "dpo" and summary["outputs"] == outputs
    assert summary["stage_seconds"]["dpo"] > 0 and "reward" not in summary["stage_seconds"]
    assert 0 <= summary["comparison"]["gold_win_rate"] <= 1 and summary["comparison"]["score"] is None  # no reward model
    assert "val/loss" in summary["dpo"] and "rewards/accuracies" in " ".join(summary["dpo"])
    # the final comparison sampled with the PPO config's generation settings (max_new_tokens 16)
    assert summary["comparison"]["response_length"] <= 16
    report = (tmp_path / "report.md").read_text()
    assert "DPO policy against the SFT policy" in report and "| metric | DPO | SFT |" in report
    assert "gold win rate DPO vs SFT" in capsys.readouterr().out
    # without eval_prompts, DPO's policy is compared on the PPO config's validation prompts, as PPO's would be
    config["eval_prompts"] = None
    path.write_text(yaml.safe_dump(config))
    ppo = yaml.safe_load(Path(config["ppo"]).read_text())
    ppo["data"]["init_args"]["val_file"] = str(tmp_path / "ppo_val.jsonl")
    (tmp_path / "ppo_val.jsonl").write_text("".join(f'{{"prompt": "Review {i}:"}}\n' for i in range(12)))
    Path(config["ppo"]).write_text(yaml.safe_dump(ppo))
    assert main(["pipeline", "--config", str(path)]) == 0  # the stages are complete: the evaluation only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage_seconds"]["dpo"] is None
    assert summary["comparison"]["num_prompts"] == len(datamodule_records(config["ppo"])[1]) == 12


def test_the_dpo_demo_pipeline_is_sft_then_dpo():
    from rlhf_lightning.pipeline import PipelineConfig, parse_settings, stage_outputs

    config = parse_settings(PipelineConfig, "pipeline", None, ["--config", str(ROOT / "configs/demo/pipeline-dpo.yaml")])
    assert stage_outputs(config) == {"sft": "outputs/demo/sft/model", "dpo": "outputs/demo/dpo/model"}
