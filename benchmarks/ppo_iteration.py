"""Seconds per PPO iteration of rlhf-lightning's PPOModule, at the shapes of
``../shared/bench/floor_ppo.py`` (same environment variables), for side-by-side comparison.

Random-init GPT-2 policy, reward model and critic of the same shape are saved to a temporary
folder and loaded through the package's normal path; responses are forced to RESPONSE_LEN
tokens like the floor's. Prints one JSON line with ``median_iter_s`` (the first iteration is
not counted). Measure peak memory with ``/usr/bin/time -v``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_lightning.records import write_jsonl
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import byte_tokenizer
from rlhf_lightning.modules import PPOModule, PPOSettings
from rlhf_lightning.generation import GenerationSettings

ENV = {k: int(os.environ.get(k, d)) for k, d in dict(BATCH=32, PROMPT_LEN=16, RESPONSE_LEN=48, PPO_EPOCHS=4,
                                                      MINIBATCHES=4, ITERS=6, N_EMBD=128, N_LAYER=4, VOCAB=0,
                                                      THREADS=2).items()}


class IterationTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def save_models(folder: Path) -> tuple[Path, Path]:
    tokenizer = byte_tokenizer()
    vocab = ENV["VOCAB"] or len(tokenizer)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=ENV["N_EMBD"], n_layer=ENV["N_LAYER"], n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    policy, reward = folder / "policy", folder / "reward"
    GPT2LMHeadModel(config).save_pretrained(policy)
    GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 1})).save_pretrained(reward)
    for path in (policy, reward):
        tokenizer.save_pretrained(path)
    return policy, reward


def main() -> None:
    torch.set_num_threads(ENV["THREADS"])
    seed_everything(0)
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward = save_models(Path(tmp))
        prompt = "the movie was good and the plot"[: ENV["PROMPT_LEN"]].ljust(ENV["PROMPT_LEN"])
        prompts = write_jsonl(Path(tmp) / "prompts.jsonl", [{"prompt": prompt}] * ENV["BATCH"] * ENV["ITERS"])
        module = PPOModule(
            policy=str(policy), reward_model=str(reward), learning_rate=1e-4, max_iterations=ENV["ITERS"],
            generation=GenerationSettings(max_new_tokens=ENV["RESPONSE_LEN"], min_new_tokens=ENV["RESPONSE_LEN"]),
            ppo=PPOSettings(epochs=ENV["PPO_EPOCHS"], num_minibatches=ENV["MINIBATCHES"]),
            policy_export_dir=None, critic_export_dir=None,
        )
        timer = IterationTimer()
        trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
        data = PromptDataModule(train_file=str(prompts), val_fraction=0.0, batch_size=ENV["BATCH"], max_length=64)
        trainer.fit(module, datamodule=data)
    times = sorted(timer.seconds[1:])
    print(json.dumps({"impl": "rlhf-lightning", "iters": len(timer.seconds),
                      "median_iter_s": round(times[len(times) // 2], 4)}))


if __name__ == "__main__":
    main()
