"""The bad-input matrix of docs/reliability.md: one test (or parameter) per row, run through the
real ``rlhf-lightning`` entry point with tiny configs.

Each row checks what the user sees: the exit status or exception, that the message names the
file, line and field (or the config key / folder) and gives a hint, and that nothing already
written is lost. The parameter ids are the row names of the table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning.pytorch import Callback
from transformers import PreTrainedModel

from rlhf_lightning.cli import RLHFCLI, main
from rlhf_lightning.records import read_preferences, read_prompts, read_sft, write_jsonl
from rlhf_lightning.models import (
    byte_tokenizer,
    is_complete_hf_folder,
    load_sequence_scorer,
    load_tokenizer,
    save_hf_folder,
)
from rlhf_lightning.modules.export import ExportBusyError, FolderLock

from .conftest import bpe_tokenizer_without_pad, save_tiny_gpt2, write_lines

MODEL = "preset:micro-gpt2"
TRAINER = dict(fast_dev_run=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)


def constant_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward callable for the PPO rows that must get past scoring."""
    return [1.0] * len(completions)


def raising_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward callable with a bug: the 'reward-fn-raises' row."""
    raise KeyError("sentiment")


def stage_config(tmp_path: Path, stage: str, train_file: Path | None = None, model: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None) -> Path:
    """Write a tiny ``fit`` config of ``stage`` (sft, reward or ppo) and return its path."""
    export = str(tmp_path / "export")
    if stage == "sft":
        module = dict(class_path="rlhf_lightning.modules.SFTModule",
                      init_args=dict(model_name_or_path=MODEL, export_dir=export, num_samples=0, warmup_steps=0))
        datamodule = "rlhf_lightning.data.SFTDataModule"
    elif stage == "reward":
        module = dict(class_path="rlhf_lightning.modules.RewardModule",
                      init_args=dict(model_name_or_path=MODEL, export_dir=export, normalize=False, warmup_steps=0))
        datamodule = "rlhf_lightning.data.PreferenceDataModule"
    else:
        module = dict(class_path="rlhf_lightning.modules.PPOModule",
                      init_args=dict(policy=MODEL, reward_fn=f"{__name__}.constant_reward", max_iterations=1,
                                     policy_export_dir=export, critic_export_dir=str(tmp_path / "critic"),
                                     generation=dict(max_new_tokens=4), ppo=dict(epochs=1, num_minibatches=1)))
        datamodule = "rlhf_lightning.data.PromptDataModule"
    module["init_args"].update(model or {})
    data_args = dict(train_file=str(train_file) if train_file else None, val_fraction=0.0, max_length=64, batch_size=2)
    config = dict(seed_everything=0, trainer={**TRAINER, "default_root_dir": str(tmp_path), **(trainer or {})}, model=module,
                  data=dict(class_path=datamodule, init_args={**data_args, **(data or {})}))
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_fit(config: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    """``rlhf-lightning fit --config config``: the exit status and the one ``error:`` line (or '')."""
    capsys.readouterr()
    status = main(["fit", "--config", str(config), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if status else 0), err
    return status, errors[0] if errors else ""


def snapshot(folder: Path) -> dict[str, str]:
    """File name -> content hash of every file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


GOOD_SFT = {"prompt": "Review:", "completion": " good."}
PREF = {"prompt": "Review:", "chosen": " great.", "rejected": " dull."}

# id: (stage, file content (records, or raw bytes), max_length, the parts the error line must contain)
DATA_ROWS = {
    "malformed-json": ("sft", [GOOD_SFT, "", '{"prompt": "a", "completion": "b"'], 64,
                       [":3: malformed JSON", "hint: each line must be one complete JSON object"]),
    "not-utf8": ("sft", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 64,
                 [":2: bytes that are not UTF-8", "hint: re-encode the file as UTF-8"]),
    "empty-file": ("sft", b"\n\n", 64, [": file holds no records", "hint:"]),
    "data-file-missing": ("sft", None, 64, [": file does not exist", "hint: check the path"]),
    "field-missing": ("sft", [GOOD_SFT, {"prompt": "a"}], 64, [":2: field 'completion': missing"]),
    "field-empty": ("sft", [{"prompt": "a", "completion": "  "}], 64, [":1: field 'completion': empty string"]),
    "field-not-string": ("reward", [PREF, {**PREF, "rejected": 3}], 64,
                         [":2: field 'rejected': expected a string, got int"]),
    "sft-data-to-reward": ("reward", [GOOD_SFT], 64,
                           [":1: field 'chosen': missing", "hint: this record looks like SFT data (for the SFT stage)",
                            'the reward stage reads preference pairs {"prompt", "chosen", "rejected"}']),
    "preference-data-to-sft": ("sft", [PREF], 64,
                               [":1: field 'completion': missing", "hint: this record looks like preference pairs",
                                "the SFT stage reads SFT data"]),
    "prompts-to-sft": ("sft", [{"prompt": "Review:"}], 64,
                       [":1: field 'completion': missing", "hint: this record looks like prompts (for the PPO stage)",
                        "the SFT stage reads SFT data"]),
    "prompts-to-reward": ("reward", [{"prompt": "Review:"}], 64,
                          [":1: field 'chosen': missing", "hint: this record looks like prompts",
                           "the reward stage reads preference pairs"]),
    "sft-data-to-ppo": ("ppo", [{"text": "Review: good."}], 64,
                        [":1: field 'prompt': missing", "hint: this record looks like SFT data",
                         "the PPO stage reads prompts"]),
    "chat-prompts-to-sft": ("sft", [{"messages": [{"role": "user", "content": "Write a review."}]}], 64,
                            [":1: field 'messages': no assistant turn to learn from",
                             "hint: this record looks like prompts (for the PPO stage)"]),
    "fewer-prompts-than-a-batch": ("ppo", [{"prompt": "Review:"}], 64,
                                   [": 1 prompts, fewer than one PPO batch (data.init_args.batch_size=2",
                                    "hint: add prompts or lower batch_size"]),
    "prompts-too-long-all": ("sft", [{"prompt": "p" * 20, "completion": " x"}] * 2, 8,
                             [": no usable record after truncation to max_length=8",
                              "hint: raise data.init_args.max_length"]),
    "json-array": ("sft", (json.dumps([GOOD_SFT, GOOD_SFT]) + "\n").encode(), 64,
                   [":1: the file is a JSON array; expected JSON Lines, one object per line",
                    "hint: convert it, e.g. jq -c '.[]' file.json > file.jsonl"]),
    "json-array-indented": ("reward", ("\n" + json.dumps([PREF, PREF], indent=2) + "\n").encode(), 64,
                            [":2: the file is a JSON array; expected JSON Lines"]),
    "chat-prompt-blank-user": ("ppo", [{"prompt": "Review:"},
                                       {"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": " \n "}]}], 64,
                               [":2: field 'messages[1].content': empty string (a user turn with no text to answer)"]),
    "chat-prompt-empty-user": ("ppo", [{"prompt": [{"role": "user", "content": ""}]}], 64,
                               [":1: field 'prompt[0].content': empty string"]),
}


@pytest.mark.parametrize("row", list(DATA_ROWS))
def test_bad_data_file(row: str, tmp_path: Path, capsys):
    stage, content, max_length, parts = DATA_ROWS[row]
    path = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write_lines(path, content)
    before = path.read_bytes() if path.exists() else None
    config = stage_config(tmp_path, stage, path, data=dict(max_length=max_length),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    status, error = run_fit(config, capsys)
    assert status == 2
    assert error.startswith(f"error: {path}")  # the file, first
    for part in parts:
        assert part in error, (part, error)
    assert (path.read_bytes() if path.exists() else None) == before  # the input is never touched
    assert not (tmp_path / "export").exists()  # stopped before anything was written


def test_prompts_too_long_some(tmp_path: Path, capsys):
    """Records whose prompt fills ``max_length`` are dropped with one warning naming the file."""
    path = write_lines(tmp_path / "data.jsonl", [{"prompt": "p" * 20, "completion": " x"}, GOOD_SFT, GOOD_SFT])
    config = stage_config(tmp_path, "sft", path, data=dict(max_length=12))
    with pytest.warns(UserWarning, match=rf"{path}: dropped 1 of 3 records .* max_length=12"):
        status, _ = run_fit(config, capsys)
    assert status == 0


def test_chosen_equals_rejected(tmp_path: Path):
    """Works: the pair's loss is log 2 (both rows score the same), and one warning counts them."""
    path = write_lines(tmp_path / "data.jsonl", [{"prompt": "Review:", "chosen": " same.", "rejected": " same."}] * 2)
    config = stage_config(tmp_path, "reward", path)
    with pytest.warns(UserWarning, match=rf"{path}: 2 of 2 records have chosen == rejected"):
        cli = RLHFCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.callback_metrics["train/loss"].item() == pytest.approx(math.log(2), abs=1e-5)


def folder_without_tokenizer(tmp_path: Path) -> Path:
    """A model folder holding config and weights but no tokenizer files."""
    folder = save_tiny_gpt2(tmp_path / "no-tokenizer", byte_tokenizer())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("row", ["model-folder-missing", "model-folder-without-tokenizer"])
def test_bad_model_folder(row: str, tmp_path: Path, capsys):
    folder = tmp_path / "does-not-exist" if row == "model-folder-missing" else folder_without_tokenizer(tmp_path)
    before = snapshot(folder) if folder.exists() else {}
    config = stage_config(tmp_path, "sft", write_lines(tmp_path / "data.jsonl", [GOOD_SFT]),
                          model=dict(model_name_or_path=str(folder)))
    status, error = run_fit(config, capsys)
    assert status == 2
    expected = "does not exist; hint: run the previous stage first" if row == "model-folder-missing" else (
        "has no tokenizer files; hint: save the tokenizer next to the weights")
    assert f"error: model folder '{folder}' {expected}" in error
    assert (snapshot(folder) if folder.exists() else {}) == before


def test_different_tokenizers(tmp_path: Path, capsys):
    """A reward model with another tokenizer than the policy's works (responses are re-tokenized);
    the deeper check is tests/test_ppo.py::test_reward_model_with_other_tokenizer_works."""
    lm = save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad())
    tokenizer = load_tokenizer(str(lm))
    reward_model = save_hf_folder(tmp_path / "bpe-rm", load_sequence_scorer(str(lm), tokenizer), tokenizer)
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Review: The movie was"}] * 2)
    config = stage_config(tmp_path, "ppo", prompts, model=dict(reward_fn=None, reward_model=str(reward_model)))
    assert run_fit(config, capsys) == (0, "")


def test_reward_fn_raises(tmp_path: Path, capsys):
    """A reward callable that raises stops the run naming the callable; its own traceback is kept
    (chained), since it is the user's code that needs fixing."""
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Review: The movie was"}] * 2)
    config = stage_config(tmp_path, "ppo", prompts, model=dict(reward_fn=f"{__name__}.raising_reward"),
                          trainer=dict(fast_dev_run=False, max_steps=2))
    with pytest.raises(RuntimeError, match=r"reward function raising_reward failed: 'sentiment'") as caught:
        main(["fit", "--config", str(config)])
    assert isinstance(caught.value.__cause__, KeyError)
    assert not (tmp_path / "export").exists() and not (tmp_path / "critic").exists()


@pytest.mark.parametrize("key", ["model.init_args.learning_rte", "data.init_args.max_lenght", "trainer.max_step"])
def test_misspelt_config_key(key: str, tmp_path: Path, capsys):
    """jsonargparse rejects the key before anything runs; its usage text is long, but names the key."""
    config = yaml.safe_load(stage_config(tmp_path, "sft").read_text())
    *parents, leaf = key.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[leaf] = 1
    path = tmp_path / "misspelt.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--config", str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert leaf in err.split("error:", 1)[1]  # named in the error itself, not only in the usage
    assert not (tmp_path / "export").exists()


EXPORT_KEYS = {"sft": "export_dir", "reward": "export_dir", "ppo": "policy_export_dir"}
STAGE_DATA = {"sft": [GOOD_SFT] * 2, "reward": [PREF] * 2, "ppo": [{"prompt": "Hi"}] * 2}  # enough for one step


@pytest.mark.parametrize("stage", list(EXPORT_KEYS), ids=[f"export-dir-finished-{s}" for s in EXPORT_KEYS])
def test_finished_export_is_refused(stage: str, tmp_path: Path, capsys):
    """A real fit (not a smoke run) into a finished stage's folder stops before training."""
    finished = save_tiny_gpt2(tmp_path / "export", byte_tokenizer())
    assert is_complete_hf_folder(finished)
    before = snapshot(finished)
    config = stage_config(tmp_path, stage, write_lines(tmp_path / "data.jsonl", STAGE_DATA[stage]),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    status, error = run_fit(config, capsys)
    assert status == 2
    key = EXPORT_KEYS[stage]
    assert error.startswith(f"error: model.init_args.{key}: '{finished}' already holds a finished model")
    assert "hint: delete the folder" in error and "overwrite_export: true" in error
    assert snapshot(finished) == before


def test_overwrite_export_replaces_finished_folder(tmp_path: Path, capsys):
    """``overwrite_export: true`` (what ``rlhf-lightning pipeline --redo`` passes) replaces it."""
    finished = save_tiny_gpt2(tmp_path / "export", byte_tokenizer(), seed=1)
    before = snapshot(finished)
    config = stage_config(tmp_path, "sft", write_lines(tmp_path / "data.jsonl", [GOOD_SFT] * 2),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    assert run_fit(config, capsys, "--model.init_args.overwrite_export=true") == (0, "")
    assert is_complete_hf_folder(finished) and snapshot(finished) != before


def test_jsonl_with_utf8_bom_loads(tmp_path: Path):
    """A BOM that an editor wrote before the first line is skipped; line numbers stay right."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_SFT).encode() + b"\n" + json.dumps(GOOD_SFT).encode() + b"\n")
    assert read_sft(path) == [GOOD_SFT, GOOD_SFT]
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: bytes that are not UTF-8"):
        read_sft(path)


SEPARATORS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c\r"


def test_line_separators_inside_strings_round_trip(tmp_path: Path):
    """``write_jsonl`` keeps U+2028, U+0085 ... unescaped inside strings; they are no line end."""
    text = "".join(f"a{c}b" for c in SEPARATORS)
    files = {
        read_sft: [{"prompt": text, "completion": text}, {"text": text}],
        read_preferences: [{"prompt": text, "chosen": text + "!", "rejected": text}],
        read_prompts: [{"prompt": text}, {"messages": [{"role": "user", "content": text}]}],
    }
    for read, records in files.items():
        path = write_jsonl(tmp_path / f"{read.__name__}.jsonl", records)
        assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, so the reader must cope
        assert read(path) == records


def test_causal_lm_as_reward_model(tmp_path: Path, capsys):
    """An SFT export (a causal LM) as PPO's reward_model would score with a random head: refused."""
    sft = save_tiny_gpt2(tmp_path / "sft", byte_tokenizer())
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Review: The movie was"}] * 2)
    config = stage_config(tmp_path, "ppo", prompts, model=dict(reward_fn=None, reward_model=str(sft)),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    status, error = run_fit(config, capsys)
    assert status == 2
    assert error.startswith(
        f"error: model.init_args.reward_model: '{sft}' is not a trained reward model (it holds GPT2LMHeadModel, "
        "whose score.weight would start at random); hint: give the reward stage's export folder")
    assert not (tmp_path / "export").exists()


# id: (stage, model init_args, data init_args, the error line after "error: ")
SETTING_ROWS = {
    "max-new-tokens-0": ("ppo", dict(generation=dict(max_new_tokens=0)), {},
                         "model.init_args.generation.max_new_tokens must be >= 1, got 0"),
    "temperature-0": ("ppo", dict(generation=dict(max_new_tokens=4, temperature=0.0)), {},
                      "model.init_args.generation.temperature must be > 0, got 0.0"),
    "ppo-epochs-0": ("ppo", dict(ppo=dict(epochs=0)), {}, "model.init_args.ppo.epochs must be >= 1, got 0"),
    "ppo-num-minibatches-0": ("ppo", dict(ppo=dict(num_minibatches=0)), {},
                              "model.init_args.ppo.num_minibatches must be >= 1, got 0"),
    "ppo-cliprange-negative": ("ppo", dict(ppo=dict(cliprange=-0.2)), {},
                               "model.init_args.ppo.cliprange must be >= 0, got -0.2"),
    "kl-coef-negative": ("ppo", dict(kl=dict(coef=-0.05)), {}, "model.init_args.kl.coef must be >= 0, got -0.05"),
    "batch-size-0": ("sft", {}, dict(batch_size=0), "data.init_args.batch_size must be >= 1, got 0"),
    "val-batch-size-0": ("reward", {}, dict(val_batch_size=0), "data.init_args.val_batch_size must be >= 1, got 0"),
    "max-length-0": ("ppo", {}, dict(max_length=0), "data.init_args.max_length must be >= 1, got 0"),
}


@pytest.mark.parametrize("row", list(SETTING_ROWS))
def test_bad_setting(row: str, tmp_path: Path, capsys):
    """Refused when the config is turned into objects, before any data or model is read."""
    stage, model, data, message = SETTING_ROWS[row]
    config = stage_config(tmp_path, stage, tmp_path / "not-read.jsonl", model=model, data=data,
                          trainer=dict(fast_dev_run=False, max_steps=1))
    assert run_fit(config, capsys) == (2, f"error: {message}")
    assert not (tmp_path / "export").exists()


def test_disk_full_during_export(tmp_path: Path, capsys, monkeypatch):
    """ENOSPC while writing the export: one line naming the folder; the previous model survives
    and nothing half-written is left behind."""
    finished = save_tiny_gpt2(tmp_path / "export", byte_tokenizer(), seed=1)
    before = snapshot(finished)

    def save_until_full(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_until_full)
    config = stage_config(tmp_path, "sft", write_lines(tmp_path / "data.jsonl", [GOOD_SFT] * 2),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    status, error = run_fit(config, capsys, "--model.init_args.overwrite_export=true")
    assert status == 2
    assert error.startswith(f"error: could not write the model folder '{finished}': No space left on device; "
                            "what was there before is left as it was; hint: free disk space")
    assert snapshot(finished) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no .tmp-*, no lock


@pytest.mark.parametrize("stage", list(EXPORT_KEYS), ids=[f"export-dir-in-use-{s}" for s in EXPORT_KEYS])
def test_export_folder_in_use_is_refused(stage: str, tmp_path: Path, capsys):
    """A second fit into a folder that another run is writing stops at setup, naming the folder."""
    folder = tmp_path / "export"
    holder = FolderLock(folder)
    holder.acquire()
    config = stage_config(tmp_path, stage, write_lines(tmp_path / "data.jsonl", STAGE_DATA[stage]),
                          trainer=dict(fast_dev_run=False, max_steps=1))
    try:
        status, error = run_fit(config, capsys)
    finally:
        holder.release()
    assert status == 2
    key = EXPORT_KEYS[stage]
    assert error == (f"error: model.init_args.{key}: '{folder}' is being written by another run (pid {os.getpid()}); "
                     f"hint: wait for that run to end, or choose another {key}")
    assert not folder.exists()


def test_folder_lock_is_exclusive_and_released(tmp_path: Path, capsys):
    """Two locks on one folder conflict even in one process; a fit holds its lock until it ends."""
    folder = tmp_path / "export"
    first, second = FolderLock(folder), FolderLock(f"{folder}/")  # the same folder, spelt two ways
    first.acquire()
    with pytest.raises(ExportBusyError, match=rf"model\.init_args\.export_dir: '.*export/' is being written by another "
                                              rf"run \(pid {os.getpid()}\)"):
        second.acquire()
    first.release()
    second.acquire()  # free again once released
    second.release()
    assert not (tmp_path / ".export.lock").exists()

    callback = dict(class_path=f"{__name__}.CheckFolderLocked", init_args=dict(folder=str(folder)))
    config = stage_config(tmp_path, "sft", write_lines(tmp_path / "data.jsonl", [GOOD_SFT] * 2),
                          trainer=dict(fast_dev_run=False, max_steps=1, callbacks=[callback]))
    cli = RLHFCLI(args=["fit", "--config", str(config)])
    assert [c.locked for c in cli.trainer.callbacks if isinstance(c, CheckFolderLocked)] == [True]
    assert is_complete_hf_folder(folder) and not (tmp_path / ".export.lock").exists()
    first.acquire()  # released when the fit ended
    first.release()


class CheckFolderLocked(Callback):
    """Records whether ``folder`` is locked (by the running fit) when training ends."""

    def __init__(self, folder: str) -> None:
        self.folder, self.locked = folder, False

    def on_train_end(self, trainer, pl_module) -> None:
        with pytest.raises(ExportBusyError):
            FolderLock(self.folder).acquire()
        self.locked = True


class FinishFolderDuringFit(Callback):
    """Writes a finished model to ``folder`` when training ends: a run that took no lock."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        save_tiny_gpt2(Path(self.folder), byte_tokenizer(), seed=2)


def test_folder_finished_during_fit_is_not_replaced(tmp_path: Path, capsys):
    """The finished-model rule is checked again just before export, not only at the start."""
    folder = tmp_path / "export"
    callback = dict(class_path=f"{__name__}.FinishFolderDuringFit", init_args=dict(folder=str(folder)))
    config = stage_config(tmp_path, "sft", write_lines(tmp_path / "data.jsonl", [GOOD_SFT] * 2),
                          trainer=dict(fast_dev_run=False, max_steps=1, callbacks=[callback]))
    status, error = run_fit(config, capsys)
    assert status == 2
    assert error.startswith(f"error: model.init_args.export_dir: '{folder}' already holds a finished model")
    expected = save_tiny_gpt2(tmp_path / "expected", byte_tokenizer(), seed=2)
    assert snapshot(folder) == snapshot(expected)  # what the other run wrote, untouched
