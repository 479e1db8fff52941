"""The DPO stage: response log-probs, the first step, a short fit with its export, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.encoding import PreferenceCollator, encode_preference
from rlhf_lightning.models import is_complete_hf_folder
from rlhf_lightning.modules import DPOModule

from .conftest import write_lines

ROOT = Path(__file__).resolve().parents[1]
LOG2 = math.log(2.0)
GOOD = [" great. I loved the plot.", " wonderful and fun.", " good. The music was lovely."]
BAD = [" awful. I hated the acting.", " boring and dull.", " bad bad bad bad."]


def dpo_pairs(n: int) -> list[dict]:
    return [{"prompt": "Review: The movie was", "chosen": GOOD[i % 3], "rejected": BAD[i % 3]} for i in range(n)]


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_response_logps_are_the_response_tokens_for_both_padding_sides(byte_gpt2_dir: Path, loss_type: str):
    module = DPOModule(str(byte_gpt2_dir), loss_type=loss_type, export_dir=None)
    module.configure_model()
    tokenizer = module.tokenizer
    records = [{"prompt": "Review: The movie was", "chosen": " fun.", "rejected": " dull and long."},
               {"prompt": "Review: x", "chosen": " a long and winding review.", "rejected": " ok."}]
    pairs = [encode_preference(r, tokenizer, 64) for r in records]
    with torch.no_grad():
        right, left = (module.response_logps(module.model, PreferenceCollator(tokenizer.pad_token_id, side)(pairs))
                       for side in ("right", "left"))
        # Each row alone, unpadded, with a plain forward: log softmax at the positions that
        # predict the response's tokens (EOS included), summed (IPO: averaged).
        expected = []
        for side in ("chosen", "rejected"):
            for record, pair in zip(records, pairs):
                ids = torch.tensor([pair[side]])
                logprobs = module.model(input_ids=ids).logits.log_softmax(-1)[0]
                n = len(tokenizer(record[side], add_special_tokens=False)["input_ids"]) + 1
                start = ids.shape[1] - n
                token_logps = [logprobs[i - 1, ids[0, i]] for i in range(start, ids.shape[1])]
                total = sum(token_logps)
                expected.append(total / n if loss_type == "ipo" else total)
    torch.testing.assert_close(right, torch.stack(expected), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "beta", "expected_loss"),
    [
        ("sigmoid", 0.0, 0.1, LOG2),
        ("sigmoid", 0.2, 0.1, LOG2),  # 0.8 log 2 + 0.2 log 2
        ("robust", 0.2, 0.1, LOG2),  # (0.8 log 2 - 0.2 log 2) / 0.6
        ("ipo", 0.0, 0.1, 25.0),  # (0 - 1 / (2 * 0.1))^2
    ],
)
def test_first_step_implicit_rewards_are_zero_and_loss_is_log2(
    tmp_path: Path, byte_gpt2_dir: Path, loss_type: str, label_smoothing: float, beta: float, expected_loss: float
):
    train = write_lines(tmp_path / "train.jsonl", dpo_pairs(6))
    module = DPOModule(str(byte_gpt2_dir), loss_type=loss_type, label_smoothing=label_smoothing, beta=beta, export_dir=None)
    data = PreferenceDataModule(train_file=str(train), val_fraction=0.0, batch_size=6)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics  # logged by the one (first) training step
    assert metrics["train/loss"].item() == pytest.approx(expected_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert metrics["rewards/accuracies"].item() == 0.5  # every pair a tie
    assert metrics["logps/chosen"].item() < 0 and metrics["logps/rejected"].item() < 0


def test_fit_lowers_the_loss_keeps_the_reference_and_exports(tmp_path: Path, byte_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", dpo_pairs(24))
    export = tmp_path / "dpo-model"
    module = DPOModule(str(byte_gpt2_dir), beta=0.5, learning_rate=3e-3, warmup_steps=2, export_dir=str(export))
    data = PreferenceDataModule(train_file=str(train), val_fraction=0.25, batch_size=6, padding_side="left")
    trainer = quiet_trainer(max_steps=12, val_check_interval=12, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["val/loss"].item() < LOG2 - 0.2  # log 2 at the start
    assert metrics["val/rewards/accuracies"].item() == 1.0
    assert metrics["val/rewards/chosen"].item() > metrics["val/rewards/rejected"].item()
    assert metrics["val/rewards/margins"].item() > 0.1  # a learned margin, not the start's 0

    # The reference is the untouched initial model, frozen and out of the checkpoint.
    initial = AutoModelForCausalLM.from_pretrained(byte_gpt2_dir)
    reference = module._reference[0]
    assert not any(p.requires_grad for p in reference.parameters())
    for name, weight in initial.state_dict().items():
        torch.testing.assert_close(reference.state_dict()[name], weight, msg=name)
    assert not any(key.startswith("_reference") for key in module.state_dict())

    # The export is the trained policy, loadable by plain transformers.
    assert is_complete_hf_folder(export)
    exported = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(module.response_logps(exported, batch), module.response_logps(module.model, batch))
        assert not torch.allclose(module.response_logps(exported, batch), module.response_logps(reference, batch))
    assert tokenizer.pad_token_id == module.tokenizer.pad_token_id


def _config(tmp_path: Path, model: Path, train: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo/dpo.yaml").read_text())
    config["trainer"].update(max_steps=2, val_check_interval=2, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    config["model"]["init_args"].update(model_name_or_path=str(model), export_dir=str(tmp_path / "export"))
    config["data"]["init_args"].update(train_file=str(train), val_fraction=0.25, batch_size=4, val_batch_size=4)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_runs_the_demo_config(tmp_path: Path, byte_gpt2_dir: Path):
    config = _config(tmp_path, byte_gpt2_dir, write_lines(tmp_path / "train.jsonl", dpo_pairs(8)))
    assert main(["fit", "--config", str(config)]) == 0
    assert is_complete_hf_folder(tmp_path / "export")
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert list((tmp_path / "runs" / "dpo").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("loss_type", "hinge", "unknown DPO loss 'hinge'; expected one of sigmoid, ipo, robust"),
        ("label_smoothing", "0.5", "must be in [0, 0.5), got 0.5"),
        ("beta", "0", "must be > 0, got 0.0"),
    ],
)
def test_cli_bad_setting_is_one_line_naming_the_key(tmp_path: Path, byte_gpt2_dir: Path, capsys, key: str, value: str, message: str):
    config = _config(tmp_path, byte_gpt2_dir, write_lines(tmp_path / "train.jsonl", dpo_pairs(8)))
    assert main(["fit", "--config", str(config), f"--model.init_args.{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: model.init_args.{key}: {message}"]
    assert not (tmp_path / "export").exists()


def test_a_preset_policy_is_its_own_reference():
    """A preset is drawn at random: DPO's reference is a frozen copy of the policy as loaded, so
    the first step's implicit rewards are 0, not the gap between two random models."""
    module = DPOModule(model_name_or_path="preset:micro-gpt2", export_dir=None)
    module.configure_model()
    policy, reference = module.model.state_dict(), module.reference.state_dict()
    assert policy.keys() == reference.keys() and all(torch.equal(policy[k], reference[k]) for k in policy)
    assert not any(p.requires_grad for p in module.reference.parameters())
