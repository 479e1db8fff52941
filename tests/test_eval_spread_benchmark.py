"""benchmarks/eval_spread.py draws the pipeline's final comparison of a finished run several
times, with the run's own sampling seed first, and reports the spread of the judge score."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_lightning.evaluation import PolicyComparison

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_spread_draws_the_pipelines_comparison_from_the_runs_seed_then_others(monkeypatch, tmp_path: Path, capsys):
    script = load_script(ROOT / "benchmarks" / "eval_spread.py", "eval_spread_benchmark")
    run = tmp_path / "lists" / "seed1"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "pipeline.yaml").write_text(yaml.safe_dump({
        "run_dir": str(run), "sft": "sft.yaml", "reward": "reward.yaml", "ppo": "ppo.yaml",
        "judge": "rlhf_lightning.tasks.lists.judge", "seed": 1}))
    outputs = {"sft": "sft/model", "ppo": "ppo/policy"}
    gold = {1: 0.5, 1000: 0.7, 2000: 0.6}
    calls = []

    def final_comparison(config, stage_outputs, judge):
        calls.append((config.run_dir, judge, config.seed, stage_outputs))
        comparison = PolicyComparison(num_prompts=1, score=None, baseline_score=None, kl=config.seed / 1000,
                                      response_length=1.0, baseline_response_length=1.0, gold_score=gold[config.seed],
                                      gold_win_rate=gold[config.seed] + 0.1, validity=1.0, baseline_validity=0.5)
        return comparison, []

    monkeypatch.setattr(script, "final_comparison", final_comparison)
    monkeypatch.setattr(script, "stage_outputs", lambda config: outputs if config.ppo == "ppo.yaml" else None)
    assert script.main([str(run), "--samples", "3"]) == 0
    from rlhf_lightning.tasks.lists import judge
    assert calls == [(str(run), judge, seed, outputs) for seed in (1, 1000, 2000)]
    row = capsys.readouterr().out.splitlines()[-1]
    # gold 0.5, 0.7, 0.6: mean 0.6, sd 0.1; win 0.1 above; KL (0.001 + 1 + 2) / 3
    assert row == f"| {run} | 0.600 | 0.100 | 0.500 | 0.700 | 1.000 | 0.500 | 0.700 | 1.00 |"
    assert script.spread(run, 1)["sd"] == pytest.approx(0.0)  # one draw: the pipeline's own figure
    with pytest.raises(SystemExit):
        script.main([str(run), "--samples", "0"])
    calls.clear()  # the pipeline config itself is a run too
    assert script.spread(run / "configs" / "pipeline.yaml", 2)["gold"] == pytest.approx(0.6)
    assert [seed for _, _, seed, _ in calls] == [1, 1000]
    with pytest.raises(SystemExit, match="neither a pipeline config nor"):
        script.spread(tmp_path, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nsft: a\nreward: b\nppo: c\nbogus: 1\n")
    with pytest.raises(SystemExit):  # read as the pipeline command reads it: the key is named
        script.spread(bad, 1)
    assert "Option 'bogus' is not accepted" in capsys.readouterr().err
    no_judge = tmp_path / "no_judge.yaml"
    no_judge.write_text("run_dir: x\nsft: a\nreward: b\nppo: ppo.yaml\n")
    with pytest.raises(SystemExit, match="no_judge.yaml: judge is null"):
        script.spread(no_judge, 1)
    # a judge without a validity check: validity is n/a, not 0
    assert script.mean_or_none([1.0, None]) is None and script.mean_or_none([1.0, 0.5]) == 0.75
    assert script.cell(None) == "n/a"
