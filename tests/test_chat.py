"""Chat models whose assistant turns end in an end-of-turn token that is not EOS (Qwen2's
``<|im_end|>``): the stop-id rule, generation, the missing-EOS rule, the training sequences,
and SFT -> reward model -> PPO (and the pipeline) on a tiny Qwen2 loaded through
``from_pretrained``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlhf_lightning import rlhf_math as pm
from rlhf_lightning import stop_tokens
from rlhf_lightning.data import IGNORE_INDEX, PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.data.encoding import (attention_mask_for, demonstration_pair, encode_preference, encode_prompt_record,
                                          encode_sft, pad)
from rlhf_lightning.generation import GenerationSettings, sample
from rlhf_lightning.models import byte_tokenizer, load_causal_lm, load_tokenizer
from rlhf_lightning.modules import PPOModule, PPOSettings, RewardModule, ScoreSettings, SFTModule
from rlhf_lightning.records import DataFormatError, check_preference
from rlhf_lightning.rollout import RolloutLoop, rollout_statistics
from rlhf_lightning.stop_tokens import chat_turn_end_id, stop_token_ids

from .conftest import CORPUS, bpe_tokenizer_without_pad, write_lines
from .test_pipeline import tiny_stage_configs

# A ChatML template as Qwen2's, without the default system prompt.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = ["Name a colour.", "Name a fruit.", "Name a pet.", "Name a day."]
ANSWERS = ["Red.", "A pear.", "A cat.", "Monday."]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as Qwen2's: EOS ``<|endoftext|>``, a pad token of its own, and
    ChatML markers whose ``<|im_end|>`` closes each turn."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS + QUESTIONS + ANSWERS + ["user assistant"], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    wrapped.chat_template = CHATML
    return wrapped


def save_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 whose generation config stops on ``<|im_end|>`` and EOS, as a chat
    model's does, saved with its tokenizer."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end(tokenizer), tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def im_end(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def qwen_dir(tmp_path: Path) -> Path:
    return save_tiny_qwen2(tmp_path / "qwen")


# ------------------------------------------------------------------------------ stop ids
def test_stop_token_ids_join_eos_the_templates_turn_end_and_the_generation_config():
    tokenizer = chat_tokenizer()
    eos, end = tokenizer.eos_token_id, im_end(tokenizer)
    assert eos != end and chat_turn_end_id(tokenizer) == end
    assert stop_token_ids(None, tokenizer) == [eos, end]  # no model: the tokenizer's own
    assert stop_token_ids(GenerationConfig(eos_token_id=end), tokenizer) == [eos, end]  # an int
    assert stop_token_ids(GenerationConfig(eos_token_id=[end, eos]), tokenizer) == [eos, end]  # a list, no repeats
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids(GenerationConfig(eos_token_id=[start]), tokenizer) == [eos, end, start]
    # An id that is no special token of this tokenizer (another vocabulary's EOS) is left out.
    word = tokenizer("Red", add_special_tokens=False).input_ids[0]
    assert stop_token_ids(GenerationConfig(eos_token_id=[word, 50256]), tokenizer) == [eos, end]

    # Plain tokenizers: EOS alone (the byte tokenizer's template closes a turn with EOS itself).
    assert stop_token_ids(None, byte_tokenizer()) == [byte_tokenizer().eos_token_id] == [1]
    assert chat_turn_end_id(byte_tokenizer()) == 1
    plain = bpe_tokenizer_without_pad()
    assert chat_turn_end_id(plain) is None and stop_token_ids(None, plain) == [plain.eos_token_id]
    broken = chat_tokenizer()
    broken.chat_template = "{{ raise_exception('system turn required') }}"
    assert chat_turn_end_id(broken) is None


def test_the_turn_end_id_is_found_once_per_tokenizer_and_again_when_its_template_changes(monkeypatch):
    probes = []
    probe = stop_tokens._probe_turn_end_id
    monkeypatch.setattr(stop_tokens, "_probe_turn_end_id", lambda tokenizer: probes.append(1) or probe(tokenizer))
    tokenizer = chat_tokenizer()
    assert [chat_turn_end_id(tokenizer) for _ in range(3)] == [im_end(tokenizer)] * 3 and len(probes) == 1
    assert chat_turn_end_id(chat_tokenizer()) == im_end(tokenizer) and len(probes) == 2  # another tokenizer
    tokenizer.chat_template = None
    assert chat_turn_end_id(tokenizer) is None and len(probes) == 3


def test_loading_keeps_every_stop_id_of_a_chat_models_generation_config(qwen_dir: Path):
    tokenizer = load_tokenizer(str(qwen_dir))
    model = load_causal_lm(str(qwen_dir), tokenizer)
    assert sorted(model.generation_config.eos_token_id) == sorted([tokenizer.eos_token_id, im_end(tokenizer)])
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, im_end(tokenizer)]


def test_first_eos_mask_and_has_eos_with_several_stop_ids():
    T, F = True, False
    tokens = torch.tensor([
        [5, 7, 3, 8],  # stops at 7
        [5, 8, 7, 3],  # stops at 8
        [5, 5, 0, 0],  # never stops: padding after it
        [3, 4, 5, 6],  # never stops, full length
        [8, 0, 0, 0],  # stops at once
    ])
    expected = [[T, T, F, F], [T, T, F, F], [T, T, F, F], [T, T, T, T], [T, F, F, F]]
    for stop_ids in ([7, 8], (8, 7), torch.tensor([7, 8])):
        assert pm.first_eos_mask(tokens, stop_ids, pad_token_id=0).tolist() == expected
        assert pm.has_eos(tokens, stop_ids).tolist() == [T, T, F, F, T]
    # One id as before: 8 is an ordinary token then.
    assert pm.first_eos_mask(tokens, 7, pad_token_id=0).tolist()[1] == [T, T, T, F]
    assert pm.has_eos(tokens, 7).tolist() == [T, T, F, F, F]
    # A pad token that is also a stop id (Qwen2.5-Instruct's <|endoftext|>) is kept as the stop token.
    assert pm.first_eos_mask(torch.tensor([[5, 0, 0, 0]]), [7, 0], pad_token_id=0).tolist() == [[T, T, F, F]]
    assert pm.first_eos_mask(torch.tensor([[5, 0, 0, 0]]), [7], pad_token_id=0).tolist() == [[T, F, F, F]]


class ForcedTokens(LogitsProcessor):
    """Makes row ``i`` emit ``tokens[i]`` at generated position ``at`` (None: nothing forced)."""

    def __init__(self, prompt_length: int, at: int, tokens: list[int | None]) -> None:
        self.prompt_length, self.at, self.tokens = prompt_length, at, tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_length == self.at:
            for row, token in enumerate(self.tokens):
                if token is not None:
                    scores[row] = torch.where(torch.arange(scores.shape[1]) == token, 0.0, -float("inf"))
        return scores


def test_sampling_stops_at_the_end_of_turn_token_and_the_missing_eos_rule_counts_it(qwen_dir: Path):
    tokenizer = load_tokenizer(str(qwen_dir))
    policy = load_causal_lm(str(qwen_dir), tokenizer)
    ids = [encode_prompt_record({"messages": user(q)}, tokenizer, 64) for q in QUESTIONS[:3]]
    prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left"), attention_mask_for(ids, "left")
    end, eos = im_end(tokenizer), tokenizer.eos_token_id
    # Row 0 ends its turn, row 1 emits EOS, row 2 runs out of tokens: all through transformers'
    # own stopping (the generation config the package builds) and the package's masking.
    forced = LogitsProcessorList([ForcedTokens(prompt_ids.shape[1], at=2, tokens=[end, eos, None])])
    generate = policy.generate
    # forced before the package's sampler (which then draws the forced token with probability 1)
    policy.generate = lambda logits_processor, **kwargs: generate(**kwargs, logits_processor=forced + logits_processor)
    seen = {}

    def score_fn(responses):
        seen["responses"] = responses
        return torch.ones(len(responses.completions))

    loop = RolloutLoop(policy, load_causal_lm(str(qwen_dir), tokenizer), None, score_fn, tokenizer,
                       GenerationSettings(max_new_tokens=6), missing_eos_penalty=-1.0, advantage_estimator="reinforce_pp")
    torch.manual_seed(0)
    batch = loop.run(prompt_ids, prompt_mask, kl_coef=0.1)
    assert batch.response_ids[0, 2] == end and batch.response_ids[1, 2] == eos
    assert batch.response_mask.tolist()[:2] == [[True] * 3 + [False] * 3] * 2  # masked after the stop token
    assert (batch.response_ids[:2, 3:] == tokenizer.pad_token_id).all()
    assert batch.response_mask[2].all() and not pm.has_eos(batch.response_ids[2:], [end, eos]).any()
    assert batch.contains_eos.tolist() == [True, True, False]
    assert batch.scores.tolist() == [1.0, 1.0, -1.0]  # only the response that ran out is penalised
    assert rollout_statistics(batch, 0.1, with_critic=False)["val/num_eos_tokens"].item() == 2
    # What a reward source is given: the chat rendering, the answer ending with <|im_end|>.
    responses = seen["responses"]
    row = tokenizer.decode(responses.input_ids[0][responses.attention_mask[0].bool()])
    assert row.startswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n") and row.endswith("<|im_end|>")
    assert responses.stop_ids == [eos, end]

    # Sampling alone (SFT samples, labelling, evaluation) follows the same rule.
    responses = sample(policy, tokenizer, GenerationSettings(max_new_tokens=6), prompt_ids, prompt_mask, seed=0)
    assert responses.response_mask.sum(1).tolist() == [3, 3, 6]


def test_ppo_warns_when_sampling_is_truncated(tmp_path: Path):
    with pytest.warns(UserWarning, match=r"generation.top_k=5, top_p=1.0: responses are sampled from a truncated"):
        PPOModule(reward_fn=len, generation=GenerationSettings(top_k=5), policy_export_dir=None, critic_export_dir=None)
    with pytest.warns(UserWarning, match=r"top_k=0, top_p=0.9"):
        PPOModule(reward_fn=len, generation=GenerationSettings(top_p=0.9), policy_export_dir=None, critic_export_dir=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PPOModule(reward_fn=len, policy_export_dir=None, critic_export_dir=None)  # full distribution: silent


# ------------------------------------------------------------------------ training data
def test_chat_training_sequences_end_with_the_end_of_turn_token():
    tokenizer = chat_tokenizer()
    end = im_end(tokenizer)
    conversation = [*user(QUESTIONS[0]), {"role": "assistant", "content": ANSWERS[0]},
                    *user(QUESTIONS[1]), {"role": "assistant", "content": ANSWERS[1]}]
    example = encode_sft({"messages": conversation}, tokenizer, 256)
    assert tokenizer.decode(example["input_ids"]) == render(tokenizer, conversation, False)
    learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Red.<|im_end|>\nA pear.<|im_end|>\n"  # assistant turns only, with their end
    assert tokenizer.eos_token_id not in example["input_ids"]

    # A preference pair on a chat prompt: the prompt rendered for generation, each response
    # ending with <|im_end|> as a sampled one does; a plain prompt keeps EOS.
    record = {"prompt": user(QUESTIONS[0]), "chosen": "Red.", "rejected": "Tuesday."}
    pair = encode_preference(record, tokenizer, 64)
    assert tokenizer.decode(pair["chosen"]) == render(tokenizer, user(QUESTIONS[0]), True) + "Red.<|im_end|>"
    assert pair["chosen"][-1] == pair["rejected"][-1] == end
    assert pair["chosen_response_length"] == len(tokenizer("Red.", add_special_tokens=False).input_ids) + 1
    plain = encode_preference({"prompt": "Q", "chosen": "Red.", "rejected": "Blue."}, tokenizer, 64)
    assert plain["chosen"][-1] == tokenizer.eos_token_id
    # Truncation keeps the end token.
    assert encode_preference({**record, "chosen": "Red. " * 20}, tokenizer, 8)["chosen"][-1] == end

    # An SFT conversation scored as a demonstration (the reward model's normalisation).
    assert demonstration_pair({"messages": conversation}) == {"prompt": conversation[:3], "chosen": ANSWERS[1],
                                                              "rejected": ANSWERS[1]}
    assert demonstration_pair({"prompt": "Q", "completion": " A"}) == {"prompt": "Q", "chosen": " A", "rejected": " A"}


def test_chat_preference_records_are_checked():
    record = {"prompt": user("Hi"), "chosen": "a", "rejected": "b"}
    assert check_preference(record, "p.jsonl", 1) is record
    with pytest.raises(DataFormatError, match=r"^p.jsonl:3: field 'prompt\[0\].content': missing or not a string$"):
        check_preference({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "p.jsonl", 3)
    with pytest.raises(DataFormatError, match=r"^p.jsonl:2: field 'prompt': expected a non-empty list"):
        check_preference({"prompt": [], "chosen": "a", "rejected": "b"}, "p.jsonl", 2)


# --------------------------------------------------------------------- the three stages
def chat_files(folder: Path) -> dict[str, Path]:
    """SFT conversations, chat preference pairs and chat prompts (train and validation)."""
    folder.mkdir(parents=True, exist_ok=True)
    sft = [{"messages": [*user(q), {"role": "assistant", "content": a}]} for q, a in zip(QUESTIONS, ANSWERS)] * 8
    prefs = [{"prompt": user(q), "chosen": a, "rejected": a + " " + a} for q, a in zip(QUESTIONS, ANSWERS)] * 8
    prompts = [{"messages": user(q)} for q in QUESTIONS] * 4
    return {
        "sft": write_lines(folder / "sft.jsonl", sft), "sft_val": write_lines(folder / "sft_val.jsonl", sft[:4]),
        "prefs": write_lines(folder / "prefs.jsonl", prefs), "prefs_val": write_lines(folder / "prefs_val.jsonl", prefs[:4]),
        "prompts": write_lines(folder / "prompts.jsonl", prompts), "prompts_val": write_lines(folder / "prompts_val.jsonl", prompts[:8]),
    }


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


class RecordingPPO(PPOModule):
    """Keeps the responses its reward model scored."""

    def compute_scores(self, responses):
        self.scored = responses
        return super().compute_scores(responses)


def test_sft_reward_and_ppo_on_a_chat_model(tmp_path: Path, qwen_dir: Path):
    seed_everything(0)
    files = chat_files(tmp_path / "data")

    # SFT, assistant turns only: the model learns to answer and to end its turn.
    sft_export = tmp_path / "sft"
    sft = SFTModule(model_name_or_path=str(qwen_dir), learning_rate=2e-2, warmup_steps=2, export_dir=str(sft_export))
    sft_data = SFTDataModule(train_file=str(files["sft"]), val_file=str(files["sft_val"]), batch_size=8, max_length=64)
    quiet_trainer(max_steps=60, limit_val_batches=0).fit(sft, datamodule=sft_data)
    batch = next(iter(sft_data.train_dataloader()))
    tokenizer = load_tokenizer(str(sft_export))
    end = im_end(tokenizer)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
        assert learned in {a + "<|im_end|>\n" for a in ANSWERS}
    assert json.loads((sft_export / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id, end]
    policy = load_causal_lm(str(sft_export), tokenizer)
    ids = [encode_prompt_record({"messages": user(q)}, tokenizer, 64) for q in QUESTIONS]
    prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left"), attention_mask_for(ids, "left")
    responses = sample(policy, tokenizer, GenerationSettings(max_new_tokens=12), prompt_ids, prompt_mask, seed=0)
    lengths = responses.response_mask.sum(1)
    assert (responses.response_ids[torch.arange(4), lengths - 1] == end).all()  # every answer ends its turn
    assert all(completion.endswith(".") for completion in responses.completions)  # (decoded without it)

    # The reward model trains on the chat rendering, each response ending with <|im_end|>.
    reward_export = tmp_path / "rm"
    reward = RewardModule(model_name_or_path=str(sft_export), learning_rate=1e-3, warmup_steps=2, export_dir=str(reward_export),
                          normalize_file=str(files["sft_val"]))
    reward_data = PreferenceDataModule(train_file=str(files["prefs"]), val_file=str(files["prefs_val"]), batch_size=8, max_length=64)
    quiet_trainer(max_steps=10, limit_val_batches=0).fit(reward, datamodule=reward_data)
    pairs = next(iter(reward_data.train_dataloader()))
    for ids, mask in zip(pairs["input_ids"], pairs["attention_mask"]):
        text = tokenizer.decode(ids[mask.bool()])
        assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text and text.endswith("<|im_end|>")
    assert reward.reward_offset is not None  # normalised on the SFT conversations

    # PPO: responses stop on <|im_end|>, count as ended, and the reward model sees the chat rendering.
    ppo = RecordingPPO(policy=str(sft_export), reward_model=str(reward_export), learning_rate=1e-4,
                       generation=GenerationSettings(max_new_tokens=12), ppo=PPOSettings(epochs=1, num_minibatches=2),
                       scores=ScoreSettings(missing_eos_penalty=-1.0), max_iterations=2, forward_batch_size=8,
                       policy_export_dir=str(tmp_path / "ppo"), critic_export_dir=None)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(ppo, datamodule=PromptDataModule(train_file=str(files["prompts"]), val_fraction=0, batch_size=8, max_length=64))
    assert ppo.iteration == 2
    scored = ppo.scored
    ended = pm.has_eos(scored.response_ids, scored.stop_ids)
    assert ended.sum() >= 6 and trainer.callback_metrics["val/num_eos_tokens"].item() == ended.sum().item()
    for ids, mask, complete in zip(scored.input_ids, scored.attention_mask, ended):
        text = tokenizer.decode(ids[mask.bool()])
        assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text
        assert text.endswith("<|im_end|>") == bool(complete)
    exported = json.loads((tmp_path / "ppo" / "generation_config.json").read_text())
    assert sorted(exported["eos_token_id"]) == sorted([tokenizer.eos_token_id, end])


@pytest.mark.slow
def test_pipeline_on_a_chat_model(tmp_path: Path, qwen_dir: Path, capfd):
    from rlhf_lightning.cli import main

    run = tmp_path / "run"
    run.mkdir()
    files = chat_files(tmp_path / "data")
    pipeline_path = tiny_stage_configs(run)
    for name, train, val in (("sft", "sft", "sft_val"), ("reward", "prefs", "prefs_val"), ("ppo", "prompts", "prompts_val")):
        path = run / f"{name}.yaml"
        config = yaml.safe_load(path.read_text())
        config["data"]["init_args"].update(train_file=str(files[train]), val_file=str(files[val]), max_length=64)
        if name == "sft":  # the chat model, trained long enough to end its turns
            config["model"]["init_args"].update(model_name_or_path=str(qwen_dir), tokenizer_name_or_path=None,
                                                learning_rate=2e-2)
            config["trainer"].update(max_steps=60)
        path.write_text(yaml.safe_dump(config))
    pipeline = yaml.safe_load(pipeline_path.read_text())
    pipeline.update(judge=None, eval_prompts=str(files["prompts_val"]))
    pipeline_path.write_text(yaml.safe_dump(pipeline))

    assert main(["pipeline", "--config", str(pipeline_path)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["comparison"]["num_prompts"] == 8
    for row in summary["samples"]:
        assert row["prompt"].startswith("user\n")  # the rendered chat prompt, markers decoded away
    tokenizer = load_tokenizer(str(run / "ppo/policy"))
    assert chat_turn_end_id(tokenizer) == im_end(tokenizer)
    exported = json.loads((run / "ppo/policy/generation_config.json").read_text())
    assert im_end(tokenizer) in exported["eos_token_id"]
    assert summary["ppo"]["eval/eos_rate"] > 0.5  # PPO's validation counts <|im_end|> as an ended response


def test_reward_validation_judge_reads_chat_prompts_as_rendered_text(tmp_path: Path, qwen_dir: Path):
    files = chat_files(tmp_path / "data")
    seen: list[str] = []

    def judge(prompts, completions):
        seen.extend(prompts)
        return [float(len(c)) for c in completions]

    module = RewardModule(str(qwen_dir), export_dir=None, judge=judge)
    data = PreferenceDataModule(train_file=str(files["prefs"]), val_file=str(files["prefs_val"]), batch_size=4, max_length=64)
    trainer = quiet_trainer()
    trainer.validate(module, datamodule=data)
    tokenizer = load_tokenizer(str(qwen_dir))
    assert sorted(seen) == sorted(render(tokenizer, user(q), add_generation_prompt=True) for q in QUESTIONS * 2)
    assert trainer.callback_metrics["val/gold_accuracy"].item() >= 0  # the judge's scores were matched to the rows
