"""Export: judgements -> preference pairs the reward stage reads; agreement between annotators."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule, read_preferences
from rlhf_lightning.labelling.export import (
    agreement,
    export_annotations,
    judgement_pairs,
)
from rlhf_lightning.labelling.storage import AnnotationLog, make_judgement

RESPONSES = ["r0", "r1", "r2"]


def judged(annotator: str, choice: str, ranking: list[int] | None, item: str = "i1",
           responses: list[str] = RESPONSES, shown: list[int] | None = None) -> dict:
    return make_judgement(annotator=annotator, item=item, prompt=f"prompt of {item}", responses=responses,
                          shown=shown or list(range(len(responses))), choice=choice, ranking=ranking)


def pairs_of(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["chosen"], r["rejected"]) for r in records]


def test_a_pair_judgement_is_one_pair_oriented_by_the_ranking() -> None:
    left = judged("a", "left", [1, 0], responses=["x", "y"], shown=[1, 0])  # "y" was shown on the left and won
    assert pairs_of(judgement_pairs(left)) == [("y", "x")]
    record = judgement_pairs(left)[0]
    assert record["prompt"] == "prompt of i1" and record["annotator"] == "a" and record["item"] == "i1"


def test_a_ranking_of_k_gives_all_k_choose_2_pairs() -> None:
    assert pairs_of(judgement_pairs(judged("a", "ranking", [2, 0, 1]))) == [("r2", "r0"), ("r2", "r1"), ("r0", "r1")]
    four = judged("a", "ranking", [3, 1, 0, 2], responses=["a", "b", "c", "d"])
    pairs = pairs_of(judgement_pairs(four))
    assert len(pairs) == 6 and ("d", "c") in pairs and ("b", "a") in pairs and ("c", "a") not in pairs


def test_ties_and_skips_are_dropped_or_flagged() -> None:
    tie, skip = judged("a", "tie", None, shown=[2, 0, 1]), judged("a", "skip", None)
    assert judgement_pairs(tie) == [] and judgement_pairs(skip) == []
    flagged = judgement_pairs(tie, ties="flag")
    assert pairs_of(flagged) == [("r2", "r0"), ("r2", "r1"), ("r0", "r1")] and all(r["tie"] for r in flagged)
    assert all(r["skipped"] for r in judgement_pairs(skip, skips="flag"))
    assert judgement_pairs(skip, ties="flag") == []  # the two settings are independent


def test_agreement_counts_verdicts_per_response_pair_across_annotators() -> None:
    in_force = [
        judged("ann", "ranking", [0, 1, 2]),
        judged("bob", "ranking", [0, 2, 1]),   # agrees with ann on (0,1) and (0,2), not on (1,2)
        judged("cy", "tie", None),             # a tie disagrees with every strict verdict
        judged("ann", "left", [0, 1], item="i2", responses=["a", "b"]),
        judged("bob", "skip", None, item="i2", responses=["a", "b"]),  # skips are no verdict
        judged("cy", "left", [0, 1], item="i3", responses=["a", "b"]),  # labelled once: not counted
    ]
    result = agreement(in_force)
    assert result.items == 1
    assert result.comparisons == 9 and result.agreeing == 2
    assert result.by_annotators == {("ann", "bob"): [2, 3], ("ann", "cy"): [0, 3], ("bob", "cy"): [0, 3]}
    assert "2/9 = 22%" in result.lines()[0] and "  ann vs bob: 2/3 = 67%" in result.lines()


def test_no_overlap_says_so() -> None:
    assert agreement([judged("ann", "left", [0, 1], responses=["a", "b"])]).lines() == [
        "agreement: no item was labelled by more than one annotator"]


def write_session(path: Path) -> AnnotationLog:
    log = AnnotationLog(path)
    log.judge(judged("ann", "ranking", [1, 2, 0]))
    log.judge(judged("ann", "left", [0, 1], item="i2", responses=["good", "bad"]))
    log.judge(judged("ann", "tie", None, item="i3", responses=["same", "same too"]))
    log.undo("ann")  # the tie is taken back ...
    log.judge(judged("ann", "right", [1, 0], item="i3", responses=["same", "same too"]))  # ... and redone
    log.judge(judged("bob", "left", [0, 1], item="i2", responses=["good", "bad"]))
    log.judge(judged("bob", "skip", None, item="i4", responses=["p", "q"]))
    return log


def test_export_writes_pairs_the_preference_data_module_loads(tmp_path: Path) -> None:
    write_session(tmp_path / "ann.jsonl")
    out = tmp_path / "prefs.jsonl"
    summary = export_annotations(tmp_path / "ann.jsonl", out)
    assert summary.judgements == 5 and summary.pairs == 3 + 1 + 1 + 1
    records = read_preferences(out)
    assert pairs_of(records) == [("r1", "r2"), ("r1", "r0"), ("r2", "r0"), ("good", "bad"),
                                 ("same too", "same"), ("good", "bad")]
    assert summary.agreement.items == 1 and summary.agreement.rate == 1.0

    data = PreferenceDataModule(train_file=str(out), tokenizer="preset:micro-gpt2", val_fraction=0, batch_size=6)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 12  # 6 pairs: chosen rows, then rejected rows


def test_export_command_prints_counts_and_agreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_session(tmp_path / "ann.jsonl")
    out = tmp_path / "prefs.jsonl"
    code = main(["label", "export", "--annotations", str(tmp_path / "ann.jsonl"), "--out", str(out),
                 "--skips", "flag"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.splitlines()[0] == f"7 preference pairs from 5 judgements -> {out}"
    assert "agreement: 1/1 = 100%" in printed and "ann vs bob: 1/1 = 100%" in printed
    assert sum(1 for r in read_preferences(out) if r.get("skipped")) == 1


def test_export_of_a_missing_or_empty_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["label", "export", "--annotations", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'none.jsonl'}: file does not exist\n"
    log = AnnotationLog(tmp_path / "ties.jsonl")
    log.judge(judged("ann", "tie", None))
    code = main(["label", "export", "--annotations", str(log.path), "--out", str(tmp_path / "o")])
    assert code == 2 and "every judgement is a tie or a skip" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
