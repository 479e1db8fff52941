"""Peak memory (resident set size) of one PPO iteration at Qwen2-0.5B's shape, for several ways
of holding the four models (policy, reference, critic, reward model).

A policy and a reward model with Qwen2-0.5B's published sizes (built from a ``Qwen2Config``,
random weights, float32, no download) are saved with ``save_pretrained`` to a temporary folder
and loaded through the package's own loaders (``PPOModule``); the critic starts from the reward
model. Each configuration then runs ONE PPO iteration (rollout + one optimiser step) through
``Trainer.fit`` on a few prompts, in a subprocess of its own so that peaks do not mix, and
reports each process's peak RSS (``resource.getrusage``'s ``ru_maxrss``: the interpreter, torch,
the models, AdamW's state and the activations):

    full   full fine-tuning, one process: four models in memory
    lora   LoRA (r 16, all-linear), one process: the reference is the policy's base with the
           adapter disabled (one copy of the base weights); the critic is a separate model
    lora-critic-adapter
           LoRA with ``lora.critic: adapter``, one process: the critic is a second adapter and a
           value head on the policy's base, so policy, reference and critic share one copy of
           the base weights (the reward model is the only other model)
    ddp    full fine-tuning under DDP, 2 CPU processes (gloo): every process holds everything
    fsdp2  full fine-tuning under FSDP2 (ModelParallelStrategy), 2 CPU processes: each holds
           half of every model's weights between uses

    python benchmarks/memory.py                           # every configuration (needs tens of GB)
    python benchmarks/memory.py --configs full lora lora-critic-adapter  # some of them
    python benchmarks/memory.py --shape micro             # a tiny shape: checks that the script runs

Prints one row per configuration: the peak RSS of each process in MiB and the wall seconds.

The health guards are on, except ``NonFiniteGuard``'s CPU snapshot of the last good iteration
(``snapshot_every=0``): it holds a copy of every trained weight and its AdamW moments, three times
the trained weights (about 11 GiB more for full fine-tuning at this shape, about 5.5 GiB with LoRA and a
separate critic, a few MB with ``lora.critic: adapter``), and
would measure that choice rather than how the models are held.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Model shapes (``Qwen2Config`` arguments). ``qwen2-0.5b``: Qwen2-0.5B's published config
#: (494M parameters with the tied embedding); ``micro``: a tiny one, to check the script quickly.
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       max_position_embeddings=32768),
    # Qwen2-0.5B's widths and vocabulary with 6 of its 24 blocks (225M parameters): small enough
    # for DDP's two full copies of everything on this 24 GB machine
    "qwen2-0.5b-6-layers": dict(hidden_size=896, num_hidden_layers=6, num_attention_heads=14, num_key_value_heads=2,
                                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                max_position_embeddings=32768),
    "micro": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=1024, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  max_position_embeddings=256),
}
PROMPT = "the movie was good and the plot"
#: The marker of the line each process prints with its peak.
RESULT_KEY = "peak_rss_mib"


@dataclass(frozen=True)
class Setup:
    """A way to hold PPO's models: how many processes, under which Trainer strategy, and with
    LoRA: ``lora_critic`` is the ``lora.critic`` setting (None: full fine-tuning, no LoRA)."""

    processes: int
    strategy: str
    lora_critic: str | None
    what: str


SETUPS = {
    "full": Setup(1, "auto", None, "full fine-tuning, 4 models"),
    "lora": Setup(1, "auto", "separate", "LoRA, reference = policy's base, separate critic"),
    "lora-critic-adapter": Setup(1, "auto", "adapter", "LoRA, reference and critic on the policy's base"),
    "ddp": Setup(2, "ddp", None, "full fine-tuning, DDP"),
    "fsdp2": Setup(2, "fsdp2", None, "full fine-tuning, FSDP2"),
}


def save_models(folder: Path, shape: str) -> None:
    """A random policy (causal LM) and reward model (scalar head) of ``shape``, in ``folder/policy``
    and ``folder/reward``, with a small byte-level BPE tokenizer (Qwen2's kind: transformers loads
    a Qwen2 folder's tokenizer as ``Qwen2Tokenizer``, which would misread the byte tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from rlhf_lightning.tokenizer_training import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([PROMPT])
    sizes = dict(SHAPES[shape], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    for name, cls, head in (("policy", Qwen2ForCausalLM, {}), ("reward", Qwen2ForSequenceClassification, {"num_labels": 1})):
        model = cls(Qwen2Config(**sizes, **head))
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        del model


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one_iteration(setup_name: str, folder: Path, prompts: int, response_len: int) -> None:
    """One PPO iteration of the setup ``setup_name`` on the models in ``folder``; every process
    prints a JSON line with its rank and peak RSS."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.generation import GenerationSettings
    from rlhf_lightning.guards import NonFiniteGuard
    from rlhf_lightning.lora import LoRASettings
    from rlhf_lightning.modules import PPOModule, PPOSettings

    setup = SETUPS[setup_name]
    seed_everything(0)
    module = PPOModule(
        policy=str(folder / "policy"), reward_model=str(folder / "reward"), learning_rate=1e-5, max_iterations=1,
        lora=None if setup.lora_critic is None else LoRASettings(critic=setup.lora_critic),
        generation=GenerationSettings(max_new_tokens=response_len, min_new_tokens=response_len),
        ppo=PPOSettings(epochs=1, num_minibatches=1), policy_export_dir=None, critic_export_dir=None,
    )
    strategy = (ModelParallelStrategy(data_parallel_size=setup.processes, tensor_parallel_size=1)
                if setup.strategy == "fsdp2" else setup.strategy)
    trainer = Trainer(accelerator="cpu", devices=setup.processes, strategy=strategy, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[NonFiniteGuard(snapshot_every=0)])  # the other guards stay (module docstring)
    data = PromptDataModule(train_file=str(folder / "prompts.jsonl"), val_fraction=0.0, batch_size=prompts, max_length=64)
    trainer.fit(module, datamodule=data)
    print(json.dumps({"setup": setup_name, "rank": trainer.global_rank, "iterations": module.iteration,
                      RESULT_KEY: round(peak_rss_mib(), 1)}), flush=True)


def measure(setup_name: str, folder: Path, args: argparse.Namespace) -> dict:
    """Run ``setup_name`` in a subprocess; its per-rank peaks (MiB), seconds and any failure."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run", setup_name, "--folder", str(folder),
               "--prompts", str(args.prompts), "--response-len", str(args.response_len)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    results = [json.loads(line) for line in done.stdout.splitlines() if RESULT_KEY in line]
    peaks = [r[RESULT_KEY] for r in sorted(results, key=lambda r: r["rank"]) if r["iterations"] == 1]
    failed = done.returncode != 0 or len(peaks) != SETUPS[setup_name].processes
    error = (done.stderr.strip().splitlines() or ["no output"])[-1] if failed else ""
    return {"setup": setup_name, "peaks": peaks, "seconds": seconds, "error": error}


def table(rows: list[dict]) -> str:
    lines = ["| setup | what | processes | peak RSS per process (MiB) | seconds |", "|---|---|---|---|---|"]
    for row in rows:
        setup = SETUPS[row["setup"]]
        peaks = " / ".join(f"{p:.0f}" for p in row["peaks"]) or "-"
        if row["error"]:
            peaks = f"failed: {row['error']}"
        lines.append(f"| {row['setup']} | {setup.what} | {setup.processes} | {peaks} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--configs", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per process in the iteration")
    parser.add_argument("--response-len", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--run", choices=list(SETUPS), help=argparse.SUPPRESS)  # a subprocess of measure()
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)  # save_models in a subprocess
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.run:
        run_one_iteration(args.run, args.folder, args.prompts, args.response_len)
        return
    if args.save:
        save_models(args.folder, args.shape)
        return
    from rlhf_lightning.records import write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # in a process of its own: this one stays small while the measured ones run beside it
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--save", "--folder", str(folder),
                        "--shape", args.shape], check=True)
        most_processes = max(SETUPS[name].processes for name in args.configs)
        write_jsonl(folder / "prompts.jsonl", [{"prompt": PROMPT}] * args.prompts * most_processes)
        rows = []
        for name in args.configs:
            rows.append(measure(name, folder, args))
            print(f"{name}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"shape {args.shape}, {args.prompts} prompts per process, {args.response_len} new tokens, one PPO iteration")
    print(table(rows))


if __name__ == "__main__":
    main()
