"""The pipeline's policy comparison: rank correlation of reward-model and gold scores."""

import math

import pytest

from rlhf_lightning.evaluation import rank_correlation, summarise


def test_rank_correlation_hand_computed_with_ties():
    # ranks of y with ties averaged: [1.5, 1.5, 3.5, 3.5]; centred x = [-1.5, -0.5, 0.5, 1.5],
    # centred y = [-1, -1, 1, 1]: rho = 4 / (sqrt(5) * 2). abs=1e-5 because torchmetrics keeps
    # an epsilon in the denominator.
    assert rank_correlation([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]) == pytest.approx(2 / math.sqrt(5), abs=1e-5)
    # only the order matters, and unknown entries are left out
    assert rank_correlation([10.0, -3.0, 0.5, None], [3.0, 1.0, 2.0, 7.0]) == pytest.approx(1.0, abs=1e-5)
    assert rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("xs, ys", [([1.0], [2.0]), ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [None, None])])
def test_rank_correlation_is_none_when_undefined(xs, ys):
    assert rank_correlation(xs, ys) is None


def _row(score: float, gold: float, baseline_score: float, baseline_gold: float) -> dict:
    return {"score": score, "gold": gold, "length": 3, "baseline_score": baseline_score, "baseline_gold": baseline_gold,
            "baseline_length": 4, "win": 1.0, "fluency": 1.0, "baseline_fluency": 0.0}


def test_summarise_reports_reward_gold_spearman_per_policy():
    rows = [_row(0.1, -1.0, 2.0, -1.0), _row(0.5, 0.2, 1.0, 0.2), _row(0.9, 0.8, 0.0, 0.8)]
    comparison = summarise(rows, kls=[0.0, 0.0, 0.0], gold=True)
    assert comparison.reward_gold_spearman == pytest.approx(1.0, abs=1e-5)  # PPO samples: same order as gold
    assert comparison.baseline_reward_gold_spearman == pytest.approx(-1.0, abs=1e-5)  # SFT samples: reversed
    without_gold = summarise([{k: v for k, v in r.items() if "gold" not in k} for r in rows], [0.0] * 3, gold=False)
    assert without_gold.reward_gold_spearman is None and without_gold.baseline_reward_gold_spearman is None
