"""benchmarks/suite.py derives every task's configs from one recipe: only data paths, output
folders, the seed and the judge may differ from the recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("suite_benchmark", ROOT / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, inner in enumerate(value):
            out.update(flatten(inner, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def test_derived_configs_differ_from_the_recipe_only_where_allowed(tmp_path: Path):
    suite = load_suite()
    files = {name: tmp_path / "data" / f"{name}.jsonl" for name in
             ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train", "prompts_val")}
    run = tmp_path / "lists" / "seed1"
    pipeline = suite.write_configs(ROOT / "configs" / "demo", run, files, "lists", 1, False, [], [])
    derived = yaml.safe_load(pipeline.read_text())
    assert derived["judge"] == "rlhf_lightning.tasks.lists.judge" and derived["seed"] == 1
    allowed = {"seed_everything", "data.init_args.train_file", "data.init_args.val_file", "data.init_args.task",
               "model.init_args.judge"}
    for stage, (train, val) in suite.DATA.items():
        recipe = flatten(yaml.safe_load((ROOT / "configs" / "demo" / f"{stage}.yaml").read_text()))
        mine = flatten(yaml.safe_load(Path(derived[stage]).read_text()))
        assert set(recipe) <= set(mine) and set(mine) - set(recipe) <= allowed, stage
        changed = {key for key in recipe if mine[key] != recipe[key]}
        for key in changed - allowed:  # an output folder moved into the run, nothing else
            assert isinstance(recipe[key], str) and mine[key] == recipe[key].replace("outputs/demo", str(run)), key
        assert mine["data.init_args.train_file"] == str(files[train]) and mine["data.init_args.val_file"] == str(files[val])
        assert mine["seed_everything"] == 1


def test_oracle_mode_and_overrides(tmp_path: Path):
    suite = load_suite()
    files = {name: tmp_path / f"{name}.jsonl" for name in
             ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train", "prompts_val")}
    pipeline = suite.write_configs(ROOT / "configs" / "demo", tmp_path / "run", files, "menu", 0, True,
                                   ["ppo:model.init_args.kl.coef=0.05", "reward:trainer.max_steps=7"], ["ppo"])
    derived = yaml.safe_load(pipeline.read_text())
    ppo = yaml.safe_load(Path(derived["ppo"]).read_text())["model"]["init_args"]
    assert ppo["reward_fn"] == "rlhf_lightning.tasks.menu.judge" and "reward_model" not in ppo
    assert ppo["kl"]["coef"] == 0.05
    assert yaml.safe_load(Path(derived["reward"]).read_text())["trainer"]["max_steps"] == 7
    assert derived["redo"] == ["ppo"]
