"""The package keeps library messages a user cannot act on off the terminal, for its own calls
only (rlhf_lightning/terminal.py); the pipeline's whole output is checked in test_pipeline.py."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from rlhf_lightning.cli import RLHFCLI, EpochProgressBar
from rlhf_lightning.generation import generate_responses, sampling_config
from rlhf_lightning.models import load_causal_lm, load_sequence_scorer, load_tokenizer, save_hf_folder
from rlhf_lightning.terminal import ATTENTION_MASK_ADVICE, ignoring_warnings


@contextmanager
def terminal_output() -> Iterator[tuple[list[str], list[warnings.WarningMessage]]]:
    """The log lines of Lightning and transformers and the Python warnings inside the block
    (the libraries' handlers may hold a stream from before the test's capture, which capfd
    would miss)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, loggers = Keep(), [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield lines, caught
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class EndFirstRow(LogitsProcessor):
    """Row 0 samples EOS at once: from then on it feeds back the pad token."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[0] = -float("inf")
        scores[0, self.eos] = 0.0
        return scores


def test_sampling_prompts_of_one_length_gives_no_attention_mask_advice():
    tokenizer = load_tokenizer("preset:micro-gpt2")
    model = load_causal_lm("preset:micro-gpt2", tokenizer)
    ids = torch.tensor([[10, 11, 12]] * 2)
    config, processors = sampling_config(tokenizer, 4), LogitsProcessorList([EndFirstRow(tokenizer.eos_token_id)])
    clear_once = getattr(logging.Logger.warning_once, "cache_clear", lambda: None)  # transformers warns once
    clear_once()
    with terminal_output() as (lines, _):
        generate_responses(model, ids, torch.ones_like(ids), config, logits_processor=processors)
    assert not any(ATTENTION_MASK_ADVICE in line for line in lines)
    clear_once()
    with terminal_output() as (lines, _):  # the case is real: transformers' own call advises
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                       logits_processor=processors)
    assert any(ATTENTION_MASK_ADVICE in line for line in lines)


def test_export_and_a_new_head_are_quiet_and_said_in_one_line(tmp_path: Path, capfd):
    tokenizer = load_tokenizer("preset:micro-gpt2")
    folder = save_hf_folder(tmp_path / "sft", load_causal_lm("preset:micro-gpt2", tokenizer), tokenizer)
    with terminal_output() as (lines, _):
        load_sequence_scorer(str(folder), tokenizer)
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert lines == [f"reward model: new scalar head on {folder} (score.weight)"]
    # the user's own transformers progress bars still show
    list(hf_logging.tqdm(range(2), desc="a bar of the user's"))
    assert "a bar of the user's" in capfd.readouterr().err


def test_a_load_missing_more_than_the_head_keeps_transformers_report(tmp_path: Path):
    tokenizer = load_tokenizer("preset:micro-gpt2")
    model = load_causal_lm("preset:micro-gpt2", tokenizer)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.h.1.")}
    folder = save_hf_folder(tmp_path / "partial", model, tokenizer, state_dict=state)
    with terminal_output() as (lines, _):
        load_sequence_scorer(str(folder), tokenizer, role="critic")
    assert any("transformer.h.1." in line for line in lines)  # transformers' report, let through
    assert not any("new scalar head" in line for line in lines)


def test_warning_rules_remove_exactly_what_they_added():
    rule = ("a message of the package's", UserWarning, r"tests\.test_terminal\Z")
    warnings.filterwarnings("ignore", message="a message of the package's", category=UserWarning,
                            module=r"tests\.test_terminal\Z")  # the user's own identical filter
    users = warnings.filters[0]
    before = list(warnings.filters)
    try:
        with ignoring_warnings(rule, ("another one", UserWarning, r"tests\.test_terminal\Z")):
            assert len(warnings.filters) == len(before) + 1
        assert warnings.filters == before
    finally:
        warnings.filters.remove(users)


def test_epoch_progress_bar_reads_no_negative_epoch_limit():
    bar = EpochProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # max_steps alone bounds the run
    assert bar._get_train_description(3).strip() == "Epoch 3"
    bar._trainer = SimpleNamespace(max_epochs=2)
    assert bar._get_train_description(1).strip() == "Epoch 1/1"


CLI_ARGS = ["--model=rlhf_lightning.modules.SFTModule", "--model.model_name_or_path=preset:micro-gpt2",
            "--data=rlhf_lightning.data.SFTDataModule", "--trainer.logger=false"]


def test_cli_args_in_process_and_the_default_progress_bar(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning", "pipeline", "--config", "pipeline.yaml"])
    with terminal_output() as (_, caught):
        cli = RLHFCLI(args=CLI_ARGS, run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert sys.argv == ["rlhf-lightning", "pipeline", "--config", "pipeline.yaml"]  # given back
    assert type(cli.trainer.progress_bar_callback) is EpochProgressBar
    # a progress bar the config names, or none, is the user's choice
    cli = RLHFCLI(args=[*CLI_ARGS, "--trainer.callbacks=lightning.pytorch.callbacks.TQDMProgressBar"], run=False)
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    cli = RLHFCLI(args=[*CLI_ARGS, "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None


def test_the_package_spearman_metric_does_not_warn():
    from torchmetrics.regression import SpearmanCorrCoef

    from rlhf_lightning.terminal import spearman_corrcoef

    with terminal_output() as (_, caught):
        spearman_corrcoef()
    assert not [w for w in caught if "SpearmanCorrcoef" in str(w.message)]
    with terminal_output() as (_, caught):  # the user's own still warns
        SpearmanCorrCoef()
    assert [w for w in caught if "SpearmanCorrcoef" in str(w.message)]


def tiny_ppo(tmp_path: Path, policy_dir: Path):
    """A 3-iteration PPO module on the judge's reward and a data module of 4 prompts (2 batches a pass)."""
    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.generation import GenerationSettings
    from rlhf_lightning.modules import PPOModule, PPOSettings
    from rlhf_lightning.tasks import gold_rewards

    module = PPOModule(policy=str(policy_dir), reward_fn=gold_rewards, generation=GenerationSettings(max_new_tokens=4),
                       ppo=PPOSettings(epochs=1, num_minibatches=1), max_iterations=3, policy_export_dir=None,
                       critic_export_dir=None, health_guards=False)
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "review {i}:"}}\n' for i in range(4)))
    return module, PromptDataModule(train_file=str(tmp_path / "prompts.jsonl"), batch_size=2, max_length=32)


def test_ppo_has_one_progress_bar_over_its_iterations(tmp_path: Path, byte_gpt2_dir: Path):
    """PPO's bar counts iterations over the whole run (prompt passes do not restart it) and shows
    the score and KL."""
    from lightning.pytorch import Trainer

    seen = {}

    class Recording(EpochProgressBar):
        def on_train_end(self, trainer, pl_module):
            task = self.progress.tasks[self.train_progress_bar_id]
            seen.update(total=task.total, completed=task.completed, description=task.description.strip(),
                        metrics=self.get_metrics(trainer, pl_module))
            super().on_train_end(trainer, pl_module)

    module, data = tiny_ppo(tmp_path, byte_gpt2_dir)
    trainer = Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      num_sanity_val_steps=0, enable_model_summary=False, callbacks=[Recording()])
    with terminal_output():
        trainer.fit(module, datamodule=data)
    assert seen["total"] == 3 and seen["completed"] == 3 and seen["description"] == "PPO iteration"
    assert trainer.current_epoch >= 1  # the run crossed a pass over the prompts on one bar
    assert {"score", "kl"} <= set(seen["metrics"])


def test_a_ppo_fit_that_raises_leaves_no_warning_filter(tmp_path: Path, byte_gpt2_dir: Path):
    """The filters PPO adds for its fit go away when the fit raises too (Lightning calls the
    callbacks' teardown only after a fit that finished)."""
    import pytest
    from lightning.pytorch import Callback, Trainer

    class Fail(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen = list(warnings.filters)  # the package's filters are in place here
            raise RuntimeError("stop here")

    module, data = tiny_ppo(tmp_path, byte_gpt2_dir)
    fail = Fail()
    trainer = Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=False, callbacks=[fail])
    before = list(warnings.filters)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(module, datamodule=data)
    assert len(fail.seen) > len(before)  # they were added for the fit...
    assert warnings.filters == before  # ...and are gone after it raised
