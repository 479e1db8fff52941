"""LoRA (the ``lora`` extra, peft): PPO trains only the adapter and the critic on a base model
that the reference shares; exports are merged plain Hugging Face folders; checkpoints hold only
what trains and resume exactly; SFT and reward stages train adapters too; without peft, asking
for LoRA is a one-line error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.lora import (CRITIC_ADAPTER, LoRASettings, adapter_parameters, adapter_switched, add_adapter, backbone,
                                 lora_config, transformers_model)
from rlhf_lightning.forwards import response_logprobs, score_sequences, takes_logits_to_keep, token_values
from rlhf_lightning.generation import sample
from rlhf_lightning.models import byte_tokenizer, is_complete_hf_folder, load_causal_lm, load_tokenizer
from rlhf_lightning.modules import DPOModule, RewardModule, SFTModule

from .conftest import save_tiny_gpt2, write_lines
from .test_dpo import LOG2, dpo_pairs
from .test_ppo import (assert_checkpointing_changes_nothing_but_the_recompute, fit, response_logprobs_and_head_rows,
                       small_ppo)

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the lora extra (peft) is not installed")

EOS, PAD = 1, 0
LORA = LoRASettings(r=4, alpha=8)
# Two left-padded prompts and their responses (byte ids), with the attention mask.
PROMPTS = torch.tensor([[PAD, 70, 71, 72], [73, 74, 75, 76]])
RESPONSES = torch.tensor([[40, 41, EOS], [42, EOS, PAD]])
INPUT_IDS = torch.cat([PROMPTS, RESPONSES], dim=1)
ATTENTION = torch.cat([PROMPTS != PAD, torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)], dim=1).long()


def is_adapter_key(name: str) -> bool:
    return "lora_" in name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> SimpleNamespace:
    """A LoRA PPO run (:func:`lora_ppo_run`) with a separate critic, the adapter also exported alone."""
    return lora_ppo_run(tmp_path_factory.mktemp("lora-ppo"), lora=LoRASettings(r=4, alpha=8, export_adapter=True))


def lora_ppo_run(tmp: Path, **settings) -> SimpleNamespace:
    """A PPO run with ``settings`` on a tiny GPT-2 through Trainer.fit: 2 iterations of 4
    optimiser steps, a checkpoint after each; the module, the trainer and the weights before."""
    policy_dir = save_tiny_gpt2(tmp / "sft", byte_tokenizer())
    seed_everything(0)
    module = small_ppo(policy_dir, tmp, **settings)
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoints = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = fit(module, iterations=2, callbacks=[checkpoints])
    return SimpleNamespace(tmp=tmp, policy_dir=policy_dir, module=module, trainer=trainer, before=before)


def assert_resumes_exactly(run: SimpleNamespace, **settings) -> None:
    """A run with ``settings`` resumed from ``run``'s first checkpoint ends with its weights."""
    resumed = small_ppo(run.policy_dir, run.tmp, policy_export_dir=None, critic_export_dir=None, **settings)
    resumed.hparams.max_iterations = 2
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(resumed, datamodule=PromptDataModule(batch_size=8, max_length=64),
                ckpt_path=run.tmp / "ckpt" / "epoch=0-step=4.ckpt")
    expected = run.module.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)


@needs_peft
def test_lora_ppo_trains_only_the_adapter_and_the_critic(lora_run):
    after = lora_run.module.state_dict()
    assert set(after) == set(lora_run.before)
    changed = {k for k, v in after.items() if not torch.equal(v, lora_run.before[k])}
    assert changed and all(is_adapter_key(k) or k.startswith("critic.") for k in changed), changed
    assert any(is_adapter_key(k) for k in changed) and any(k.startswith("critic.") for k in changed)
    base = [k for k in after if k.startswith("policy.") and not is_adapter_key(k)]
    assert base and all(torch.equal(after[k], lora_run.before[k]) for k in base)  # bit-identical
    # LoRA dropout is 0: recomputed log-probs equal the rollout's, also with a trained adapter.
    assert lora_run.trainer.callback_metrics["policy/first_ratio_dev"].item() < 1e-5


@needs_peft
def test_reference_is_the_base_model_with_one_copy_of_its_weights(lora_run):
    module = lora_run.module
    assert not list(module.reference.parameters())
    assert not any(k.startswith("reference.") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for m in (module.policy, module.critic) for p in m.parameters()
    )
    tokenizer = load_tokenizer(str(lora_run.policy_dir))
    base = load_causal_lm(str(lora_run.policy_dir), tokenizer).eval()
    logprobs, ref_logprobs, _ = module.rollout_loop().forward_statistics(INPUT_IDS, ATTENTION, RESPONSES.shape[1])
    with torch.no_grad():
        base_logprobs, _ = response_logprobs(base, INPUT_IDS, ATTENTION, RESPONSES.shape[1], 1.0)
    torch.testing.assert_close(ref_logprobs, base_logprobs, atol=1e-6, rtol=0)
    assert (logprobs - ref_logprobs).abs().max() > 1e-4  # the trained adapter is on for the policy
    # Validation samples the reference through generate(): the base model's samples.
    prompt_mask = (PROMPTS != PAD).long()
    reference, from_base = (sample(model, module.tokenizer, module.generation, PROMPTS, prompt_mask, seed=3)
                            for model in (module.reference, base))
    assert torch.equal(reference.response_ids, from_base.response_ids)


@needs_peft
def test_policy_and_reference_compute_logits_only_at_the_response(lora_run):
    policy, reference = lora_run.module.policy, lora_run.module.reference
    for model in (policy, reference):  # peft passes logits_to_keep through to the transformers model
        assert takes_logits_to_keep(model)
        _, head_rows = response_logprobs_and_head_rows(model, transformers_model(policy).get_output_embeddings())
        assert head_rows == [3 + 1]


@needs_peft
def test_merged_export_reloads_in_plain_transformers_with_the_trained_logits(lora_run, monkeypatch):
    from peft import PeftModel

    folder = lora_run.tmp / "policy"
    assert is_complete_hf_folder(folder) and not (folder / "adapter_config.json").exists()
    with torch.no_grad():
        trained = lora_run.module.policy(input_ids=INPUT_IDS).logits
        base = AutoModelForCausalLM.from_pretrained(lora_run.policy_dir)
        adapter = PeftModel.from_pretrained(base, folder / "adapter")(input_ids=INPUT_IDS).logits
        monkeypatch.setitem(sys.modules, "peft", None)  # the merged folder needs no peft
        merged = AutoModelForCausalLM.from_pretrained(folder)
        assert type(merged) is GPT2LMHeadModel
        exported = merged(input_ids=INPUT_IDS).logits
        untrained = AutoModelForCausalLM.from_pretrained(lora_run.policy_dir)(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(exported, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter, trained, atol=1e-5, rtol=0)
    assert (exported - untrained).abs().max() > 1e-3  # the export is not the base model


@needs_peft
def test_checkpoint_holds_only_trained_weights_and_resumes_exactly(lora_run):
    path = lora_run.tmp / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("critic.") for k in saved)
    assert all(is_adapter_key(k) for k in saved if k.startswith("policy.")) and any(k.startswith("policy.") for k in saved)
    assert not any(k.startswith("reference.") for k in saved)
    assert_resumes_exactly(lora_run, lora=LORA)


def test_lora_without_peft_is_a_one_line_error_naming_the_key(monkeypatch, tmp_path: Path, byte_gpt2_dir: Path):
    monkeypatch.setitem(sys.modules, "peft", None)
    for module in (small_ppo(byte_gpt2_dir, tmp_path, lora=LORA), SFTModule(str(byte_gpt2_dir), lora=LORA),
                   DPOModule(str(byte_gpt2_dir), lora=LORA)):
        with pytest.raises(UserInputError) as error:
            module.configure_model()
        message = str(error.value)
        assert "\n" not in message and "model.init_args.lora" in message and "pip install" in message


@pytest.mark.parametrize("stage", ["ppo", "dpo"])
def test_a_separate_reference_is_refused_with_lora(tmp_path: Path, byte_gpt2_dir: Path, stage: str):
    """With lora the reference is the policy's base model: a reference folder would be ignored."""
    other = str(tmp_path / "other")
    with pytest.raises(UserInputError) as refused:
        if stage == "ppo":
            small_ppo(byte_gpt2_dir, tmp_path, lora=LORA, reference=other)
        else:
            DPOModule(str(byte_gpt2_dir), lora=LORA, reference_name_or_path=other)
    key = "reference" if stage == "ppo" else "reference_name_or_path"
    assert str(refused.value) == (f"model.init_args.{key}: with lora the reference is the policy's base model; "
                                  f"leave {key} unset")


def test_lora_dropout_is_refused_for_ppo(tmp_path: Path, byte_gpt2_dir: Path):
    with pytest.raises(ValueError, match="lora.dropout must be 0"):
        small_ppo(byte_gpt2_dir, tmp_path, lora=LoRASettings(dropout=0.1))


def _changed_keys(module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])}


@needs_peft
def test_ppo_lora_with_gradient_checkpointing_gives_the_same_update(tmp_path: Path, byte_gpt2_dir: Path):
    assert_checkpointing_changes_nothing_but_the_recompute(byte_gpt2_dir, tmp_path, lora=LORA)


@needs_peft
def test_sft_lora_with_gradient_checkpointing_trains_the_adapter_and_exports_merged(tmp_path: Path, byte_gpt2_dir: Path):
    records = [{"prompt": "Review: it was", "completion": " good. I liked the plot."}] * 16
    module = SFTModule(str(byte_gpt2_dir), lora=LORA, gradient_checkpointing=True, learning_rate=1e-2, warmup_steps=0,
                       export_dir=str(tmp_path / "sft"), num_samples=0)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    data = SFTDataModule(train_file=str(write_lines(tmp_path / "train.jsonl", records)), val_fraction=0.25,
                         batch_size=4, max_length=64)
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    changed = _changed_keys(module, before)
    assert changed and all(is_adapter_key(k) for k in changed), changed
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    saved = torch.load(tmp_path / "sft.ckpt", weights_only=False)["state_dict"]
    assert saved and all(is_adapter_key(k) for k in saved)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(exported, module.model(input_ids=INPUT_IDS).logits, atol=1e-5, rtol=0)


@needs_peft
def test_reward_lora_trains_adapter_and_score_head_and_exports_a_plain_reward_model(tmp_path: Path, byte_gpt2_dir: Path):
    pairs = [{"prompt": "Review: The movie was", "chosen": " great.", "rejected": " awful."}] * 12
    module = RewardModule(str(byte_gpt2_dir), lora=LORA, learning_rate=3e-3, warmup_steps=0,
                          export_dir=str(tmp_path / "rm"), normalize=False)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    data = PreferenceDataModule(train_file=str(write_lines(tmp_path / "pairs.jsonl", pairs)), val_fraction=0.25, batch_size=4)
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    changed = _changed_keys(module, before)
    assert any(is_adapter_key(k) for k in changed) and any("score.modules_to_save" in k for k in changed), changed
    assert all(is_adapter_key(k) or "score.modules_to_save" in k for k in changed), changed
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(score_sequences(plain, INPUT_IDS, ATTENTION), score_sequences(module.model, INPUT_IDS, ATTENTION),
                               atol=1e-5, rtol=0)


@needs_peft
def test_health_snapshot_of_a_lora_policy_holds_only_the_adapter_and_restores_it(lora_run):
    """The NaN guard copies only what trains: with LoRA the adapter, not the frozen base."""
    from rlhf_lightning import guards

    module = lora_run.module
    snapshot = guards._snapshot(module)
    assert snapshot["policy"] and all(is_adapter_key(k) for k in snapshot["policy"])
    trained = {k: v.clone() for k, v in module.policy.state_dict().items()}
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    assert not guards._weights_finite(module)
    guards._restore(module, snapshot)
    assert guards._weights_finite(module)
    assert all(torch.equal(v, trained[k]) for k, v in module.policy.state_dict().items())


class FirstStepMetrics(Callback):
    """The metrics that the first training step logged, read when the second step starts."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.metrics = {name: value.item() for name, value in trainer.callback_metrics.items()}


@needs_peft
def test_dpo_lora_trains_the_adapter_against_its_own_base_and_exports_merged(tmp_path: Path, byte_gpt2_dir: Path,
                                                                               monkeypatch):
    from peft import PeftModel

    export = tmp_path / "dpo"
    module = DPOModule(str(byte_gpt2_dir), lora=LoRASettings(r=4, alpha=8, export_adapter=True), beta=0.5,
                       learning_rate=1e-2, warmup_steps=0, export_dir=str(export))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    first = FirstStepMetrics()
    data = PreferenceDataModule(train_file=str(write_lines(tmp_path / "pairs.jsonl", dpo_pairs(12))), val_fraction=0.0,
                                batch_size=4)
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[first])
    trainer.fit(module, datamodule=data)

    # At the first step the policy (adapter B = 0) is its base, the reference.
    assert first.metrics["train/loss"] == pytest.approx(LOG2, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first.metrics[name] == pytest.approx(0.0, abs=1e-6), name
    changed = _changed_keys(module, before)
    assert changed and all(is_adapter_key(k) for k in changed), changed
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    saved = torch.load(tmp_path / "dpo.ckpt", weights_only=False)["state_dict"]
    assert saved and all(is_adapter_key(k) for k in saved)  # the frozen base is left out
    # One copy of the base weights: the reference has no parameters of its own.
    assert not list(module.reference.parameters()) and not any("reference" in k for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())
    with torch.no_grad():
        trained = module.model(input_ids=INPUT_IDS).logits
        reference = module.reference(input_ids=INPUT_IDS).logits
        base = AutoModelForCausalLM.from_pretrained(byte_gpt2_dir)(input_ids=INPUT_IDS).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(byte_gpt2_dir), export / "adapter")
        from_adapter = adapter(input_ids=INPUT_IDS).logits
        monkeypatch.setitem(sys.modules, "peft", None)  # the merged folder needs no peft
        merged = AutoModelForCausalLM.from_pretrained(export)
        assert type(merged) is GPT2LMHeadModel
        exported = merged(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(exported, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_adapter, trained, atol=1e-5, rtol=0)
    assert (trained - base).abs().max() > 1e-3  # the adapter trained


# ------------------------------------------------------------------ lora.critic: adapter
CRITIC_LORA = LoRASettings(r=4, alpha=8, critic="adapter")


def is_critic_adapter_key(name: str) -> bool:
    return is_adapter_key(name) and f".{CRITIC_ADAPTER}." in name


@pytest.fixture(scope="module")
def critic_adapter_run(tmp_path_factory) -> SimpleNamespace:
    """A LoRA PPO run whose critic is a second adapter on the policy's base (``lora.critic:
    adapter``) and learns faster than the policy (:func:`lora_ppo_run`)."""
    return lora_ppo_run(tmp_path_factory.mktemp("lora-critic-adapter"), lora=CRITIC_LORA, critic_learning_rate=3e-3)


@needs_peft
def test_critic_adapter_ppo_trains_only_the_two_adapters_and_the_value_head(critic_adapter_run):
    module, before = critic_adapter_run.module, critic_adapter_run.before
    after = module.state_dict()
    assert set(after) == set(before)
    assert [k for k in after if k.startswith("critic.")] == ["critic.score.weight"]  # the critic owns its head only
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and all(is_adapter_key(k) or k == "critic.score.weight" for k in changed), changed
    assert "critic.score.weight" in changed
    assert any(is_critic_adapter_key(k) for k in changed) and any(is_adapter_key(k) and not is_critic_adapter_key(k)
                                                                   for k in changed)
    base = [k for k in after if not is_adapter_key(k) and k != "critic.score.weight"]
    assert base and all(torch.equal(after[k], before[k]) for k in base)  # bit-identical
    assert critic_adapter_run.trainer.callback_metrics["policy/first_ratio_dev"].item() < 1e-5
    # Each optimiser group holds its own weights only: the policy's adapter; the critic's adapter and head.
    policy_group, critic_group = (group["params"] for group in critic_adapter_run.trainer.optimizers[0].param_groups)
    critic_adapter = adapter_parameters(module.policy, CRITIC_ADAPTER)
    assert {id(p) for p in critic_group} == {id(p) for p in [*critic_adapter, module.critic.score.weight]}
    assert {id(p) for p in policy_group} == {id(p) for p in adapter_parameters(module.policy, "default")}
    assert all(p.requires_grad for p in [*policy_group, *critic_group])  # adapter switches left them trained


@needs_peft
def test_critic_adapter_shares_the_one_copy_of_the_base_weights(critic_adapter_run):
    module = critic_adapter_run.module
    assert backbone(module.critic) is backbone(module.policy) and not list(module.reference.parameters())
    pointers = [p.data_ptr() for p in module.parameters()]
    assert len(pointers) == len(set(pointers))
    folder = AutoModelForCausalLM.from_pretrained(critic_adapter_run.policy_dir)
    adapters = sum(p.numel() for n, p in module.named_parameters() if is_adapter_key(n))
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in folder.parameters()) + adapters + 32


def _statistics(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return module.rollout_loop().forward_statistics(INPUT_IDS, ATTENTION, RESPONSES.shape[1])


@needs_peft
def test_policy_reference_and_critic_each_see_only_their_own_adapter(critic_adapter_run):
    module = critic_adapter_run.module
    tokenizer = load_tokenizer(str(critic_adapter_run.policy_dir))
    base = load_causal_lm(str(critic_adapter_run.policy_dir), tokenizer).eval()
    with torch.no_grad():
        base_logprobs, _ = response_logprobs(base, INPUT_IDS, ATTENTION, RESPONSES.shape[1], 1.0)
    logprobs, ref_logprobs, values = _statistics(module)  # policy, reference, critic, in turn
    torch.testing.assert_close(ref_logprobs, base_logprobs, atol=1e-6, rtol=0)
    assert (logprobs - ref_logprobs).abs().max() > 1e-4
    for adapter in (CRITIC_ADAPTER, "default"):  # move one adapter's weights: only its own model changes
        weights = adapter_parameters(module.policy, adapter)
        saved = [p.detach().clone() for p in weights]
        try:
            with torch.no_grad():
                for p in weights:
                    p.add_(0.05)
            moved = _statistics(module)
        finally:
            with torch.no_grad():
                for p, value in zip(weights, saved):
                    p.copy_(value)
        own, other = (2, 0) if adapter == CRITIC_ADAPTER else (0, 2)
        assert torch.equal(moved[other], (logprobs, ref_logprobs, values)[other]), adapter
        assert torch.equal(moved[1], ref_logprobs), adapter
        assert (moved[own] - (logprobs, ref_logprobs, values)[own]).abs().max() > 1e-4, adapter
    assert all(torch.equal(a, b) for a, b in zip(_statistics(module), (logprobs, ref_logprobs, values)))


@needs_peft
def test_critic_adapter_exports_a_plain_critic_and_the_policy_as_before(critic_adapter_run, monkeypatch):
    module, tmp = critic_adapter_run.module, critic_adapter_run.tmp
    with torch.no_grad():
        trained_values = token_values(module.critic, INPUT_IDS, ATTENTION, RESPONSES.shape[1])
        trained_logits = module.policy(input_ids=INPUT_IDS).logits
        monkeypatch.setitem(sys.modules, "peft", None)  # the folders need no peft
        critic = AutoModelForSequenceClassification.from_pretrained(tmp / "critic")
        policy = AutoModelForCausalLM.from_pretrained(tmp / "policy")
        exported_values = token_values(critic, INPUT_IDS, ATTENTION, RESPONSES.shape[1])
        exported_logits = policy(input_ids=INPUT_IDS).logits
    assert critic.config.num_labels == 1 and is_complete_hf_folder(tmp / "critic")
    torch.testing.assert_close(exported_values, trained_values, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported_logits, trained_logits, atol=1e-5, rtol=0)  # the critic adapter is not in it


@needs_peft
def test_critic_adapter_checkpoint_holds_the_two_adapters_and_the_head_and_resumes_exactly(critic_adapter_run):
    run = critic_adapter_run
    path = run.tmp / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert [k for k in saved if k.startswith("critic.")] == ["critic.score.weight"]
    policy_keys = [k for k in saved if k.startswith("policy.")]
    assert all(is_adapter_key(k) for k in policy_keys) and set(policy_keys) == {
        k for k in run.module.state_dict() if is_adapter_key(k)}
    assert any(is_critic_adapter_key(k) for k in policy_keys)
    assert_resumes_exactly(run, lora=CRITIC_LORA, critic_learning_rate=3e-3)


@pytest.mark.parametrize(("settings", "key"), [
    (dict(lora=LoRASettings(critic="shared")), "model.init_args.lora.critic"),
    (dict(lora=CRITIC_LORA, critic="some/folder"), "model.init_args.critic"),
    (dict(lora=CRITIC_LORA, gradient_checkpointing=True), "model.init_args.gradient_checkpointing"),
])
def test_lora_critic_settings_are_checked_in_one_line(tmp_path: Path, byte_gpt2_dir: Path, settings, key):
    with pytest.raises(UserInputError) as error:
        small_ppo(byte_gpt2_dir, tmp_path, **settings)
    assert "\n" not in str(error.value) and str(error.value).startswith(key)


def _requires_grad(model) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


@needs_peft
def test_adapter_switches_give_every_weight_back_its_own_requires_grad(byte_gpt2_dir: Path):
    """peft's switches turn ``requires_grad`` on for the adapter they activate: a frozen peft
    policy stays frozen after a reference or critic forward, and an exception inside the block
    still restores the active adapter and every flag."""
    policy = add_adapter(load_causal_lm(str(byte_gpt2_dir), load_tokenizer(str(byte_gpt2_dir))), LORA, "lora")
    policy.add_adapter(CRITIC_ADAPTER, lora_config(LORA, "lora"))
    policy.requires_grad_(False)
    for adapter in (None, CRITIC_ADAPTER):
        with adapter_switched(policy, adapter):
            pass
        assert not any(_requires_grad(policy).values()), adapter
        assert policy.active_adapter == "default"
    for i, parameter in enumerate(policy.parameters()):  # a mix of trained and frozen weights
        parameter.requires_grad_(i % 3 == 0)
    flags = _requires_grad(policy)
    for adapter in (None, CRITIC_ADAPTER):
        with pytest.raises(RuntimeError, match="inside"):
            with adapter_switched(policy, adapter):
                assert policy.active_adapter == (adapter or "default")
                raise RuntimeError("inside the block")
        assert policy.active_adapter == "default" and _requires_grad(policy) == flags, adapter


@pytest.mark.parametrize("stage", [SFTModule, RewardModule, DPOModule])
def test_lora_critic_is_refused_outside_ppo_in_one_line(stage):
    for critic in ("adapter", "shared"):
        with pytest.raises(UserInputError) as error:
            stage(lora=LoRASettings(critic=critic))
        message = str(error.value)
        assert "\n" not in message and message.startswith("model.init_args.lora.critic ") and stage.__name__ in message
    assert stage(lora=LoRASettings()).lora.critic == "separate"


@needs_peft
@pytest.mark.parametrize("critic, handed", [("separate", ["critic", "policy"]), ("adapter", ["policy"])])
def test_lora_hands_on_loaded_the_policy_last_and_no_view_of_it(byte_gpt2_dir: Path, critic: str, handed: list[str]):
    """The reference (the adapter-disabled policy) and an adapter critic are views of the policy:
    ``on_loaded`` (FSDP2's sharding) gets the policy once, after everything built on it."""
    from rlhf_lightning.ppo_models import load_ppo_models

    seen: list[torch.nn.Module] = []
    models = load_ppo_models(str(byte_gpt2_dir), load_tokenizer(str(byte_gpt2_dir)), reward_fn=len,
                             lora=LoRASettings(critic=critic), on_loaded=seen.append)
    assert [next(n for n in ("policy", "critic") if getattr(models, n) is m) for m in seen] == handed
