"""The online loop (``rlhf-lightning iterate``): rater labelling, resume, and short real rounds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import main
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.iterate import IterateConfig, label_with_rater, labels_in, last_critic, ppo_settings, round_stage_config
from rlhf_lightning.pipeline import datamodule_records
from rlhf_lightning.labelling.candidates import Item, content_id
from rlhf_lightning.labelling.storage import AnnotationLog, judgements, make_judgement, read_log
from rlhf_lightning.tasks import SentimentTask, TaskRater
from rlhf_lightning.tasks.sentiment import gold_score
from tests.test_pipeline import USER_JUDGE, tiny_stage_configs

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT_RATER = "rlhf_lightning.tasks.sentiment.rater"


# --- the rater and the labelling of a round ----------------------------------------------------
def test_task_rater_is_the_noisy_bradley_terry_rater_and_repeatable():
    task = SentimentTask()
    rater = TaskRater(task)
    records = task.preference_records(400)
    prompts = [r["prompt"] for r in records]
    better = [max(r["chosen"], r["rejected"], key=lambda c: gold_score(r["prompt"], c)) for r in records]
    worse = [min(r["chosen"], r["rejected"], key=lambda c: gold_score(r["prompt"], c)) for r in records]
    labels = rater(prompts, better, worse)
    assert labels == rater(prompts, better, worse)  # the same pair gets the same label again
    assert set(labels) == {0.0, 1.0}  # noisy: it sometimes prefers the worse one ...
    assert 0.6 < sum(labels) / len(labels) < 0.99  # ... but mostly the better one
    swapped = rater(prompts, worse, better)
    assert sum(swapped) / len(swapped) < 0.4


def items(count: int, k: int = 2) -> list[Item]:
    out = []
    for n in range(count):
        responses = tuple(f"response {n}.{i}" for i in range(k))
        out.append(Item(content_id(f"prompt {n}", responses), f"prompt {n}", responses))
    return out


def prefers_lower_index(prompts, firsts, seconds):
    return [1.0 if a < b else 0.0 for a, b in zip(firsts, seconds)]


def test_rater_labels_every_pair_up_to_the_quota_and_resumes_without_asking_again(tmp_path: Path):
    log = AnnotationLog(tmp_path / "annotations.jsonl")
    asked: list[list[str]] = []

    def rater(prompts, firsts, seconds):
        asked.append(list(prompts))
        return prefers_lower_index(prompts, firsts, seconds)

    label_with_rater(rater, "sim", items(4, k=3), log, quota=7, batch_size=4)  # 3 pairs per item
    in_force = judgements(read_log(log.path))
    assert labels_in(read_log(log.path)) == 7 and [len(batch) for batch in asked] == [4, 3]
    assert all(j["choice"] == "left" and j["ranking"] == [0, 1] and j["annotator"] == "sim" for j in in_force)
    assert [j["item"] for j in in_force][:3] == [content_id("prompt 0", [a, b]) for a, b in
                                                 (("response 0.0", "response 0.1"), ("response 0.0", "response 0.2"),
                                                  ("response 0.1", "response 0.2"))]
    asked.clear()
    label_with_rater(rater, "sim", items(4, k=3), log, quota=7, batch_size=4)  # the quota is met
    assert asked == []
    label_with_rater(rater, "sim", items(4, k=3), log, quota=12, batch_size=4)  # a larger one: only new pairs
    assert [len(batch) for batch in asked] == [4, 1] and labels_in(read_log(log.path)) == 12
    assert len({j["item"] for j in judgements(read_log(log.path))}) == 12


def test_a_failing_rater_keeps_the_batches_it_finished(tmp_path: Path):
    log = AnnotationLog(tmp_path / "annotations.jsonl")
    calls = []

    def flaky(prompts, firsts, seconds):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("rate limited")
        return [0.5, None][: len(prompts)] + [0.0] * max(0, len(prompts) - 2)

    with pytest.raises(RuntimeError, match="rate limited"):
        label_with_rater(flaky, "llm", items(6), log, quota=6, batch_size=3)
    in_force = judgements(read_log(log.path))
    assert [j["choice"] for j in in_force] == ["tie", "skip", "right"]
    assert labels_in(read_log(log.path)) == 2  # a skip is no label, a tie is one


@pytest.mark.parametrize("labels, message", [([1.0], "returned 1 labels for 2 pairs"), ([1.0, "yes"], "returned 'yes'")])
def test_a_rater_that_answers_wrongly_is_named(tmp_path: Path, labels, message):
    with pytest.raises(UserInputError, match=f"rater my.judge {message}"):
        label_with_rater(lambda *_: labels, "my.judge", items(2), AnnotationLog(tmp_path / "a.jsonl"), 2, 8)


def test_labels_count_pairs_of_rankings_ties_but_not_skips():
    def judged(choice, k, ranking=None):
        return make_judgement(annotator="a", item=f"{choice}{k}", prompt="p", responses=[f"r{i}" for i in range(k)],
                              shown=list(range(k)), choice=choice, ranking=ranking)

    events = [judged("ranking", 3, [2, 0, 1]), judged("tie", 2), judged("skip", 4), judged("left", 2, [0, 1])]
    assert labels_in(events) == 3 + 1 + 0 + 1


def test_round_configs_move_every_output_into_the_round(tmp_path: Path):
    folder = tmp_path / "run" / "round_2"
    path = round_stage_config(ROOT / "configs/demo/ppo.yaml", "ppo", folder, {"max_iterations": 5},
                              data={"batch_size": 4}, trainer={"max_epochs": 1})
    config = yaml.safe_load(Path(path).read_text())
    init = config["model"]["init_args"]
    assert init["policy_export_dir"] == str(folder / "ppo/policy") and init["critic_export_dir"] == str(folder / "ppo/critic")
    assert init["max_iterations"] == 5 and config["data"]["init_args"]["batch_size"] == 4
    assert config["trainer"]["max_epochs"] == 1
    assert config["trainer"]["logger"]["init_args"] == {"save_dir": str(folder), "name": "ppo", "version": ""}
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(folder / "ppo/checkpoints")
    assert config["trainer"]["callbacks"][0]["init_args"]["every_n_iterations"] == 10  # the rest is kept


def ppo_config(tmp_path: Path, **init_args) -> str:
    config = yaml.safe_load((ROOT / "configs/demo/ppo.yaml").read_text())
    for key, value in init_args.items():
        if value is None:
            config["model"]["init_args"].pop(key, None)
        else:
            config["model"]["init_args"][key] = value
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_loop_lr_schedule_is_one_linear_decay_held_constant_within_each_round(tmp_path: Path):
    ppo = ppo_config(tmp_path, learning_rate=8e-5, critic_learning_rate=2e-4)
    loop = IterateConfig(ppo=ppo, rounds=3, ppo_iterations=22, lr_schedule="loop")
    settings = [ppo_settings(loop, number) for number in range(4)]
    # linear from 1 to 0 over 4 rounds: the mean over each quarter is 7/8, 5/8, 3/8, 1/8
    assert [s["learning_rate"] for s in settings] == pytest.approx([7e-5, 5e-5, 3e-5, 1e-5])
    assert [s["critic_learning_rate"] for s in settings] == pytest.approx([1.75e-4, 1.25e-4, 0.75e-4, 0.25e-4])
    assert all(s["lr_scheduler"] == "constant" and s["max_iterations"] == 22 for s in settings)
    # the PPO config's own schedule otherwise; an unset rate is PPOModule's default (1e-5), and an
    # unset critic rate stays unset (the critic then follows the policy's, already scaled)
    assert ppo_settings(IterateConfig(ppo=ppo, ppo_iterations=22), 2) == {"max_iterations": 22}
    bare = IterateConfig(ppo=ppo_config(tmp_path, learning_rate=None, critic_learning_rate=None), rounds=1,
                         lr_schedule="loop")
    assert ppo_settings(bare, 0) == {"lr_scheduler": "constant", "learning_rate": pytest.approx(0.75e-5),
                                     "critic_learning_rate": None}


def test_critic_last_without_a_critic_export_is_a_one_line_error(tmp_path: Path):
    config = IterateConfig(run_dir=str(tmp_path), critic="last")
    (tmp_path / "round_0/ppo/policy").mkdir(parents=True)  # a critic-free estimator exports only the policy
    with pytest.raises(UserInputError, match=r"critic last: round 0 exported no critic .*advantage_estimator gae"):
        last_critic(config, 1)


@pytest.mark.parametrize("key, value, rule", [("k", 1, "must be >= 2"), ("reward_refresh", "restart", "must be one of"),
                                              ("labels_per_round", 0, "must be >= 1"), ("reference", "base", "must be one of"),
                                              ("critic", "policy", "must be one of"), ("lr_schedule", "cosine", "must be one of"),
                                              ("on_policy_weight", 0, "must be >= 1")])
def test_bad_settings_are_one_line_errors_naming_the_key(key, value, rule, capsys):
    assert main(["iterate", "--config", str(ROOT / "configs/demo/iterate.yaml"), f"--{key}={value}"]) == 2
    assert f"iterate: {key} {rule}" in capsys.readouterr().err


def test_too_few_prompts_for_the_rounds_is_an_error_before_anything_runs(tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    argv = ["iterate", "--config", str(ROOT / "configs/demo/iterate.yaml"), f"--prompts={prompts}",
            f"--run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "holds 2 prompts; 3 rounds of 500 fresh prompts need 1500" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- short real rounds ---------------------------------------------------------------------------
def tiny_iterate_config(run: Path, stages: Path, **settings) -> Path:
    """The demo's loop on the pipeline test's tiny stage configs (in ``stages``)."""
    config = yaml.safe_load((ROOT / "configs/demo/iterate.yaml").read_text())
    config.update(run_dir=str(run), sft=str(stages / "sft.yaml"), reward=str(stages / "reward.yaml"),
                  ppo=str(stages / "ppo.yaml"), judge=USER_JUDGE, offline_pairs=200, labels_per_round=6,
                  refresh_steps=4, ppo_iterations=2, eval_prompts=str(stages / "eval.jsonl"))
    config.update(settings)
    path = run.parent / f"{run.name}.yaml"
    run.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def finished_round_zero(stages: Path) -> Path:
    """A finished round 0 (the tiny pipeline on 200 offline pairs) in ``stages``; tests copy it
    (the ``round_zero`` fixture of conftest.py runs it once per session)."""
    tiny_stage_configs(stages)
    run = stages / "loop"
    assert main(["iterate", "--config", str(tiny_iterate_config(run, stages, rounds=0))]) == 0
    return run / "round_0"


def start_from(round_zero: Path, run: Path, **settings) -> Path:
    shutil.copytree(round_zero, run / "round_0")
    return tiny_iterate_config(run, round_zero.parents[1], **settings)


@pytest.mark.slow
def test_round_zero_is_the_pipeline_on_the_offline_budget(round_zero: Path):
    summary = json.loads((round_zero / "summary.json").read_text())
    assert summary["round"] == 0 and summary["labels"] == summary["labels_total"] == 200
    assert len(read_log(round_zero / "prefs_train.jsonl")) == 200
    written = yaml.safe_load((round_zero / "configs/reward.yaml").read_text())
    assert written["data"]["init_args"]["train_file"] == str(round_zero / "prefs_train.jsonl")
    for stage in ("sft", "reward", "ppo"):
        assert list((round_zero / stage).glob("events.out.tfevents*")), stage
    assert summary["outputs"]["ppo"] == str(round_zero / "ppo/policy")


@pytest.mark.slow
def test_two_rounds_with_the_builtin_rater_then_a_rerun_skips_them(round_zero: Path, tmp_path: Path, capsys):
    run = tmp_path / "loop"
    config = start_from(round_zero, run, rounds=2, rater=SENTIMENT_RATER)
    assert main(["iterate", "--config", str(config)]) == 0
    rows = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["labels"] for r in rows] == [200, 6, 6] and [r["labels_total"] for r in rows] == [200, 206, 212]
    assert rows[0]["fresh_accuracy"] is None and rows[0]["fresh_ceiling"] is None
    for row in rows[1:]:
        assert 0.0 <= row["fresh_accuracy"] <= 1.0 and 0.0 <= row["win"] <= 1.0
        assert 0.0 <= row["fresh_ceiling"] <= 1.0  # the judge against the rater's fresh labels
        assert row["rho_policy"] is None or -1.0 <= row["rho_policy"] <= 1.0
    for number in (1, 2):
        folder = run / f"round_{number}"
        labelled = judgements(read_log(folder / "annotations.jsonl"))
        assert len(labelled) == 6 and {j["annotator"] for j in labelled} == {SENTIMENT_RATER}
        # every label so far trains the refreshed reward model: round 0's and each round's
        assert len(read_log(folder / "reward_train.jsonl")) == 200 + 6 * number
        reward = yaml.safe_load((folder / "configs/reward.yaml").read_text())["model"]["init_args"]
        ppo = yaml.safe_load((folder / "configs/ppo.yaml").read_text())["model"]["init_args"]
        previous = json.loads((run / f"round_{number - 1}/summary.json").read_text())["outputs"]
        assert reward["model_name_or_path"] == previous["reward"]  # continue
        assert reward["likelihood_teacher"] == str(round_zero / "sft/model")
        assert ppo["policy"] == previous["ppo"] and ppo["reference"] == str(round_zero / "sft/model")
        assert ppo["reward_model"] == str(folder / "reward/model")
        # the round's candidates were sampled from the previous round's policy, for fresh prompts
        candidates = read_log(folder / "candidates.jsonl")
        assert len(candidates) == 6 and all(len(c["responses"]) == 2 for c in candidates)
    pool = [r["prompt"] for r in datamodule_records(round_zero.parents[1] / "ppo.yaml")[0]]
    for number, start in ((1, 0), (2, 6)):  # a fresh slice of the PPO prompts each round
        assert [c["prompt"] for c in read_log(run / f"round_{number}/candidates.jsonl")] == pool[start : start + 6]
    report = (run / "report.md").read_text()
    assert "fresh pairs" in report and report.count("\n| ") == 1 + 3  # header and one row per round
    assert (run / "rounds.png").stat().st_size > 1000

    capsys.readouterr()
    assert main(["iterate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 3


@pytest.mark.slow
def test_a_round_with_weighted_on_policy_pairs_continues_the_last_critic_on_the_loop_schedule(round_zero: Path,
                                                                                               tmp_path: Path):
    run = tmp_path / "loop"
    config = start_from(round_zero, run, rounds=1, rater=SENTIMENT_RATER, critic="last", lr_schedule="loop",
                        on_policy_weight=3)
    assert main(["iterate", "--config", str(config)]) == 0
    trained = read_log(run / "round_1/reward_train.jsonl")
    fresh = read_log(run / "round_1/prefs.jsonl")
    assert len(fresh) == 6 and len(trained) == 200 + 3 * 6  # each on-policy pair three times, offline once
    assert all(trained[200:].count(pair) == 3 for pair in fresh)
    assert json.loads((run / "rounds.json").read_text())[1]["labels"] == 6  # labels are counted once
    ppo = yaml.safe_load((run / "round_1/configs/ppo.yaml").read_text())["model"]["init_args"]
    assert ppo["critic"] == str(run / "round_0/ppo/critic")  # not the refreshed reward model
    source = yaml.safe_load((round_zero.parents[1] / "ppo.yaml").read_text())["model"]["init_args"]
    assert ppo["lr_scheduler"] == "constant"
    assert ppo["learning_rate"] == pytest.approx(source["learning_rate"] * 0.25)  # round 1 of 2: 1 - 1.5 / 2
    assert (run / "round_1/summary.json").exists() and (run / "round_1/ppo/critic/config.json").exists()


def dying_rater(prompts, firsts, seconds):
    """The sentiment rater, recording the pairs it is asked for; with ``RLHF_TEST_DIE_ON_CALL=N``
    its N-th call kills the process (SIGKILL) before answering."""
    from rlhf_lightning.tasks.sentiment import rater

    with open(os.environ["RLHF_TEST_RATER_LOG"], "a", encoding="utf-8") as asked:
        asked.writelines(json.dumps([p, a, b]) + "\n" for p, a, b in zip(prompts, firsts, seconds))
    dying_rater.calls = getattr(dying_rater, "calls", 0) + 1
    if str(dying_rater.calls) == os.environ.get("RLHF_TEST_DIE_ON_CALL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rater(prompts, firsts, seconds)


@pytest.mark.slow
def test_a_killed_round_loses_no_label_and_repeats_no_finished_stage(round_zero: Path, tmp_path: Path):
    run = tmp_path / "loop"
    config = start_from(round_zero, run, rounds=1, rater="tests.test_iterate.dying_rater", rater_batch_size=4)
    asked = tmp_path / "asked.jsonl"
    command = [sys.executable, "-m", "rlhf_lightning.cli", "iterate", "--config", str(config)]
    env = {**os.environ, "RLHF_TEST_RATER_LOG": str(asked), "PYTHONPATH": str(ROOT)}
    annotations = run / "round_1/annotations.jsonl"

    # 1. killed while labelling: the second batch was asked for, the first is on disk
    died = subprocess.run(command, env={**env, "RLHF_TEST_DIE_ON_CALL": "2"}, cwd=ROOT, capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    kept = judgements(read_log(annotations))
    assert len(kept) == 4 and len(asked.read_text().splitlines()) == 4 + 2

    # 2. killed after the round's reward stage: its export is complete, PPO's is not
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (run / "round_1/reward/model/config.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    output = process.communicate()[0]
    assert "round 0: finished earlier" in output
    assert not (run / "round_1/summary.json").exists(), "the round finished before it could be killed"
    after_second = judgements(read_log(annotations))
    assert [j["id"] for j in after_second[:4]] == [j["id"] for j in kept]  # no label lost ...
    assert len(after_second) == 6
    labelled_again = [json.loads(line) for line in asked.read_text().splitlines()[6:]]
    assert len(labelled_again) == 2  # ... and none asked again: only the 2 pairs never answered

    # 3. the resumed run finishes the round without repeating a finished stage
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "round 0: finished earlier" in finished.stdout
    assert "[pipeline] reward: " + str(run / "round_1/reward/model") + " is complete, skipping" in finished.stdout
    assert "[pipeline] ppo: rlhf-lightning fit" in finished.stdout
    assert len(asked.read_text().splitlines()) == 8 and len(judgements(read_log(annotations))) == 6
    assert json.loads((run / "rounds.json").read_text())[1]["labels"] == 6


def test_ctrl_c_ends_a_browser_round_with_the_labels_so_far(tmp_path: Path, monkeypatch, capsys):
    pytest.importorskip("flask", reason="the labelling page needs Flask")
    import threading

    from rlhf_lightning.iterate import label_in_browser
    from rlhf_lightning.labelling.candidates import CandidatePool

    class NothingToSample(threading.Thread):
        def stop(self) -> None:
            pass

    log = AnnotationLog(tmp_path / "annotations.jsonl")
    label_with_rater(prefers_lower_index, "Ada", items(1), log, quota=1, batch_size=8)  # one label so far

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_lightning.iterate.time.sleep", ctrl_c)
    config = IterateConfig(run_dir=str(tmp_path), label_port=0)
    label_in_browser(config, 1, CandidatePool(items(3)), NothingToSample(), log, quota=5)  # returns, does not raise
    printed = capsys.readouterr().out
    assert "round 1: 1/5 labels" in printed and "round 1: ended by the user with 1 labels" in printed
