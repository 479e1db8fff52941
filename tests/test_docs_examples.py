"""The code examples of docs/subclassing.md run and do what the page says; docs/config.md
matches the code and the demo configs.

Every ```python block whose first line is ``# example: NAME`` is executed as it stands in the
page; each class is then trained for a step or an iteration on a tiny model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from rlhf_lightning import rlhf_math as pm
from rlhf_lightning.data import PromptDataModule, SFTDataModule
from rlhf_lightning.modules import PPOSettings
from rlhf_lightning.modules.sft import causal_lm_loss
from rlhf_lightning.generation import GenerationSettings
from rlhf_lightning.tasks import gold_rewards

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = DOCS / "subclassing.md"
EXPECTED = {"label_smoothing_sft", "gold_minus_length", "reward_to_go_advantages", "tsv_sft_data"}


def page_examples() -> dict[str, str]:
    """``{NAME: code}`` of the page's python blocks that start with ``# example: NAME``."""
    examples = {}
    for code in re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE):
        match = re.match(r"# example: (\S+)\n", code)
        if match:
            examples[match.group(1)] = code
    return examples


@pytest.fixture(scope="module")
def examples() -> dict[str, dict]:
    found = page_examples()
    assert set(found) == EXPECTED, f"examples in {PAGE.name}: {sorted(found)}"
    namespaces = {}
    for name, code in found.items():
        namespace = {"__name__": f"docs_example_{name}"}
        exec(compile(code, f"{PAGE}#{name}", "exec"), namespace)
        namespaces[name] = namespace
    return namespaces


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def ppo_kwargs(policy: Path) -> dict:
    return dict(policy=str(policy), learning_rate=1e-3, generation=GenerationSettings(max_new_tokens=8),
                ppo=PPOSettings(epochs=1, num_minibatches=2), max_iterations=1, policy_export_dir=None,
                critic_export_dir=None)


def fit_ppo(module) -> Trainer:
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, datamodule=PromptDataModule(batch_size=8, max_length=64))
    return trainer


def test_label_smoothing_sft(examples, monkeypatch):
    cls = examples["label_smoothing_sft"]["LabelSmoothingSFT"]
    assert "loss" in vars(cls) and "_step" not in vars(cls)  # the example uses the public hook
    modes = []
    original = cls.loss

    def counting(self, logits, labels):
        modes.append(self.training)
        return original(self, logits, labels)

    monkeypatch.setattr(cls, "loss", counting)
    seed_everything(0)
    module = cls(model_name_or_path="preset:micro-gpt2", label_smoothing=0.2, export_dir=None, num_samples=0)
    assert module.hparams.label_smoothing == 0.2  # the extra argument reaches hparams (and the CLI)
    datamodule = SFTDataModule(batch_size=4)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=datamodule)
    assert modes == [True, True] and trainer.global_step == 2  # _step called the override each step
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])
        plain = causal_lm_loss(logits, batch["labels"])
        smoothed = module.loss(logits, batch["labels"])  # train mode: smoothed
        assert torch.allclose(module._step(batch)[0], smoothed)  # _step's loss is the hook's
        module.eval()
        assert torch.allclose(module.loss(logits, batch["labels"]), plain)  # eval mode: the plain loss
        assert torch.allclose(module._step(batch)[0], plain)
    assert not torch.allclose(smoothed, plain)


def test_gold_minus_length_reward(examples, monkeypatch, byte_gpt2_dir: Path):
    cls = examples["gold_minus_length"]["GoldMinusLength"]
    seen = []
    original = cls.compute_scores

    def recording(self, responses):
        scores = original(self, responses)
        seen.append((responses, scores))
        return scores

    monkeypatch.setattr(cls, "compute_scores", recording)
    seed_everything(0)
    module = cls(length_penalty=0.05, **ppo_kwargs(byte_gpt2_dir))
    trainer = fit_ppo(module)
    assert len(seen) == 1
    responses, scores = seen[0]
    expected = torch.tensor(gold_rewards(responses.prompts, responses.completions)) - 0.05 * responses.response_mask.sum(1)
    assert torch.allclose(scores, expected)
    assert trainer.callback_metrics["objective/scores"].item() == pytest.approx(scores.mean().item(), abs=1e-5)
    assert torch.isfinite(trainer.callback_metrics["loss/policy_avg"])


def test_reward_to_go_advantages(examples, monkeypatch, byte_gpt2_dir: Path):
    namespace = examples["reward_to_go_advantages"]
    loop_cls, module_cls = namespace["RewardToGoRollout"], namespace["RewardToGoPPO"]
    assert "advantages" in vars(loop_cls) and "run" not in vars(loop_cls)  # the example uses the hook
    assert module_cls.rollout_loop_class is loop_cls and "rollout_loop" not in vars(module_cls)
    calls, batches = [], []
    original_advantages, original_run = loop_cls.advantages, loop_cls.run

    def recording_advantages(self, rewards, values, mask):
        calls.append(type(self))
        return original_advantages(self, rewards, values, mask)

    def recording_run(self, *args, **kwargs):
        batch = original_run(self, *args, **kwargs)
        batches.append(batch)
        return batch

    monkeypatch.setattr(loop_cls, "advantages", recording_advantages)
    monkeypatch.setattr(loop_cls, "run", recording_run)
    seed_everything(0)
    module = module_cls(reward_fn=gold_rewards, **ppo_kwargs(byte_gpt2_dir))
    trainer = fit_ppo(module)
    assert len(batches) == 1 and trainer.global_step == 2
    assert calls == [loop_cls]  # PPOModule built the example's loop, and run called its advantages
    batch = batches[0]
    mask = batch.response_mask
    to_go = torch.stack([batch.rewards[:, t:].sum(1) for t in range(mask.shape[1])], dim=1)
    assert torch.allclose(batch.advantages, pm.masked_whiten(to_go, mask), atol=1e-5)
    gae, gae_returns = pm.gae(batch.rewards, batch.values, mask, module.ppo.gamma, module.ppo.lam)
    assert not torch.allclose(batch.advantages, pm.masked_whiten(gae, mask), atol=1e-3)
    assert torch.allclose(batch.returns, gae_returns, atol=1e-5)  # the critic keeps the GAE returns
    assert trainer.callback_metrics["policy/first_ratio_dev"].item() < 1e-5
    assert torch.isfinite(trainer.callback_metrics["loss/policy_avg"])


def test_tsv_data_module(examples, tmp_path: Path):
    cls = examples["tsv_sft_data"]["TSVSFTDataModule"]
    rows = [("Review: The film was", " great."), ("Review: The plot was", " dull.")] * 3
    train = tmp_path / "sft.tsv"
    train.write_text("prompt\tcompletion\n" + "".join(f"{p}\t{c}\n" for p, c in rows), encoding="utf-8")
    datamodule = cls(train_file=str(train), tokenizer="preset:micro-gpt2", val_fraction=0.0, batch_size=2)
    datamodule.setup("fit")
    assert [r["completion"] for r in datamodule.train_records] == [c for _, c in rows]
    batch = next(iter(datamodule.train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompt masked, completion learned

    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\tcompletion\nReview: The film was\t\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"bad\.tsv:2"):
        cls(train_file=str(bad), tokenizer="preset:micro-gpt2").setup("fit")


def module_table(module: str) -> dict[str, tuple[str, str]]:
    """``key -> (default cell, demo cell)`` of the first table under ``## `{module}` `` in docs/config.md."""
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    section = text.split(f"## `{module}`", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.split("\n\n| Key", 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def cell_value(cell: str) -> object:
    """A table cell as YAML (``1e-05`` too, which YAML 1.1 reads as a string)."""
    import yaml

    value = yaml.safe_load(cell.strip("`"))
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@pytest.mark.parametrize("module, demo", [("SFTModule", "sft"), ("RewardModule", "reward"), ("PPOModule", "ppo")])
def test_config_reference_matches_the_code_and_the_demo_configs(module: str, demo: str):
    """docs/config.md lists every argument of each stage module with its real default and the
    value the demo YAML sets (an empty demo cell: the demo keeps the default)."""
    import dataclasses
    import inspect

    import yaml

    from rlhf_lightning import modules

    parameters = {name: p.default for name, p in inspect.signature(getattr(modules, module).__init__).parameters.items()
                  if name != "self" and not dataclasses.is_dataclass(p.default)}
    table = module_table(module)
    assert set(table) == set(parameters)
    demo_args = yaml.safe_load((DOCS.parent / "configs" / "demo" / f"{demo}.yaml").read_text())["model"]["init_args"]
    for key, (default_cell, demo_cell) in table.items():
        default = parameters[key]
        assert cell_value(default_cell) == (list(default) if isinstance(default, tuple) else default), key
        if key in demo_args and demo_args[key] != default:
            assert cell_value(demo_cell) == demo_args[key], key


def test_every_ppo_setting_has_a_one_line_meaning_that_help_shows(capsys):
    """Each field of the settings tables has its line in the class docstring (the ``Args:``
    section jsonargparse reads), and ``fit --model.help`` prints it beside the option."""
    import dataclasses

    from docstring_parser import parse

    from rlhf_lightning.cli import main
    from rlhf_lightning.generation import GenerationSettings
    from rlhf_lightning.ppo_settings import ImplicitRewardSettings, KLSettings, PPOSettings, ScoreSettings

    for cls in (GenerationSettings, PPOSettings, KLSettings, ScoreSettings, ImplicitRewardSettings):
        documented = {p.arg_name: p.description for p in parse(cls.__doc__).params}
        for field in dataclasses.fields(cls):
            assert documented.get(field.name), f"{cls.__name__}.{field.name} has no line in the docstring"
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "rlhf_lightning.modules.PPOModule"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--model.ppo.cliprange CLIPRANGE epsilon of the clipped policy ratio" in shown
    assert "--model.generation.max_new_tokens MAX_NEW_TOKENS the longest response in tokens" in shown
    assert "--model.max_iterations MAX_ITERATIONS how long PPO runs, in PPO iterations" in shown
