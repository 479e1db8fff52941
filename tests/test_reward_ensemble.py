"""PPO against a reward-model ensemble: mean - k * std of the members' scores (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.data.encoding import encode_preference
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.generation import Responses
from rlhf_lightning.models import load_sequence_scorer, load_tokenizer, save_hf_folder
from rlhf_lightning.modules import ScoreSettings
from rlhf_lightning.ppo_models import load_ppo_models, load_reward_scorer
from rlhf_lightning.reward_sources import EnsembleScorer
from rlhf_lightning.rlhf_math import ensemble_score

from .conftest import bpe_tokenizer_without_pad, save_tiny_gpt2
from .test_ppo import fit, small_ppo

EOS, PAD = 1, 0
PENALTY = ScoreSettings(ensemble_penalty=1.0)


def reward_folder(folder: Path, base: Path, seed: int, reward_offset: float = 0.0) -> Path:
    """A reward-model folder on ``base`` (its tokenizer too) with a score head drawn from ``seed``."""
    tokenizer = load_tokenizer(str(base))
    torch.manual_seed(seed)
    model = load_sequence_scorer(str(base), tokenizer)
    model.config.reward_offset = reward_offset
    return save_hf_folder(folder, model, tokenizer)


@pytest.fixture
def two_reward_dirs(tmp_path: Path, byte_gpt2_dir: Path) -> list[str]:
    """Two reward models that share the policy's byte tokenizer and disagree (other heads)."""
    return [str(reward_folder(tmp_path / f"rm{seed}", byte_gpt2_dir, seed)) for seed in (1, 2)]


def byte_responses(tokenizer) -> Responses:
    """Three left-padded prompts and right-padded responses in the byte tokenizer's ids."""
    prompt_ids = torch.tensor([[PAD, 70, 71], [72, 73, 74], [PAD, PAD, 75]])
    response_ids = torch.tensor([[50, 51, EOS], [52, EOS, PAD], [53, 54, 55]])
    return Responses(prompt_ids=prompt_ids, prompt_mask=(prompt_ids != PAD).long(), response_ids=response_ids,
                     response_mask=response_ids != PAD, tokenizer=tokenizer, stop_ids=[EOS])


def test_ensemble_scorer_is_mean_minus_k_std_of_its_members(tmp_path: Path, byte_gpt2_dir: Path):
    """Each member scores as it would alone (its own tokenizer, its own reward_offset): the
    second reward model reads BPE tokens, so the responses are re-tokenized for it."""
    policy_tokenizer = load_tokenizer(str(byte_gpt2_dir))
    bpe_base = save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad())
    folders = [reward_folder(tmp_path / "byte-rm", byte_gpt2_dir, 1, reward_offset=0.25),
               reward_folder(tmp_path / "bpe-rm", bpe_base, 2)]
    members = [load_reward_scorer(str(folder), policy_tokenizer, batch_size=2) for folder in folders]
    assert [m.shares_tokens for m in members] == [True, False]
    responses = byte_responses(policy_tokenizer)
    alone = torch.stack([member(responses) for member in members])  # (2, 3)
    ensemble = EnsembleScorer(members, penalty=0.5)
    assert ensemble.statistics() == {}  # nothing scored yet
    scores = ensemble(responses)
    expected = alone.mean(0) - 0.5 * (alone - alone.mean(0)).pow(2).mean(0).sqrt()
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(ensemble.last_spread, (alone[0] - alone[1]).abs() / 2)  # population std of two
    assert ensemble.statistics()["objective/scores_spread"].item() == pytest.approx(ensemble.last_spread.mean().item())
    torch.testing.assert_close(EnsembleScorer(members)(responses), alone.mean(0))  # penalty 0: the mean


def test_a_reward_model_with_another_tokenizer_reads_each_response_as_a_training_pair(tmp_path: Path,
                                                                                      byte_gpt2_dir: Path):
    """Re-tokenized responses are encoded by the training pairs' rule (EOS after a plain prompt)."""
    policy_tokenizer = load_tokenizer(str(byte_gpt2_dir))
    folder = reward_folder(tmp_path / "bpe-rm", save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad()), 2)
    scorer = load_reward_scorer(str(folder), policy_tokenizer)
    responses = byte_responses(policy_tokenizer)
    ids, mask = scorer.encode(responses)
    pairs = [encode_preference({"prompt": p, "chosen": c, "rejected": c}, scorer.tokenizer, 10_000)["chosen"]
             for p, c in zip(responses.prompts, responses.completions)]
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == pairs
    assert all(pair[-1] == scorer.tokenizer.eos_token_id for pair in pairs)


def test_ensemble_members_load_frozen_and_the_critic_starts_from_the_first(
    tmp_path: Path, byte_gpt2_dir: Path, two_reward_dirs: list[str]
):
    tokenizer = load_tokenizer(str(byte_gpt2_dir))
    second_first = list(reversed(two_reward_dirs))
    models = load_ppo_models(str(byte_gpt2_dir), tokenizer, reward_model=second_first, ensemble_penalty=1.0)
    scorer = models.reward_scorer
    assert isinstance(scorer, EnsembleScorer) and scorer.penalty == 1.0
    assert [m.model for m in scorer.members] == models.reward_models and len(models.reward_models) == 2
    for member in models.reward_models:
        assert not member.training and not any(p.requires_grad for p in member.parameters())
    heads = [member.score.weight for member in models.reward_models]
    assert not torch.equal(heads[0], heads[1])
    torch.testing.assert_close(models.critic.score.weight, heads[0])  # the first member's head, not the second's
    assert all(p.requires_grad for p in models.critic.parameters())
    # A first member with another tokenizer: the critic cannot read the policy's tokens with it.
    bpe_base = save_tiny_gpt2(tmp_path / "bpe-lm", bpe_tokenizer_without_pad())
    bpe_first = [str(reward_folder(tmp_path / "bpe-rm", bpe_base, 3)), two_reward_dirs[0]]
    critic = load_ppo_models(str(byte_gpt2_dir), tokenizer, reward_model=bpe_first).critic
    assert critic.get_input_embeddings().num_embeddings == len(tokenizer)
    assert not any(torch.equal(critic.score.weight, head) for head in heads)


@pytest.mark.parametrize("reward_model, match", [
    ("one", "got 1"), (["one"], "got 1"), (None, "got 0"),  # None: the default reward_fn
])
def test_an_ensemble_penalty_needs_two_reward_models(tmp_path: Path, byte_gpt2_dir: Path, reward_model, match: str):
    reward = {"reward_model": reward_model} if reward_model is not None else {}
    with pytest.raises(UserInputError, match=r"model\.init_args\.scores\.ensemble_penalty 1\.0 .*" + match):
        small_ppo(byte_gpt2_dir, tmp_path, scores=PENALTY, **reward)


def test_a_negative_penalty_and_an_empty_list_are_refused(tmp_path: Path, byte_gpt2_dir: Path):
    with pytest.raises(UserInputError, match=r"model\.init_args\.scores\.ensemble_penalty must be >= 0, got -1\.0"):
        small_ppo(byte_gpt2_dir, tmp_path, reward_model=["a", "b"], scores=ScoreSettings(ensemble_penalty=-1.0))
    with pytest.raises(UserInputError, match=r"model\.init_args\.reward_model: .* got an empty list"):
        small_ppo(byte_gpt2_dir, tmp_path, reward_model=[])


def test_yaml_list_of_reward_models_parses(tmp_path: Path, byte_gpt2_dir: Path, two_reward_dirs: list[str], capsys):
    from rlhf_lightning.cli import main

    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "rlhf_lightning.modules.PPOModule", "init_args": {
        "policy": str(byte_gpt2_dir), "reward_model": two_reward_dirs, "scores": {"ensemble_penalty": 0.5}}}}))
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--config", str(config), "--print_config"])
    assert caught.value.code == 0
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["reward_model"] == two_reward_dirs and init_args["scores"]["ensemble_penalty"] == 0.5


def test_ppo_against_an_ensemble_logs_its_spread_keeps_members_frozen_and_out_of_checkpoints(
    tmp_path: Path, byte_gpt2_dir: Path, two_reward_dirs: list[str]
):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=two_reward_dirs, scores=PENALTY)
    module.configure_model()
    members = module.frozen_models()[1:]
    assert len(members) == 2 and all(m in list(module.modules()) for m in members)  # registered submodules
    before = [{k: v.clone() for k, v in member.state_dict().items()} for member in members]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = fit(module, iterations=2, callbacks=[checkpoint])
    spread = trainer.callback_metrics["objective/scores_spread"]
    assert torch.isfinite(spread) and spread.item() > 0  # the two heads disagree
    torch.testing.assert_close(spread, module.reward_scorer.last_spread.mean())
    for member, weights in zip(members, before):
        assert all(torch.equal(weights[k], v) for k, v in member.state_dict().items())
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in saved) and any(k.startswith("critic.") for k in saved)
    assert not any(k.startswith(("reward_models.", "reward_model.")) for k in saved)

    # Resumed, the members come from their folders again and strict loading accepts the checkpoint.
    resumed = small_ppo(byte_gpt2_dir, tmp_path, reward_model=two_reward_dirs, scores=PENALTY)
    resumed.hparams.max_iterations = 2
    resumed_trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    resumed_trainer.fit(resumed, datamodule=PromptDataModule(batch_size=8, max_length=64),
                        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert resumed.iteration == 2
    assert torch.isfinite(resumed_trainer.callback_metrics["objective/scores_spread"])


def test_a_single_reward_model_logs_no_spread(tmp_path: Path, byte_gpt2_dir: Path, two_reward_dirs: list[str]):
    seed_everything(0)
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=two_reward_dirs[0])
    module.configure_model()
    assert module.score_statistics() == {}
    assert module.frozen_models() == [module.reference, module.reward_model]


def test_compute_scores_is_the_ensemble_score(tmp_path: Path, byte_gpt2_dir: Path, two_reward_dirs: list[str]):
    module = small_ppo(byte_gpt2_dir, tmp_path, reward_model=two_reward_dirs, scores=ScoreSettings(ensemble_penalty=2.0))
    module.configure_model()
    responses = byte_responses(module.tokenizer)
    members = torch.stack([member(responses) for member in module.reward_scorer.members])
    torch.testing.assert_close(module.compute_scores(responses), ensemble_score(members, 2.0))
    assert module.score_statistics().keys() == {"objective/scores_spread"}
