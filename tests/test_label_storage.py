"""The annotations file: durable appends, torn tails, undo as an event, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from rlhf_lightning.records import DataFormatError
from rlhf_lightning.labelling import storage
from rlhf_lightning.labelling.storage import (
    AlreadyLabelled,
    AnnotationLog,
    JsonlLog,
    done_items,
    judgements,
    make_judgement,
    read_log,
)


def judgement(annotator: str, item: str, choice: str = "left") -> dict:
    ranking = {"left": [0, 1], "right": [1, 0]}.get(choice)
    return make_judgement(annotator=annotator, item=item, prompt="P", responses=["a", "b"], shown=[0, 1],
                          choice=choice, ranking=ranking)


def test_append_is_fsynced_before_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real_fsync = storage.os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(Path(tmp_path / "a.jsonl").read_bytes()),
                                                         real_fsync(fd)))
    log = JsonlLog(tmp_path / "a.jsonl")
    log.append({"n": 1})
    log.append({"n": 2, "text": "ünïcode"})
    assert len(synced) == 2 and synced[1].endswith(b"\n")  # fsync saw the whole line
    assert read_log(log.path) == [{"n": 1}, {"n": 2, "text": "ünïcode"}]


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert read_log(tmp_path / "none.jsonl") == []


def test_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2, "te')  # killed in the middle of a write
    assert read_log(path) == [{"n": 1}]
    JsonlLog(path).append({"n": 3})
    assert path.read_bytes() == b'{"n": 1}\n{"n": 3}\n'


def test_bad_line_before_the_end_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"n": 1}\nnot json\n{"n": 3}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: not a JSON line"):
        read_log(path)


def test_undo_is_an_appended_event_that_replays(tmp_path: Path) -> None:
    log = AnnotationLog(tmp_path / "ann.jsonl")
    for item in ("x", "y"):
        log.judge(judgement("ann", item))
    log.judge(judgement("bob", "x"))
    before = log.path.read_bytes()
    undone = log.undo("ann")
    assert undone is not None and undone["item"] == "y"
    after = log.path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)  # appended, nothing rewritten
    events = log.records()
    assert [e["event"] for e in events] == ["judgement"] * 3 + ["undo"]
    assert done_items(events, "ann") == {"x"} and done_items(events, "bob") == {"x"}
    assert log.undo("ann")["item"] == "x"
    assert log.undo("ann") is None  # nothing left to undo
    assert [j["annotator"] for j in judgements(log.records())] == ["bob"]


def test_a_second_label_of_the_same_item_is_refused_until_undone(tmp_path: Path) -> None:
    log = AnnotationLog(tmp_path / "ann.jsonl")
    log.judge(judgement("ann", "x"))
    with pytest.raises(AlreadyLabelled):
        log.judge(judgement("ann", "x", "right"))
    log.undo("ann")
    log.judge(judgement("ann", "x", "right"))
    assert [j["choice"] for j in judgements(log.records())] == ["right"]


def _append_many(path: str, tag: str, count: int) -> None:
    log = JsonlLog(path)
    for n in range(count):
        log.append({"tag": tag, "n": n, "pad": tag * 20000})  # long lines make interleaving likely


def test_threads_and_processes_appending_at_once_never_corrupt_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ann.jsonl")
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_many, args=(path, f"p{i}", 30)) for i in range(2)]
    threads = [threading.Thread(target=_append_many, args=(path, f"t{i}", 30)) for i in range(3)]
    for worker in processes + threads:
        worker.start()
    for worker in processes + threads:
        worker.join()
    assert all(p.exitcode == 0 for p in processes)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert sorted((r["tag"], r["n"]) for r in records) == sorted((t, n) for t in ("p0", "p1", "t0", "t1", "t2")
                                                                  for n in range(30))
