"""The reward-model stage: BT loss, reading the reward, scoring API, fit + export, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torchmetrics.functional import spearman_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.encoding import attention_mask_for, encode_preference, pad
from rlhf_lightning.models import (
    is_complete_hf_folder,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
)
from rlhf_lightning.modules import RewardModule
from rlhf_lightning.forwards import at_last_token, hidden_states, position_ids_from_mask, score_sequences, sequence_rewards
from rlhf_lightning.rlhf_math import (
    bradley_terry_loss,
    last_token_index,
    likelihood_distillation_loss,
    pair_accuracy,
    token_log_likelihoods,
)
from rlhf_lightning.tasks import SentimentTask
from rlhf_lightning.tasks.sentiment import gold_score, judge

from .conftest import write_lines

ROOT = Path(__file__).resolve().parents[1]
LOG2 = math.log(2.0)


# --- the loss ------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -logsigmoid(x) = log(1 + exp(-x)):  x=2 -> log(1 + e^-2) = 0.126928;  x=0 -> log 2 = 0.693147
    # mean = (0.126928 + 0.693147) / 2 = 0.410038
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.410038, abs=1e-6)
    # margin [1, 0]: x = 2 - 0 - 1 = 1 -> log(1 + e^-1) = 0.313262;  (0.313262 + 0.693147) / 2 = 0.503204
    margin = torch.tensor([1.0, 0.0])
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(0.503204, abs=1e-6)
    # centering 0.1: (r_c + r_r)^2 = [4, 0], mean 2 -> + 0.1 * 2 = 0.2;  0.410038 + 0.2 = 0.610038
    assert bradley_terry_loss(chosen, rejected, centering_coef=0.1).item() == pytest.approx(0.610038, abs=1e-6)
    # both: 0.503204 + 0.2
    assert bradley_terry_loss(chosen, rejected, margin, 0.1).item() == pytest.approx(0.703204, abs=1e-6)
    # the loss only sees the difference; centering breaks the shift invariance
    shifted = bradley_terry_loss(chosen + 5, rejected + 5)
    assert shifted.item() == pytest.approx(0.410038, abs=1e-6)
    assert bradley_terry_loss(chosen + 5, rejected + 5, centering_coef=0.1) > bradley_terry_loss(chosen, rejected, centering_coef=0.1)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(chosen, rejected[:1])


def test_token_log_likelihoods_hand_computed():
    # Every position's logits are [0, 0] then [ln 3, 0]: p = (1/2, 1/2), then (3/4, 1/4).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]).expand(2, 3, 2)
    ids = torch.tensor([[0, 1, 0], [1, 0, 1]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # row 1 is left-padded: only token 2 is predicted
    logprobs, predicted = token_log_likelihoods(logits, ids, mask)
    # row 0: log p(1 | pos 0) = log 1/2, log p(0 | pos 1) = log 3/4
    # row 1: log p(1 | pos 1) = log 1/4; the pad's "prediction" of token 1 does not count
    assert predicted.tolist() == [[True, True], [False, True]]
    torch.testing.assert_close(logprobs[predicted], torch.tensor([-0.693147, -0.287682, -1.386294]), atol=1e-6, rtol=0)
    # right padding: the last position predicts a pad, which does not count either
    _, predicted = token_log_likelihoods(logits, ids, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert predicted.tolist() == [[True, False], [True, True]]


def test_likelihood_distillation_loss_hand_computed():
    counted = torch.tensor([[True, True, False]])
    # log-likelihoods [1, 3] (the uncounted 99 plays no part): mean 2, sd 1 -> targets [-1, 1]
    loss = likelihood_distillation_loss(torch.tensor([[0.0, 0.0, 50.0]]), torch.tensor([[1.0, 3.0, 99.0]]), counted)
    assert loss.item() == pytest.approx(1.0)
    # predictions [1, 1]: ((1 + 1)^2 + 0^2) / 2 = 2; the scale of the likelihoods does not matter
    loss = likelihood_distillation_loss(torch.ones(1, 3), torch.tensor([[-10.0, 30.0, 0.0]]), counted)
    assert loss.item() == pytest.approx(2.0)
    # standardised over the whole batch, not per row: [[1], [3]] -> [[-1], [1]]
    loss = likelihood_distillation_loss(torch.tensor([[-1.0], [0.0]]), torch.tensor([[1.0], [3.0]]), torch.ones(2, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.5)
    # no spread (or one position): every target is 0, no NaN; nothing counted: 0
    loss = likelihood_distillation_loss(torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[5.0, 5.0, 1.0]]), counted)
    assert loss.item() == pytest.approx(5.0)
    assert likelihood_distillation_loss(torch.tensor([[2.0]]), torch.tensor([[-7.0]]), torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(4.0)
    assert likelihood_distillation_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_likelihood_distillation_reaches_the_backbone_not_the_reference(bpe_gpt2_dir: Path):
    module = RewardModule(str(bpe_gpt2_dir), likelihood_distillation_coef=1.0, export_dir=None)
    module.configure_model()
    module.train()
    tokenizer = module.tokenizer
    sequences = _sequences(tokenizer)
    ids, mask = pad(sequences, tokenizer.pad_token_id), attention_mask_for(sequences)
    hidden = hidden_states(module.model, ids, mask)
    loss = module._likelihood_distillation(ids, mask, hidden)
    # The state after token i is paired with the reference's log-probability of token i.
    with torch.no_grad():
        reference_logits = module._reference[0](input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        targets, counted = token_log_likelihoods(reference_logits, ids, mask)
        head = module.likelihood_head
        torch.testing.assert_close(loss.detach(), likelihood_distillation_loss(head(hidden[:, 1:]).squeeze(-1), targets, counted))
        assert not torch.allclose(loss.detach(), likelihood_distillation_loss(head(hidden[:, :-1]).squeeze(-1), targets, counted))
    loss.backward()
    assert module.likelihood_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.base_model.parameters())
    reference = module._reference[0]
    assert not any(p.requires_grad for p in reference.parameters())
    # The reference is the initial model as a causal LM, and it stays out of the state dict.
    fresh = load_causal_lm(str(bpe_gpt2_dir), tokenizer)
    for name, weight in fresh.state_dict().items():
        torch.testing.assert_close(reference.state_dict()[name], weight, msg=name)
    assert not any(key.startswith("_reference") for key in module.state_dict())
    with pytest.raises(ValueError, match="likelihood_distillation_coef"):
        RewardModule(str(bpe_gpt2_dir), likelihood_distillation_coef=-1.0)


def test_equal_pairs_give_log2_and_finite_gradients(byte_gpt2_dir: Path):
    r = torch.tensor([0.3, -1.2, 4.0], requires_grad=True)
    loss = bradley_terry_loss(r, r.detach().clone())
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    # ties are half right, never "right": a constant reward model scores 0.5
    assert pair_accuracy(r.detach(), r.detach()).tolist() == [0.5, 0.5, 0.5]
    assert pair_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]
    # Through the module: a batch whose chosen and rejected rows are identical.
    module = RewardModule(str(byte_gpt2_dir), export_dir=None)
    module.configure_model()
    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 1]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "margin": torch.zeros(1)}
    loss, chosen, rejected = module._step(batch)
    assert loss.item() == pytest.approx(LOG2, abs=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.model.parameters() if p.grad is not None)


# --- reading the reward --------------------------------------------------------------------
def test_last_token_index_and_position_ids_follow_the_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 3, 4]
    assert position_ids_from_mask(mask).tolist() == [
        [0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 3, 4]
    ]
    empty_row = torch.tensor([[1, 1], [0, 0]])
    assert last_token_index(empty_row).tolist() == [1, 0]  # the index rule: 0 for a row with no token
    with pytest.raises(ValueError, match="without any real token"):  # reading a reward there is an error
        at_last_token(torch.zeros(2, 2, 3), empty_row)


def _scorer(folder: Path):
    tokenizer = load_tokenizer(str(folder))
    model = load_sequence_scorer(str(folder), tokenizer).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight)  # a head that is not ~0, so differences show
    return tokenizer, model


def _sequences(tokenizer) -> list[list[int]]:
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return [
        tokenizer("Review: The movie was great. I loved the plot.")["input_ids"] + [eos],
        tokenizer("Review: bad")["input_ids"] + [eos],
        [5, 6, pad_id, 7, eos],  # the pad id *inside* real text: only the mask may say what is padding
        [8, 9, 10, pad_id],  # ... and as the last real token
    ]


@pytest.mark.parametrize("fixture", ["byte_gpt2_dir", "llama_dir"])
def test_reward_is_read_at_last_real_token_for_both_padding_sides(request, fixture: str):
    tokenizer, model = _scorer(request.getfixturevalue(fixture))
    sequences = _sequences(tokenizer)
    with torch.no_grad():
        alone = torch.cat([sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences])
        right = sequence_rewards(model, pad(sequences, tokenizer.pad_token_id, "right"), attention_mask_for(sequences, "right"))
        left = sequence_rewards(model, pad(sequences, tokenizer.pad_token_id, "left"), attention_mask_for(sequences, "left"))
        # PPO's layout: left-padded prompt + right-padded response in one row
        both = sequence_rewards(
            model,
            torch.cat([torch.full((4, 2), tokenizer.pad_token_id), pad(sequences, tokenizer.pad_token_id)], 1),
            torch.cat([torch.zeros(4, 2, dtype=torch.long), attention_mask_for(sequences)], 1),
        )
    assert alone.std() > 0.1  # the rows really score differently
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)


def test_plain_gpt2_forward_is_wrong_with_left_padding(byte_gpt2_dir: Path):
    """Why position ids and mask-based pooling are needed: HF's own forward gets it wrong."""
    tokenizer, model = _scorer(byte_gpt2_dir)
    sequences = _sequences(tokenizer)[:2]
    ids, mask = pad(sequences, tokenizer.pad_token_id, "left"), attention_mask_for(sequences, "left")
    with torch.no_grad():
        ours = sequence_rewards(model, ids, mask)
        plain = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert not torch.allclose(ours[1], plain[1], atol=1e-3)  # the padded row


# --- the scoring API -------------------------------------------------------------------------
def test_score_sequences_chunks_applies_offset_and_restores_mode(byte_gpt2_dir: Path):
    tokenizer, model = _scorer(byte_gpt2_dir)
    sequences = _sequences(tokenizer) * 3  # 12 rows
    ids, mask = pad(sequences, tokenizer.pad_token_id, "left"), attention_mask_for(sequences, "left")
    model.train()
    whole = score_sequences(model, ids, mask, batch_size=64)
    assert model.training  # previous mode restored
    assert not whole.requires_grad and whole.shape == (12,)
    chunked = score_sequences(model, ids, mask, batch_size=5)  # 5 + 5 + 2 rows
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    model.config.reward_offset = 1.25
    torch.testing.assert_close(score_sequences(model, ids, mask, batch_size=5), whole - 1.25, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_sequences(model, ids, mask, apply_offset=False), whole, atol=1e-5, rtol=1e-5)
    model.eval()
    score_sequences(model, ids, mask)
    assert not model.training


# --- fit, export, reload ------------------------------------------------------------------------
def _pairs(n: int) -> list[dict]:
    good = [" great. I loved the plot.", " wonderful and fun.", " good. The music was lovely."]
    bad = [" awful. I hated the acting.", " boring and dull.", " bad bad bad bad."]
    return [{"prompt": "Review: The movie was", "chosen": good[i % 3], "rejected": bad[i % 3]} for i in range(n)]


DEMOS = [
    {"prompt": "Review: The movie was", "completion": " fine. The plot was okay."},
    {"prompt": "Review: The story was", "completion": " great and fun."},
    {"prompt": "Review: This movie is", "completion": " dull."},
]


@pytest.mark.parametrize("fixture", ["bpe_gpt2_dir", "llama_dir"])
def test_fit_learns_exports_and_plain_hf_reload_gives_same_scores(request, tmp_path: Path, fixture: str):
    source = request.getfixturevalue(fixture)
    train = write_lines(tmp_path / "train.jsonl", _pairs(24))
    demos = write_lines(tmp_path / "demos.jsonl", DEMOS)
    export = tmp_path / "reward-model"
    module = RewardModule(str(source), learning_rate=3e-3, warmup_steps=2, export_dir=str(export),
                          normalize_file=str(demos), score_batch_size=2)
    data = PreferenceDataModule(train_file=str(train), val_fraction=0.25, batch_size=6, padding_side="left")
    trainer = Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["val/accuracy"].item() == 1.0
    assert metrics["val/loss"].item() < 0.3  # log 2 = 0.69 at the start
    assert metrics["val/margin"].item() == pytest.approx((metrics["val/reward_chosen"] - metrics["val/reward_rejected"]).item(), abs=1e-4)
    assert "val/gold_accuracy" not in metrics  # user files carry no gold verdicts

    assert is_complete_hf_folder(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    offset = model.config.reward_offset
    assert offset == pytest.approx(module.reward_offset) and offset != 0.0

    # Normalised: SFT demos (encoded as training sequences are) average 0 through the scoring API.
    demo_ids = [encode_preference({"prompt": d["prompt"], "chosen": d["completion"], "rejected": "x"}, tokenizer, 256)["chosen"]
                for d in DEMOS]
    demo_scores = score_sequences(model, pad(demo_ids, tokenizer.pad_token_id), attention_mask_for(demo_ids))
    assert demo_scores.mean().item() == pytest.approx(0.0, abs=1e-4)

    # Plain Hugging Face use (tokenizer padding, model's own pooling) equals the scoring API.
    texts = ["Review: The movie was" + p["chosen"] + tokenizer.eos_token for p in _pairs(3)]
    texts += ["Review: The movie was" + p["rejected"] + tokenizer.eos_token for p in _pairs(3)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        plain = model(**encoded).logits.squeeze(-1)
    ours = score_sequences(module.model, encoded["input_ids"], encoded["attention_mask"])
    torch.testing.assert_close(plain - offset, ours, atol=1e-4, rtol=1e-4)
    assert (ours[:3] > ours[3:]).all()  # it learned the preference


def test_likelihood_distillation_trains_its_head_and_exports_a_plain_reward_model(tmp_path: Path, bpe_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", _pairs(24))
    demos = write_lines(tmp_path / "demos.jsonl", DEMOS)
    export = tmp_path / "reward-model"
    module = RewardModule(str(bpe_gpt2_dir), learning_rate=3e-3, warmup_steps=2, export_dir=str(export),
                          normalize_file=str(demos), likelihood_distillation_coef=1.0)
    module.configure_model()
    head_before = module.likelihood_head.weight.detach().clone()
    data = PreferenceDataModule(train_file=str(train), val_fraction=0.25, batch_size=6)
    trainer = Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/likelihood_loss"])
    assert not torch.allclose(module.likelihood_head.weight, head_before)  # the optimiser trains it
    assert "likelihood_head.weight" in module.state_dict()  # so a resumed fit keeps it

    model, info = AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("likelihood" in key for key in model.state_dict())
    sequences = _sequences(module.tokenizer)
    ids, mask = pad(sequences, module.tokenizer.pad_token_id), attention_mask_for(sequences)
    torch.testing.assert_close(score_sequences(model, ids, mask), score_sequences(module.model, ids, mask))


def test_weight_averaging_callback_is_what_gets_normalised_and_exported(tmp_path: Path, byte_gpt2_dir: Path):
    """With Lightning's weight averaging (e.g. ``EMAWeightAveraging`` in ``trainer.callbacks``),
    the export and its ``reward_offset`` are the averaged model's, not the last step's."""
    from lightning.pytorch import callbacks as lightning_callbacks

    if not hasattr(lightning_callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging needs Lightning >= 2.6")
    EMAWeightAveraging = lightning_callbacks.EMAWeightAveraging

    train = write_lines(tmp_path / "train.jsonl", _pairs(24))
    demos = write_lines(tmp_path / "demos.jsonl", DEMOS)

    def fit(name: str, callbacks: list) -> tuple[dict[str, torch.Tensor], float]:
        export = tmp_path / name
        module = RewardModule(str(byte_gpt2_dir), learning_rate=3e-3, warmup_steps=2, export_dir=str(export),
                              normalize_file=str(demos))
        data = PreferenceDataModule(train_file=str(train), val_fraction=0.25, batch_size=6)
        trainer = Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks)
        torch.manual_seed(0)
        trainer.fit(module, datamodule=data)
        model = AutoModelForSequenceClassification.from_pretrained(export)
        return model.state_dict(), model.config.reward_offset

    last_step, last_offset = fit("plain", [])
    no_memory, no_memory_offset = fit("ema-decay-0", [EMAWeightAveraging(decay=0.0)])  # the average is the last step
    averaged, averaged_offset = fit("ema-decay-0.9", [EMAWeightAveraging(decay=0.9)])
    for name, weight in last_step.items():
        torch.testing.assert_close(no_memory[name], weight, msg=name)
    assert no_memory_offset == pytest.approx(last_offset)
    assert any(not torch.allclose(averaged[name], weight) for name, weight in last_step.items())
    assert averaged_offset != pytest.approx(last_offset)


def test_gold_metrics_match_a_direct_computation(tmp_path: Path, byte_gpt2_dir: Path):
    records = SentimentTask(seed=3).preference_records(24, split="val")
    records.append(dict(records[0]))  # a duplicate pair: same ids, same gold score
    val = write_lines(tmp_path / "val.jsonl", records)
    module = RewardModule(str(byte_gpt2_dir), export_dir=None, judge=judge)
    data = PreferenceDataModule(train_file=str(val), val_file=str(val), batch_size=5)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    metrics = trainer.callback_metrics

    tokenizer = module.tokenizer
    pairs = [encode_preference(r, tokenizer, data.max_length) for r in records]
    chosen_ids, rejected_ids = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    seqs = chosen_ids + rejected_ids
    rewards = score_sequences(module.model, pad(seqs, tokenizer.pad_token_id), attention_mask_for(seqs))
    n = len(records)
    gold = torch.tensor([gold_score(r["prompt"], r[side]) for side in ("chosen", "rejected") for r in records])
    verdict = torch.sign(gold[:n] - gold[n:])
    decided = verdict != 0
    agree = pair_accuracy(rewards[:n], rewards[n:])[decided] == (verdict[decided] > 0).float()
    assert metrics["val/gold_accuracy"].item() == pytest.approx(agree.float().mean().item(), abs=1e-5)
    assert metrics["val/gold_spearman"].item() == pytest.approx(spearman_corrcoef(rewards, gold).item(), abs=1e-4)
    assert metrics["val/accuracy"].item() == pytest.approx(pair_accuracy(rewards[:n], rewards[n:]).mean().item(), abs=1e-5)


# --- the command line -------------------------------------------------------------------------
def _demo_config(tmp_path: Path, model: str, train: Path | None) -> Path:
    config = yaml.safe_load((ROOT / "configs/demo/reward.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    config["model"]["init_args"].update(model_name_or_path=model, export_dir=str(tmp_path / "export"))
    if train is not None:
        config["data"]["init_args"].update(train_file=str(train), val_fraction=0.25, batch_size=4)
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ({"prompt": "Review: x", "chosen": " good."}, "rejected", "missing"),
        ({"prompt": "Review: x", "chosen": "  ", "rejected": " bad."}, "chosen", "empty string"),
        ({"prompt": "Review: x", "chosen": " good.", "rejected": 3}, "rejected", "expected a string"),
    ],
)
def test_cli_reports_bad_preference_record(tmp_path: Path, byte_gpt2_dir: Path, capsys, bad: dict, field: str, message: str):
    train = write_lines(tmp_path / "train.jsonl", _pairs(3) + [bad])
    config = _demo_config(tmp_path, str(byte_gpt2_dir), train)
    assert main(["fit", "--config", str(config), "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{train}:4: field '{field}': {message}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "export").exists()


def test_cli_reports_bad_normalize_file_before_training(tmp_path: Path, byte_gpt2_dir: Path, capsys):
    train = write_lines(tmp_path / "train.jsonl", _pairs(4))
    demos = write_lines(tmp_path / "demos.jsonl", [DEMOS[0], {"prompt": "Review: x", "completion": ""}])
    config = _demo_config(tmp_path, str(byte_gpt2_dir), train)
    args = ["fit", "--config", str(config), "--trainer.max_steps=1", "--model.init_args.normalize_file", str(demos)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{demos}:2: field 'completion': empty string" in err
    assert not (tmp_path / "ckpt").exists()  # failed before the first training step


def test_user_files_without_normalize_file_keep_offset_zero(tmp_path: Path, byte_gpt2_dir: Path):
    train = write_lines(tmp_path / "train.jsonl", _pairs(4))
    module = RewardModule(str(byte_gpt2_dir), export_dir=None)
    data = PreferenceDataModule(train_file=str(train), val_fraction=0.0, batch_size=4)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="reward_offset stays 0.0"):
        trainer.fit(module, datamodule=data)
    assert module.reward_offset is None and module.model.config.reward_offset == 0.0


def test_demo_config_fast_dev_run(tmp_path: Path, monkeypatch, byte_gpt2_dir: Path):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs/demo/reward.yaml"), "--trainer.fast_dev_run=true",
            "--model.init_args.model_name_or_path", str(byte_gpt2_dir)]
    assert main(args) == 0
    assert not (tmp_path / "outputs/demo/reward/model").exists()  # smoke runs never export
    assert (tmp_path / "outputs/demo/reward").is_dir()  # the TensorBoard run folder of the demo
