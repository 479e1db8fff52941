"""benchmarks/suite.py derives every task's configs from one recipe: only data paths, output
folders, the seed and the judge may differ from the recipe."""

from __future__ import annotations

from pathlib import Path

import yaml

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_suite():
    return load_script(ROOT / "benchmarks" / "suite.py", "suite_benchmark")


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
    assert derived["dpo"] is None  # the SFT -> DPO path only for the dpo method
    for stage, (train, val) in suite.DATA.items():
        if stage == "dpo":
            continue
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


def load_methods():
    return load_script(ROOT / "benchmarks" / "methods.py", "methods_benchmark")


#: What a method's demo config may change in configs/demo/ppo.yaml: its estimator and what the
#: estimator needs (samples per prompt, fewer prompts per batch, the KL in the loss), its output
#: folders, and the critic's keys, which a critic-free method drops.
METHOD_KEYS = {"model.init_args.ppo.advantage_estimator", "model.init_args.ppo.samples_per_prompt",
               "data.init_args.batch_size", "model.init_args.kl.in_loss", "model.init_args.critic_export_dir",
               "model.init_args.policy_export_dir", "trainer.logger.init_args.name",
               "trainer.callbacks.0.init_args.dirpath"}
CRITIC_KEYS = {"model.init_args.critic_learning_rate", "model.init_args.ppo.vf_coef", "model.init_args.ppo.cliprange_value"}


def test_method_configs_differ_from_ppo_only_in_the_estimator():
    methods = load_methods()
    ppo = flatten(yaml.safe_load((ROOT / "configs" / "demo" / "ppo.yaml").read_text()))
    for method in methods.ESTIMATORS:
        mine = flatten(yaml.safe_load((ROOT / "configs" / "demo" / f"{method}.yaml").read_text()))
        changed = {k for k in set(ppo) | set(mine) if ppo.get(k, "absent") != mine.get(k, "absent")}
        assert changed <= METHOD_KEYS | CRITIC_KEYS, (method, changed - METHOD_KEYS - CRITIC_KEYS)
        per_iteration = mine["data.init_args.batch_size"] * mine.get("model.init_args.ppo.samples_per_prompt", 1)
        assert per_iteration == ppo["data.init_args.batch_size"], method  # the same episodes per iteration


def test_methods_share_the_first_methods_stages(tmp_path: Path):
    methods, suite = load_methods(), load_suite()
    first, other = tmp_path / "menu" / "seed0" / "ppo", tmp_path / "menu" / "seed0" / "grpo"
    for stage in ("tokenizer", "sft"):
        (first / stage).mkdir(parents=True)
    methods.link_shared_stages(first, other)
    assert (other / "sft").resolve() == (first / "sft").resolve() and (other / "tokenizer").is_symlink()
    assert not (other / "reward").exists()  # oracle runs have no reward stage to share
    files = {name: tmp_path / f"{name}.jsonl" for name in
             ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train", "prompts_val")}
    pipeline = suite.write_configs(ROOT / "configs" / "demo", other, files, "menu", 0, False, [], [],
                                   ROOT / "configs" / "demo" / "grpo.yaml")
    ppo = yaml.safe_load(Path(yaml.safe_load(pipeline.read_text())["ppo"]).read_text())["model"]["init_args"]
    assert ppo["ppo"]["advantage_estimator"] == "grpo" and ppo["policy_export_dir"] == str(other / "grpo" / "policy")


def test_the_dpo_method_learns_from_the_reward_stages_pairs(tmp_path: Path):
    suite = load_suite()
    files = {name: tmp_path / f"{name}.jsonl" for name in
             ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train", "prompts_val")}
    run = tmp_path / "lists" / "seed0" / "dpo"
    pipeline = suite.write_configs(ROOT / "configs" / "demo", run, files, "lists", 0, False, [], [],
                                   dpo_config=ROOT / "configs" / "demo" / "dpo.yaml")
    derived = yaml.safe_load(pipeline.read_text())
    dpo, reward = (yaml.safe_load(Path(derived[stage]).read_text()) for stage in ("dpo", "reward"))
    assert dpo["data"]["init_args"]["train_file"] == reward["data"]["init_args"]["train_file"] == str(files["prefs_train"])
    recipe = flatten(yaml.safe_load((ROOT / "configs" / "demo" / "dpo.yaml").read_text()))
    changed = {k for k, v in flatten(dpo).items() if recipe.get(k, "absent") != v}
    assert changed == {"data.init_args.train_file", "data.init_args.val_file", "data.init_args.task",  # (seed 0: the recipe's)
                       "model.init_args.model_name_or_path", "model.init_args.export_dir",
                       "trainer.logger.init_args.save_dir", "trainer.callbacks.0.init_args.dirpath"}
    assert dpo["model"]["init_args"]["export_dir"] == str(run / "dpo" / "model") and "judge" not in dpo["model"]["init_args"]
