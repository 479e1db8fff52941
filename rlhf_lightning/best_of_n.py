"""Best-of-n (rejection) sampling: draw ``n`` responses per prompt, keep the one a scorer likes best.

It is the reference point of RLHF's optimisers (a policy that moves no further from its start
than best-of-n, ``KL = log n - (n - 1) / n`` nats, should score at least as well) and a tool of
its own: the kept responses are SFT data for another round ("rejection sampling fine-tuning").

    rlhf-lightning best-of-n --policy outputs/demo/sft/model --prompts prompts.jsonl --n 16 \\
        --reward_model outputs/demo/reward/model --out best.jsonl
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .data.encoding import attention_mask_for, encode_prompt, pad
from .records import read_prompts, write_jsonl
from .errors import UserInputError
from .models import load_causal_lm, load_reward_model, load_tokenizer
from .generation import GenerationSettings, Responses, sample
from .reward_sources import CallableScorer, RewardModelScorer

Scorer = Callable[[Responses], Tensor]


def best_of_n_kl(n: int) -> float:
    """The KL (nats) of best-of-``n`` sampling to the sampled policy: ``log n - (n - 1) / n``
    (Stiennon et al. 2020, an upper bound that is exact for continuous scores)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def sample_candidates(
    policy_dir: str,
    prompts: Sequence[str],
    n: int,
    generation: GenerationSettings | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Responses]:
    """``n`` samples of each prompt from the policy in ``policy_dir``, in chunks of about
    ``batch_size`` rows; rows are prompt-major (prompt ``i``'s samples are rows ``i*n .. i*n+n-1``
    of the chunks concatenated)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tokenizer).eval()
    generation = generation or GenerationSettings()
    per_chunk = max(1, batch_size // n)
    chunks = []
    for start in range(0, len(prompts), per_chunk):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + per_chunk] for _ in range(n)]
        prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left"), attention_mask_for(ids, "left")
        chunks.append(sample(policy, tokenizer, generation, prompt_ids, prompt_mask, seed + start))
    return chunks


def score_candidates(candidates: list[Responses], n: int, scorer: Scorer) -> Tensor:
    """Scores ``(num_prompts, n)`` of the candidates."""
    return torch.cat([scorer(chunk).float().cpu() for chunk in candidates]).view(-1, n)


def completions_of(candidates: list[Responses], n: int) -> list[list[str]]:
    """The candidates' texts, ``n`` per prompt."""
    texts = [c for chunk in candidates for c in chunk.completions]
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def best_of_n(candidates: list[Responses], n: int, scorer: Scorer) -> tuple[list[str], Tensor]:
    """Per prompt, the candidate ``scorer`` scores highest (the first on a tie) and its score."""
    scores = score_candidates(candidates, n, scorer)
    best = scores.argmax(dim=1)
    texts = completions_of(candidates, n)
    return [texts[i][j] for i, j in enumerate(best.tolist())], scores.gather(1, best[:, None]).squeeze(1)


def load_scorer(policy_dir: str, reward_model: str | None, reward_fn: str | None) -> Scorer:
    """A reward-model folder or a ``(prompts, completions) -> scores`` import path, as a scorer."""
    if (reward_model is None) == (reward_fn is None):
        raise UserInputError("best-of-n: give exactly one of --reward_model or --reward_fn")
    if reward_fn is not None:
        from .tasks import load_callable

        return CallableScorer(load_callable(reward_fn, "best-of-n: --reward_fn"))
    reward_tokenizer = load_tokenizer(reward_model)
    model = load_reward_model(reward_model, reward_tokenizer, key="best-of-n: --reward_model").eval()
    return RewardModelScorer(model, reward_tokenizer, load_tokenizer(policy_dir))


def best_of_n_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-lightning best-of-n", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="policy folder (e.g. the SFT export)")
    parser.add_argument("--prompts", required=True, help='{"prompt"} JSONL')
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (default 16)")
    parser.add_argument("--reward_model", default=None, help="reward-model folder to rank with")
    parser.add_argument("--reward_fn", default=None, help="or the import path of (prompts, completions) -> scores")
    parser.add_argument("--out", required=True, help='JSONL to write: {"prompt", "completion", "score"} per prompt')
    parser.add_argument("--max_new_tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(list(argv))
    if options.n < 1:
        raise UserInputError(f"best-of-n: --n must be >= 1, got {options.n}")
    prompts = [r["prompt"] for r in read_prompts(options.prompts)]
    scorer = load_scorer(options.policy, options.reward_model, options.reward_fn)
    generation = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature)
    candidates = sample_candidates(options.policy, prompts, options.n, generation, options.seed)
    best, scores = best_of_n(candidates, options.n, scorer)
    write_jsonl(options.out, [{"prompt": p, "completion": c, "score": s} for p, c, s in zip(prompts, best, scores.tolist())])
    print(f"best-of-{options.n}: {len(prompts)} prompts, mean score {scores.mean().item():.4f} "
          f"(KL to the policy at most {best_of_n_kl(options.n):.2f} nats) -> {options.out}")
    return 0
