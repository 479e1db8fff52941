"""benchmarks/eval_spread.py draws the suite's comparison of a finished run several times, with
the run's own sampling seed first, and reports the spread of the judge score."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.evaluation import PolicyComparison

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_spread_draws_from_the_runs_seed_then_others(monkeypatch, tmp_path: Path, capsys):
    script = load_script(ROOT / "benchmarks" / "eval_spread.py", "eval_spread_benchmark")
    run = tmp_path / "lists" / "seed1"
    prompts = [{"prompt": "List two fruits:"}]
    gold = {1: 0.5, 1000: 0.7, 2000: 0.6}
    calls = []

    def compare(policy, baseline, records, generation, judge, seed):
        calls.append((policy, baseline, records, generation.max_new_tokens, judge, seed))
        return PolicyComparison(num_prompts=1, score=None, baseline_score=None, kl=seed / 1000, response_length=1.0,
                                baseline_response_length=1.0, gold_score=gold[seed], gold_win_rate=gold[seed] + 0.1,
                                validity=1.0, baseline_validity=0.5), []

    monkeypatch.setattr(script, "compare_policies", compare)
    monkeypatch.setattr(script, "datamodule_records", lambda config: ([], prompts))
    monkeypatch.setattr(script, "stage_init_args", lambda config: {
        "judge": "rlhf_lightning.tasks.lists.judge", "generation": {"max_new_tokens": 7}})
    assert script.main([str(run), "--samples", "3"]) == 0
    judge = script.import_object("rlhf_lightning.tasks.lists.judge")
    assert calls == [(str(run / "ppo" / "policy"), str(run / "sft" / "model"), prompts, 7, judge, seed)
                     for seed in (1, 1000, 2000)]
    row = capsys.readouterr().out.splitlines()[-1]
    # gold 0.5, 0.7, 0.6: mean 0.6, sd 0.1; win 0.1 above; KL (0.001 + 1 + 2) / 3
    assert row == f"| {run} | 0.600 | 0.100 | 0.500 | 0.700 | 1.000 | 0.500 | 0.700 | 1.00 |"
    assert script.spread(run, 1)["sd"] == pytest.approx(0.0)  # one draw: the suite's own figure
    with pytest.raises(SystemExit):
        script.main([str(run), "--samples", "0"])
