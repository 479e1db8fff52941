"""Comparing two policies on held-out prompts: the pipeline's final comparison and PPO's validation.

Both policies sample with the same seed and settings; the reward model (when given) scores
both, KL to the reference is measured on the trained policy's samples, and a gold judge (when
given) judges the pair (win rate, gold score, validity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.functional import spearman_corrcoef

from . import rlhf_math as pm
from .data.encoding import attention_mask_for, encode_preference, pad, prompt_record_ids
from .forwards import response_logprobs, score_sequences
from .generation import GenerationSettings, Responses, sample
from .models import load_causal_lm, load_sequence_scorer, load_tokenizer
from .records import Record
from .reward_sources import RewardModelScorer, TextRewardFn
from .terminal import spearman_corrcoef as spearman_metric


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



@dataclass
class BatchComparison:
    """A policy's and a baseline's samples on the same prompts under the same seed: reward scores
    ``(b,)`` of each (None without a reward source), the policy's KL to the baseline ``(b,)`` on its
    own samples, and the judge's verdicts (:func:`judge_pairs`; None without a judge)."""

    policy: Responses
    baseline: Responses
    scores: Tensor | None
    baseline_scores: Tensor | None
    kl: Tensor
    judged: dict[str, list[float]] | None

    def rows(self) -> list[dict[str, Any]]:
        """One row per prompt: both responses with their scores and lengths, and the judge's keys."""
        none = [None] * len(self.policy.prompts)
        scores = none if self.scores is None else self.scores.tolist()
        baseline_scores = none if self.baseline_scores is None else self.baseline_scores.tolist()
        rows = []
        for i, prompt in enumerate(self.policy.prompts):
            row = {
                "prompt": prompt,
                "response": self.policy.completions[i], "score": scores[i], "length": int(self.policy.response_mask[i].sum()),
                "baseline_response": self.baseline.completions[i], "baseline_score": baseline_scores[i],
                "baseline_length": int(self.baseline.response_mask[i].sum()),
            }
            row.update({key: values[i] for key, values in (self.judged or {}).items()})
            rows.append(row)
        return rows


@torch.no_grad()
def compare_batch(
    policy: torch.nn.Module,
    baseline: torch.nn.Module,
    tokenizer: Any,
    generation: GenerationSettings,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    seed: int,
    score_fn: Any = None,
    judge: JudgeFn | None = None,
) -> BatchComparison:
    """Sample ``policy`` and ``baseline`` on left-padded prompts with the same ``seed`` (the global
    RNG is left as it was) and compare them: ``score_fn`` (``Responses -> (b,)``) scores both, KL
    is measured on the policy's samples, and ``judge`` judges the pair."""
    mine, theirs = (sample(model, tokenizer, generation, prompt_ids, prompt_mask, seed) for model in (policy, baseline))
    scores = None if score_fn is None else score_fn(mine).float()
    baseline_scores = None if score_fn is None else score_fn(theirs).float()
    kl = sequence_kl(policy, baseline, mine, generation.temperature)
    judged = None if judge is None else judge_pairs(judge, mine.prompts, mine.completions, theirs.completions)
    return BatchComparison(mine, theirs, scores, baseline_scores, kl, judged)


class ComparisonMetrics(torch.nn.Module):
    """Running averages of a policy-against-reference comparison over validation batches (PPO's
    ``eval/*`` metrics): reward scores, KL, length and EOS rate of the policy's samples, and with a
    judge the gold scores, validity, win rate and the reward's Spearman correlation with the
    judge on each policy's samples. Metrics never updated are left out of :meth:`compute`."""

    MEANS = ("score", "ref_score", "kl", "response_length", "eos_rate", "gold_score", "ref_gold_score",
             "gold_win_rate", "validity", "ref_validity")
    #: metric name -> the key of :func:`judge_pairs`'s result it averages
    JUDGED = {"gold_score": "gold", "ref_gold_score": "baseline_gold", "gold_win_rate": "win",
              "validity": "validity", "ref_validity": "baseline_validity"}

    def __init__(self) -> None:
        super().__init__()
        self.metrics = torch.nn.ModuleDict({name: MeanMetric() for name in self.MEANS})
        for name in ("reward_gold_spearman", "ref_reward_gold_spearman"):
            self.metrics[name] = spearman_metric()

    def update(self, batch: BatchComparison) -> None:
        """One batch of :func:`compare_batch` (with a reward source). A response counts towards
        ``eos_rate`` when it ended with one of the policy's stop ids (EOS, a chat model's end of turn)."""
        m, scores, ref_scores, judged, policy = self.metrics, batch.scores, batch.baseline_scores, batch.judged, batch.policy
        m["score"].update(scores)
        m["ref_score"].update(ref_scores)
        m["kl"].update(batch.kl)
        m["response_length"].update(policy.response_mask.sum(1).float())
        m["eos_rate"].update(pm.has_eos(policy.response_ids, policy.stop_ids).float())
        if judged is not None:
            for name, key in self.JUDGED.items():
                if key in judged:
                    m[name].update(scores.new_tensor(judged[key]))
            m["reward_gold_spearman"].update(scores, scores.new_tensor(judged["gold"]))
            m["ref_reward_gold_spearman"].update(ref_scores, ref_scores.new_tensor(judged["baseline_gold"]))

    def compute(self) -> dict[str, Tensor]:
        """The averages so far, then reset for the next validation."""
        values = {name: metric.compute() for name, metric in self.metrics.items() if metric.update_called}
        for metric in self.metrics.values():
            metric.reset()
        return values


def compare_policies(
    policy_dir: str,
    baseline_dir: str,
    prompts: list[Record],
    reward_model_dir: str | None = None,
    generation: GenerationSettings | None = None,
    judge: JudgeFn | None = None,
    seed: int = 0,
    batch_size: int = 50,
) -> tuple[PolicyComparison, list[dict[str, Any]]]:
    """Sample both policies on ``prompts`` (prompt records: a ``prompt`` string, or chat messages
    rendered with the chat template) and compare them (with ``judge``, also by the judge); also
    returns per-prompt samples."""
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tokenizer).eval()
    baseline = load_causal_lm(baseline_dir, tokenizer).eval()
    scorer = None
    if reward_model_dir is not None:
        reward_tokenizer = load_tokenizer(reward_model_dir)
        scorer = RewardModelScorer(load_sequence_scorer(reward_model_dir, reward_tokenizer), reward_tokenizer, tokenizer)
    generation = generation or GenerationSettings()
    rows: list[dict[str, Any]] = []
    kls: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_record_ids(record, tokenizer) for record in prompts[start : start + batch_size]]
        prompt_ids, prompt_mask = pad(ids, tokenizer.pad_token_id, "left"), attention_mask_for(ids, "left")
        comparison = compare_batch(policy, baseline, tokenizer, generation, prompt_ids, prompt_mask, seed + start, scorer, judge)
        rows += comparison.rows()
        kls += comparison.kl.tolist()
    return summarise(rows, kls), rows


@torch.no_grad()
def reward_pair_scores(reward_model_dir: str, records: list[Record], max_length: int = 256, batch_size: int = 64) -> torch.Tensor:
    """Scores ``(n, 2)`` of each preference record's ``chosen`` and ``rejected`` side by the reward
    model at ``reward_model_dir``, each encoded as the reward stage encodes pairs."""
    if not records:
        raise ValueError("reward_pair_scores needs at least one preference record")
    tokenizer = load_tokenizer(reward_model_dir)
    model = load_sequence_scorer(reward_model_dir, tokenizer)
    pairs = [encode_preference(record, tokenizer, max_length) for record in records]
    scores = []
    for side in ("chosen", "rejected"):
        rows = [pair[side] for pair in pairs]
        scores.append(score_sequences(model, pad(rows, tokenizer.pad_token_id), attention_mask_for(rows), batch_size))
    return torch.stack(scores, dim=1)


def reward_model_accuracy(reward_model_dir: str, records: list[Record], max_length: int = 256, batch_size: int = 64) -> float:
    """Share of preference ``records`` whose ``chosen`` the reward model at ``reward_model_dir``
    scores above ``rejected`` (ties 0.5), each encoded as the reward stage encodes pairs."""
    if not records:
        raise ValueError("reward_model_accuracy needs at least one preference record")
    scores = reward_pair_scores(reward_model_dir, records, max_length, batch_size)
    return pm.pair_accuracy(scores[:, 0], scores[:, 1]).mean().item()


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
