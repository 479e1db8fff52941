"""What every built-in task shares: the Task protocol, the registry, files through the data
modules, the judges by import path, and the documented noise ceilings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.tasks import BUILTIN_TASKS, DEFAULT_SIZES, BuiltinTask, Task, get_task, import_object, label_agreement

ROOT = Path(__file__).resolve().parents[1]
#: The noise ceilings docs/task.md states for each task's prefs_val.jsonl (seed 0).
DOCUMENTED_VAL_CEILING = {"sentiment": 0.816, "menu": 0.804, "lists": 0.821, "describe": 0.821}
SMALL = {"sft_train": 40, "sft_val": 8, "prefs_train": 40, "prefs_val": 8, "prompts_train": 16, "prompts_val": 8}


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_task_follows_the_protocol_and_ships_a_judge(name: str):
    task = get_task(name, seed=3)
    assert isinstance(task, Task) and task.name == name and task.seed == 3
    judge = import_object(f"rlhf_lightning.tasks.{name}.judge")
    records = task.sft_records(20)
    prompts, completions = [r["prompt"] for r in records], [r["completion"] for r in records]
    assert judge(prompts, completions) == [task.gold_score(p, c) for p, c in zip(prompts, completions)]
    assert judge.is_valid(prompts, completions) == [True] * 20  # demonstrations are valid


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_documented_noise_ceiling(name: str):
    task = get_task(name)
    ceiling = label_agreement(task.preference_records(DEFAULT_SIZES["prefs_val"], "val"), task.judge())
    assert ceiling == pytest.approx(DOCUMENTED_VAL_CEILING[name], abs=0.001)
    assert f"{DOCUMENTED_VAL_CEILING[name]:.3f}" in (ROOT / "docs" / "task.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_task_files_load_through_the_data_modules(name: str, tmp_path: Path, capsys):
    assert main(["task", "--name", name, "--out", str(tmp_path / name)]) == 0
    printed = capsys.readouterr().out
    assert f"sft_train: {tmp_path / name / 'sft_train.jsonl'}" in printed
    files = {key: tmp_path / name / f"{key}.jsonl" for key in DEFAULT_SIZES}
    task = get_task(name)
    for cls, kind in ((SFTDataModule, "sft"), (PreferenceDataModule, "prefs"), (PromptDataModule, "prompts")):
        from_files = cls(train_file=str(files[f"{kind}_train"]), val_file=str(files[f"{kind}_val"]),
                         tokenizer="preset:micro-gpt2", max_length=128)
        from_files.setup("fit")
        # the files hold exactly the records the data module draws from the task by name
        by_name = cls(task=name, tokenizer="preset:micro-gpt2", max_length=128)
        by_name.setup("fit")
        assert from_files.train_records == by_name.train_records == getattr(task, {
            "sft": "sft_records", "prefs": "preference_records", "prompts": "prompt_records"}[kind])(
            DEFAULT_SIZES[f"{kind}_train"], "train")
        assert len(from_files.train_dataset) == DEFAULT_SIZES[f"{kind}_train"]  # nothing truncated away
        assert from_files.val_records == by_name.val_records
        batch = next(iter(from_files.train_dataloader()))
        assert batch[next(iter(batch))].shape[0] > 0


def test_task_command_refuses_an_unknown_name(tmp_path: Path, capsys):
    assert main(["task", "--name", "poems", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "poems" in err and "sentiment" in err and not list(tmp_path.iterdir())


class EchoTask(BuiltinTask):
    """A user's task: repeat the prompt's last word. Demonstrations echo any of its words."""

    name = "echo"
    words = ("red", "blue", "green", "gold")

    def draw_prompt(self, rng: random.Random) -> str:
        return "Say " + " ".join(rng.sample(self.words, 3)) + ":"

    def good_completion(self, rng: random.Random, prompt: str) -> str:
        return " " + rng.choice(prompt.rstrip(":").split()[1:]) + "."

    def degenerate_completion(self, rng: random.Random, prompt: str) -> str:
        return " " + rng.choice(self.words) + " " + rng.choice(self.words)

    def gold_score(self, prompt: str, completion: str) -> float:
        if not self.is_valid(prompt, completion):
            return -2.0
        return 1.0 if completion.strip(" .") == prompt.rstrip(":").split()[-1] else 0.0

    def is_valid(self, prompt: str, completion: str) -> bool:
        return completion.startswith(" ") and completion.endswith(".") and completion.strip(" .") in self.words


def test_a_users_task_by_import_path_feeds_every_data_module():
    task = get_task("tests.test_task_suite.EchoTask", seed=2)
    assert isinstance(task, EchoTask) and task.seed == 2
    data = SFTDataModule(task="tests.test_task_suite.EchoTask", seed=2, tokenizer="preset:micro-gpt2")
    train, val = data.load_records()
    assert train == task.sft_records(DEFAULT_SIZES["sft_train"]) and val == task.sft_records(DEFAULT_SIZES["sft_val"], "val")
    prefs = task.preference_records(500)
    # the base class's rater: valid beats degenerate almost always, labels still noisy between valid ones
    assert 0.6 < label_agreement(prefs, task.judge()) < 1.0
    with pytest.raises(ValueError, match="unknown task"):
        get_task("poems")
    from rlhf_lightning.errors import UserInputError

    with pytest.raises(UserInputError, match=r"data\.init_args\.task: unknown task 'poems'"):
        SFTDataModule(task="poems", tokenizer="preset:micro-gpt2").load_records()
    with pytest.raises(ValueError, match="cannot be imported"):
        get_task("tests.test_task_suite.NoSuchTask")
