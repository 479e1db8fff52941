"""The SFT stage: loss masking, a short fit with export, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer

from rlhf_lightning.cli import main
from rlhf_lightning.data import IGNORE_INDEX, SFTDataModule
from rlhf_lightning.models import is_complete_hf_folder, load_causal_lm, load_tokenizer
from rlhf_lightning.modules import SFTModule
from rlhf_lightning.modules.sft import causal_lm_loss

from .conftest import write_lines

ROOT = Path(__file__).resolve().parents[1]


def test_loss_ignores_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])
    # Hand computation: positions 1 and 2 predict tokens 3 and 1; position 0 predicts a prompt token.
    expected = -(torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[1]) / 2
    assert torch.allclose(causal_lm_loss(logits, labels), expected)
    changed = logits.clone()
    changed[0, 0] += 100.0  # the prediction of a prompt token: must not matter
    changed[0, 3] += 100.0  # the last position predicts nothing
    assert torch.allclose(causal_lm_loss(changed, labels), expected)


def _records(n: int) -> list[dict]:
    return [{"prompt": "Review: it was", "completion": " good. I liked the plot."} for _ in range(n)]


def test_fit_learns_and_exports_a_loadable_folder(tmp_path: Path, bpe_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", _records(32))
    export = tmp_path / "sft-model"
    def make_module() -> SFTModule:
        return SFTModule(model_name_or_path=str(bpe_gpt2_dir), learning_rate=1e-2, warmup_steps=2,
                         export_dir=str(export), num_samples=2, sample_max_new_tokens=8)

    data = SFTDataModule(train_file=str(train), val_fraction=0.25, batch_size=8, max_length=64)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(make_module(), datamodule=data)
    before = trainer.callback_metrics["val/loss"].item()
    module = make_module()
    trainer = Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      gradient_clip_val=1.0, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < 0.5 * before
    assert 0.0 <= trainer.callback_metrics["val/token_accuracy"].item() <= 1.0
    assert torch.isclose(trainer.callback_metrics["val/perplexity"], torch.tensor(after).exp(), rtol=1e-3)
    assert is_complete_hf_folder(export)
    tokenizer = load_tokenizer(str(export))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the added pad token travelled
    reloaded = load_causal_lm(str(export), tokenizer).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(module.model.eval()(ids).logits, reloaded(ids).logits)


def _demo_config(tmp_path: Path, model: str, train: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo/sft.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    config["model"]["init_args"].update(model_name_or_path=model, tokenizer_name_or_path=None,
                                        export_dir=str(tmp_path / "export"))
    config["data"]["init_args"].update(train_file=str(train), val_fraction=0.25, batch_size=4)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_config_fast_dev_run_on_builtin_task(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The demo's preset reads a tokenizer that the tokenizer command writes first (as in README).
    assert main(["fit", "--config", str(ROOT / "configs/demo/sft.yaml"), "--trainer.fast_dev_run=true"]) == 2
    assert "rlhf-lightning tokenizer --output_dir outputs/demo/tokenizer" in capsys.readouterr().err
    assert main(["tokenizer", "--output_dir", "outputs/demo/tokenizer"]) == 0
    assert main(["fit", "--config", str(ROOT / "configs/demo/sft.yaml"), "--trainer.fast_dev_run=true"]) == 0
    assert not (tmp_path / "outputs/demo/sft/model").exists()  # smoke runs never export


def test_cli_runs_user_jsonl_with_local_model(tmp_path: Path, byte_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", _records(16))
    config = _demo_config(tmp_path, str(byte_gpt2_dir), train)
    assert main(["fit", "--config", str(config), "--trainer.max_steps=3", "--trainer.val_check_interval=3"]) == 0
    assert is_complete_hf_folder(tmp_path / "export")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()  # Lightning checkpoints for resume
    events = list((tmp_path / "runs").rglob("events.out.tfevents*"))
    assert events, "TensorBoard is the default logger"


def test_print_config_round_trips(tmp_path: Path, byte_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", _records(8))
    config = _demo_config(tmp_path, str(byte_gpt2_dir), train)
    cmd = [sys.executable, "-m", "rlhf_lightning.cli", "fit", "--config"]
    first = subprocess.run(cmd + [str(config), "--print_config"], capture_output=True, text=True, check=True).stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    second = subprocess.run(cmd + [str(printed), "--print_config"], capture_output=True, text=True, check=True).stdout
    assert first == second
    assert "class_path: rlhf_lightning.modules.SFTModule" in first


def test_cli_reports_bad_data_without_traceback(tmp_path: Path, byte_gpt2_dir: Path, capsys):
    train = write_lines(tmp_path / "train.jsonl", _records(3) + [{"prompt": "x", "completion": 5}])
    config = _demo_config(tmp_path, str(byte_gpt2_dir), train)
    assert main(["fit", "--config", str(config), "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{train}:4: field 'completion': expected a string" in err
    assert "Traceback" not in err
    assert not (tmp_path / "export").exists()


def test_cli_reports_missing_model_folder(tmp_path: Path, capsys):
    train = write_lines(tmp_path / "train.jsonl", _records(3))
    config = _demo_config(tmp_path, str(tmp_path / "no-such-model"), train)
    assert main(["fit", "--config", str(config)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_task_command_writes_jsonl(tmp_path: Path):
    assert main(["task", "--out", str(tmp_path / "data")]) == 0
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == sorted(f"{k}_{s}.jsonl" for k in ("sft", "prefs", "prompts") for s in ("train", "val"))


def test_the_model_trains_in_training_mode_so_gradient_checkpointing_is_on(tmp_path: Path, bpe_gpt2_dir: Path):
    """``from_pretrained`` returns a model in eval mode and Lightning keeps it; transformers only
    checkpoints in training mode, so without ``train()`` gradient checkpointing is silently off."""
    from lightning.pytorch import Callback

    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.model.training, pl_module.model.transformer.gradient_checkpointing))

    train = write_lines(tmp_path / "train.jsonl", _records(16))
    module = SFTModule(model_name_or_path=str(bpe_gpt2_dir), gradient_checkpointing=True, warmup_steps=0,
                       export_dir=None)
    data = SFTDataModule(train_file=str(train), val_fraction=0.25, batch_size=4, max_length=64)
    Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[Record()]).fit(module, datamodule=data)
    assert seen == [(True, True), (True, True)]
