"""Comparing two policies on held-out prompts: what the pipeline report is made of.

Both policies sample with the same seed and settings; the reward model (when given) scores
both, KL to the reference is measured on the trained policy's samples, and a gold judge (when
given) judges the pair (win rate, gold score, validity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torchmetrics.functional import spearman_corrcoef

from . import ppo_math as pm
from .data.encoding import attention_mask_for, encode_preference, encode_prompt, pad
from .data.records import Record
from .models import load_causal_lm, load_sequence_scorer, load_tokenizer
from .reward_scoring import pair_accuracy, score_sequences
from .rewards import RewardModelScorer, TextRewardFn
from .rollout import GenerationSettings, Responses, RolloutLoop, response_logprobs


@dataclass
class PolicyComparison:
    """Averages over the prompts; ``gold_*`` and ``*reward_gold_spearman`` (the rank correlation
    of reward-model and gold scores on each policy's samples) only with a judge, ``*validity``
    only with a judge that has ``is_valid``."""

    num_prompts: int
    score: float | None
    baseline_score: float | None
    kl: float
    response_length: float
    baseline_response_length: float
    gold_score: float | None = None
    baseline_gold_score: float | None = None
    gold_win_rate: float | None = None
    validity: float | None = None
    baseline_validity: float | None = None
    reward_gold_spearman: float | None = None
    baseline_reward_gold_spearman: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_responses(
    loop: RolloutLoop, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int
) -> Responses:
    """Responses of ``model`` sampled with ``loop``'s settings under a fixed ``seed``.

    The global RNG is left as it was, so evaluating never changes what training samples next.
    """
    devices = [] if prompt_ids.device.type == "cpu" else [prompt_ids.device]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        response_ids, response_mask = replace(loop, policy=model).generate(prompt_ids, prompt_mask)
    return Responses(prompt_ids, prompt_mask, response_ids, response_mask, loop.tokenizer)


#: A gold judge has the signature of a text reward function (and may have ``is_valid``).
JudgeFn = TextRewardFn


def judge_pairs(judge: JudgeFn, prompts: list[str], completions: list[str], baseline_completions: list[str]) -> dict[str, list[float]]:
    """A gold judge on two sets of completions for the same prompts: gold scores, wins of the
    first over the second (ties 0.5) and, when the judge has ``is_valid``, validity (0/1)."""
    from .tasks import compare, judge_validity

    gold = [float(g) for g in judge(list(prompts), list(completions))]
    baseline = [float(g) for g in judge(list(prompts), list(baseline_completions))]
    judged = {"gold": gold, "baseline_gold": baseline, "win": list(map(compare, gold, baseline))}
    validity = judge_validity(judge, prompts, completions)
    if validity is not None:
        judged["validity"] = validity
        judged["baseline_validity"] = judge_validity(judge, prompts, baseline_completions)
    return judged


@torch.no_grad()
def compare_policies(
    policy_dir: str,
    baseline_dir: str,
    prompts: list[str],
    reward_model_dir: str | None = None,
    generation: GenerationSettings | None = None,
    judge: JudgeFn | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> tuple[PolicyComparison, list[dict[str, Any]]]:
    """Sample both policies on ``prompts`` and compare them (with ``judge``, also by the judge);
    also returns per-prompt samples."""
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tokenizer).eval()
    baseline = load_causal_lm(baseline_dir, tokenizer).eval()
    scorer = None
    if reward_model_dir is not None:
        reward_tokenizer = load_tokenizer(reward_model_dir)
        scorer = RewardModelScorer(load_sequence_scorer(reward_model_dir, reward_tokenizer), reward_tokenizer, tokenizer)
    loop = RolloutLoop(policy=policy, reference=baseline, critic=None, score_fn=None, tokenizer=tokenizer,
                       generation=generation or GenerationSettings())
    rows: list[dict[str, Any]] = []
    kls: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left"), attention_mask_for(ids, "left")
        mine = sample_responses(loop, policy, prompt_ids, prompt_mask, seed + start)
        theirs = sample_responses(loop, baseline, prompt_ids, prompt_mask, seed + start)
        scores = scorer(mine).tolist() if scorer else [None] * len(chunk)
        baseline_scores = scorer(theirs).tolist() if scorer else [None] * len(chunk)
        kls += sequence_kl(policy, baseline, mine, loop.generation.temperature).tolist()
        judged = judge_pairs(judge, chunk, mine.completions, theirs.completions) if judge is not None else {}
        for i, prompt in enumerate(chunk):
            row = {
                "prompt": prompt,
                "response": mine.completions[i], "score": scores[i], "length": int(mine.response_mask[i].sum()),
                "baseline_response": theirs.completions[i], "baseline_score": baseline_scores[i],
                "baseline_length": int(theirs.response_mask[i].sum()),
            }
            row.update({key: values[i] for key, values in judged.items()})
            rows.append(row)
    return summarise(rows, kls), rows


@torch.no_grad()
def reward_model_accuracy(reward_model_dir: str, records: list[Record], max_length: int = 256, batch_size: int = 64) -> float:
    """Share of preference ``records`` whose ``chosen`` the reward model at ``reward_model_dir``
    scores above ``rejected`` (ties 0.5), each encoded as the reward stage encodes pairs."""
    if not records:
        raise ValueError("reward_model_accuracy needs at least one preference record")
    tokenizer = load_tokenizer(reward_model_dir)
    model = load_sequence_scorer(reward_model_dir, tokenizer)
    pairs = [encode_preference(record, tokenizer, max_length) for record in records]
    scores = {}
    for side in ("chosen", "rejected"):
        rows = [pair[side] for pair in pairs]
        scores[side] = score_sequences(model, pad(rows, tokenizer.pad_token_id), attention_mask_for(rows), batch_size)
    return pair_accuracy(scores["chosen"], scores["rejected"]).mean().item()


def sequence_kl(policy: torch.nn.Module, reference: torch.nn.Module, responses: Responses, temperature: float) -> torch.Tensor:
    """Per-response KL estimate ``sum_t (logp - ref_logp)`` ``(b,)`` on the policy's own samples."""
    input_ids, attention = responses.input_ids, responses.attention_mask
    length = responses.response_ids.shape[1]
    logprobs, _ = response_logprobs(policy, input_ids, attention, length, temperature)
    ref_logprobs, _ = response_logprobs(reference, input_ids, attention, length, temperature)
    return pm.masked_sum(pm.kl_penalty(logprobs, ref_logprobs, "k1"), responses.response_mask, dim=1)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def rank_correlation(xs: list[float | None], ys: list[float | None]) -> float | None:
    """Spearman's rho between two series (tied values share their mean rank), over the
    positions where both are known; None when it is undefined (under two points, or a series
    that is constant)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 2 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return None
    x, y = torch.tensor(pairs, dtype=torch.float64).unbind(dim=1)
    return spearman_corrcoef(x, y).item()


def summarise(rows: list[dict[str, Any]], kls: list[float]) -> PolicyComparison:
    """Averages of the per-prompt rows; judge metrics when the rows carry them."""
    comparison = PolicyComparison(
        num_prompts=len(rows),
        score=_mean([r["score"] for r in rows]),
        baseline_score=_mean([r["baseline_score"] for r in rows]),
        kl=sum(kls) / len(kls),
        response_length=_mean([r["length"] for r in rows]),
        baseline_response_length=_mean([r["baseline_length"] for r in rows]),
    )
    if rows and "gold" in rows[0]:
        comparison.gold_score = _mean([r["gold"] for r in rows])
        comparison.baseline_gold_score = _mean([r["baseline_gold"] for r in rows])
        comparison.gold_win_rate = _mean([r["win"] for r in rows])
        # Does the reward model rank fresh samples as the gold annotator does? On the SFT
        # policy's samples this is the reward model's own quality on the text PPO starts from;
        # on the PPO policy's samples, a drop below it shows the policy exploiting the model.
        comparison.reward_gold_spearman = rank_correlation([r["score"] for r in rows], [r["gold"] for r in rows])
        comparison.baseline_reward_gold_spearman = rank_correlation(
            [r["baseline_score"] for r in rows], [r["baseline_gold"] for r in rows]
        )
    if rows and "validity" in rows[0]:
        comparison.validity = _mean([r["validity"] for r in rows])
        comparison.baseline_validity = _mean([r["baseline_validity"] for r in rows])
    return comparison
