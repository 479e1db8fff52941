"""DPO's implicit reward as PPO's reward source (issue 19): ``beta * (log pi_dpo - log pi_ref)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.errors import UserInputError
from rlhf_lightning.lora import AdapterDisabled, LoRASettings
from rlhf_lightning.models import byte_tokenizer, load_causal_lm, load_sequence_scorer, load_tokenizer
from rlhf_lightning.modules import ImplicitRewardSettings
from rlhf_lightning.ppo_models import load_ppo_models
from rlhf_lightning.reward_sources import ImplicitRewardScorer

from .conftest import bpe_tokenizer_without_pad, save_tiny_gpt2
from .test_ppo import fit, small_ppo
from .test_reward_ensemble import byte_responses

BETA = 0.3


@pytest.fixture
def dpo_dir(tmp_path: Path) -> Path:
    """A stand-in for a DPO export: a tiny GPT-2 with the policy's byte tokenizer, other weights."""
    return save_tiny_gpt2(tmp_path / "dpo", byte_tokenizer(), seed=7)


def unpadded_response_logp(model, prompt: list[int], response: list[int]) -> float:
    """``log pi(response | prompt)`` from one unpadded row: a plain forward, log-softmax, and the
    response tokens' log-probs summed (no mask, no position ids: nothing the scorer relies on)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logps[len(prompt) - 1 + i, token].item() for i, token in enumerate(response))


def test_implicit_reward_is_beta_times_the_summed_log_ratio(byte_gpt2_dir: Path, dpo_dir: Path):
    """Left-padded prompts, right-padded responses of three lengths, two rows per forward."""
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    dpo, reference = (load_causal_lm(str(folder), tokenizer).eval() for folder in (dpo_dir, byte_gpt2_dir))
    responses = byte_responses(tokenizer)
    scores = ImplicitRewardScorer(dpo, reference, BETA, batch_size=2)(responses)
    expected = []
    for prompt_row, prompt_mask, response_row, response_mask in zip(
        responses.prompt_ids, responses.prompt_mask, responses.response_ids, responses.response_mask
    ):
        prompt, response = prompt_row[prompt_mask.bool()].tolist(), response_row[response_mask].tolist()
        expected.append(BETA * (unpadded_response_logp(dpo, prompt, response)
                                - unpadded_response_logp(reference, prompt, response)))
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert scores.abs().min() > 1e-3  # the two models differ


def test_identical_policy_and_reference_give_zero_and_share_the_kl_reference(byte_gpt2_dir: Path, dpo_dir: Path):
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    same = ImplicitRewardSettings(policy=str(byte_gpt2_dir), beta=BETA)
    models = load_ppo_models(str(byte_gpt2_dir), tokenizer, implicit_reward=same, with_critic=False)
    scorer = models.reward_scorer
    assert isinstance(scorer, ImplicitRewardScorer) and scorer.beta == BETA
    assert scorer.reference is models.reference  # the default reference is PPO's policy folder: one copy
    assert models.implicit_reward_models == [scorer.model] and models.reward_models == []
    assert torch.equal(scorer(byte_responses(tokenizer)), torch.zeros(3))

    # Another reference folder than PPO's KL reference: loaded, frozen, registered too.
    other = ImplicitRewardSettings(policy=str(byte_gpt2_dir), reference=str(dpo_dir))
    models = load_ppo_models(str(byte_gpt2_dir), tokenizer, implicit_reward=other)
    scorer = models.reward_scorer
    assert scorer.reference is not models.reference and models.implicit_reward_models == [scorer.model, scorer.reference]
    for model in models.implicit_reward_models:
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    # The critic starts from the policy with a new scalar head (no reward-model head to start from).
    policy_weights = load_sequence_scorer(str(byte_gpt2_dir), tokenizer).base_model.state_dict()
    assert all(torch.equal(v, policy_weights[k]) for k, v in models.critic.base_model.state_dict().items())
    assert all(p.requires_grad for p in models.critic.parameters())


def test_with_lora_the_shared_reference_is_the_policys_base_model(byte_gpt2_dir: Path):
    pytest.importorskip("peft")
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    models = load_ppo_models(str(byte_gpt2_dir), tokenizer, implicit_reward=ImplicitRewardSettings(str(byte_gpt2_dir)),
                             with_critic=False, lora=LoRASettings(r=4, alpha=8))
    assert isinstance(models.reference, AdapterDisabled) and models.reward_scorer.reference is models.reference
    assert torch.equal(models.reward_scorer(byte_responses(tokenizer)), torch.zeros(3))  # the adapter starts at 0


def test_ppo_on_the_implicit_reward_keeps_its_models_frozen_and_out_of_checkpoints(
    tmp_path: Path, byte_gpt2_dir: Path, dpo_dir: Path
):
    seed_everything(0)
    settings = ImplicitRewardSettings(policy=str(dpo_dir), reference=str(byte_gpt2_dir), beta=BETA)
    module = small_ppo(byte_gpt2_dir, tmp_path, implicit_reward=settings)
    module.configure_model()
    frozen = module.frozen_models()
    assert frozen == [module.reference, module.reward_scorer.model]  # the KL reference serves as both
    assert all(m in list(module.modules()) for m in frozen)  # registered submodules
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = fit(module, iterations=2, callbacks=[checkpoint])
    assert module.iteration == 2
    scores = trainer.callback_metrics["objective/scores"]
    assert torch.isfinite(scores) and scores.item() != 0
    for model, weights in zip(frozen, before):
        assert not model.training
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    state = saved["state_dict"]
    assert any(k.startswith("policy.") for k in state) and any(k.startswith("critic.") for k in state)
    assert not any(k.startswith(("implicit_reward_models.", "reference.")) for k in state)
    assert saved["hyper_parameters"]["implicit_reward"] == {"policy": str(dpo_dir), "reference": str(byte_gpt2_dir),
                                                            "beta": BETA}


def test_another_tokenizer_is_refused_in_one_line(tmp_path: Path, byte_gpt2_dir: Path, dpo_dir: Path):
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    bpe = str(save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad()))
    for settings, key in ((ImplicitRewardSettings(policy=bpe), "policy"),
                          (ImplicitRewardSettings(policy=str(dpo_dir), reference=bpe), "reference")):
        with pytest.raises(UserInputError, match=rf"^model\.init_args\.implicit_reward\.{key}: the tokenizer of .* "
                                                 r"differs from the policy's; [^\n]*$"):
            load_ppo_models(str(byte_gpt2_dir), tokenizer, implicit_reward=settings, with_critic=False)


def test_bad_settings_are_refused_in_one_line(tmp_path: Path, byte_gpt2_dir: Path, dpo_dir: Path):
    with pytest.raises(UserInputError, match=r"^model\.init_args\.implicit_reward\.beta must be > 0, got 0\.0$"):
        small_ppo(byte_gpt2_dir, tmp_path, implicit_reward=ImplicitRewardSettings(policy=str(dpo_dir), beta=0.0))
    both = small_ppo(byte_gpt2_dir, tmp_path, implicit_reward=ImplicitRewardSettings(policy=str(dpo_dir)),
                     reward_fn=lambda prompts, completions: [0.0] * len(prompts))
    with pytest.raises(ValueError, match=r"^give exactly one of reward_model, reward_fn or implicit_reward "
                                         r"\(or override compute_scores\)$"):
        both.configure_model()


def test_yaml_implicit_reward_parses_and_is_documented(tmp_path: Path, byte_gpt2_dir: Path, dpo_dir: Path, capsys):
    from rlhf_lightning.cli import main

    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "rlhf_lightning.modules.PPOModule", "init_args": {
        "policy": str(byte_gpt2_dir), "implicit_reward": {"policy": str(dpo_dir), "beta": 0.2}}}}))
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--config", str(config), "--print_config"])
    assert caught.value.code == 0
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["implicit_reward"] == {"policy": str(dpo_dir), "reference": None, "beta": 0.2}
    assert init_args["reward_model"] is None and init_args["reward_fn"] is None
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "rlhf_lightning.modules.PPOModule"])
    assert "DPO's implicit reward" in capsys.readouterr().out
