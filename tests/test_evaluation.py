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
            "baseline_length": 4, "win": 1.0, "validity": 1.0, "baseline_validity": 0.0}


def test_summarise_reports_reward_gold_spearman_per_policy():
    rows = [_row(0.1, -1.0, 2.0, -1.0), _row(0.5, 0.2, 1.0, 0.2), _row(0.9, 0.8, 0.0, 0.8)]
    comparison = summarise(rows, kls=[0.0, 0.0, 0.0])
    assert comparison.reward_gold_spearman == pytest.approx(1.0, abs=1e-5)  # PPO samples: same order as gold
    assert comparison.baseline_reward_gold_spearman == pytest.approx(-1.0, abs=1e-5)  # SFT samples: reversed
    assert (comparison.validity, comparison.baseline_validity) == (1.0, 0.0)
    judged = ("gold", "baseline_gold", "win", "validity", "baseline_validity")
    without_judge = summarise([{k: v for k, v in r.items() if k not in judged} for r in rows], [0.0] * 3)
    assert without_judge.reward_gold_spearman is None and without_judge.baseline_reward_gold_spearman is None
    assert without_judge.gold_win_rate is None and without_judge.validity is None


def test_judge_pairs_with_and_without_a_validity_check():
    from rlhf_lightning.evaluation import judge_pairs

    def by_length(prompts, completions):  # a user's judge: a plain function, no is_valid
        return [float(len(c)) for c in completions]

    judged = judge_pairs(by_length, ["p", "p", "p"], ["aa", "a", "bb"], ["a", "aa", "cc"])
    assert judged == {"gold": [2.0, 1.0, 2.0], "baseline_gold": [1.0, 2.0, 2.0], "win": [1.0, 0.0, 0.5]}

    from rlhf_lightning.tasks.sentiment import judge

    judged = judge_pairs(judge, ["p", "p"], [" good and fun.", " good good."], [" x", " bad and dull."])
    assert judged["validity"] == [1.0, 0.0] and judged["baseline_validity"] == [0.0, 1.0]
