"""Append-only JSONL logs that survive crashes and concurrent writers.

The annotations file is the labelling tool's only state, so it follows three rules:

* **Durable before acknowledged.** Each record is written with one ``os.write`` on an
  ``O_APPEND`` descriptor and ``os.fsync``'ed before the call returns; the web app answers the
  page only afterwards, so every label the annotator saw acknowledged is on disk, also when the
  server is killed (SIGKILL) right after.
* **Safe with many writers.** Appends hold a ``threading.Lock`` (threads of one server) *and*
  an exclusive ``fcntl.flock`` (two server processes on the same file), so lines never
  interleave and a read-check-append (refusing a second label of the same item, finding what
  to undo) is atomic.
* **Never rewritten.** Undo is an appended ``undo`` event, replayed by :func:`judgements`.
  The only bytes ever removed are a torn final line without its newline (a write cut by a
  crash, so never acknowledged), before the next append.

Annotation events (one JSON object per line):

``{"event": "judgement", "id", "time", "annotator", "item", "prompt", "responses", "shown",
"choice", "ranking", "comment"}``: ``responses`` in candidate order, ``shown`` the candidate
indices in the order the page showed them (left to right), ``choice`` one of ``left``,
``right`` (two responses), ``ranking`` (more), ``tie`` or ``skip``; ``ranking`` the candidate
indices best first (``null`` for tie and skip).

``{"event": "undo", "id", "time", "annotator", "undoes": <judgement id>}``.

:func:`read_annotations` checks every event's type and the fields that replay and export read;
``rlhf-lightning label`` calls it once before serving, so a bad line is a one-line error at the
start and not a failure of every request later.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..records import DataFormatError, Record

CHOICES = ("left", "right", "ranking", "tie", "skip")
# The fields replay (:func:`judgements`), the app and export read, with their types, per event.
EVENT_FIELDS: dict[str, dict[str, type]] = {
    "judgement": {"id": str, "annotator": str, "item": str, "prompt": str, "responses": list, "shown": list,
                  "choice": str},
    "undo": {"id": str, "annotator": str, "undoes": str},
}


def now() -> str:
    """The current UTC time in ISO 8601, as stored in events."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_log(path: str | os.PathLike[str],
             check: Callable[[Record, str, int], Record] | None = None) -> list[Record]:
    """All records of an append-only JSONL log; ``[]`` when the file does not exist yet.

    A last line without its newline that is not valid JSON is a torn write (the process died
    inside ``write``) and is ignored; a bad line anywhere else raises :class:`DataFormatError`.
    ``check(record, path, line)``, when given, returns the record or raises :class:`DataFormatError`.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines):  # no newline after it: a torn final write
                break
            raise DataFormatError(path, number, None, f"not a JSON line ({err})") from err
        if not isinstance(record, dict):
            raise DataFormatError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
        records.append(check(record, str(path), number) if check else record)
    return records


def check_event(record: Record, path: str, line: int) -> Record:
    """Check one annotations line (see ``EVENT_FIELDS``); the message names file, line and field."""
    event = record.get("event")
    fields = EVENT_FIELDS.get(event) if isinstance(event, str) else None
    if fields is None:
        raise DataFormatError(path, line, "event", f"expected 'judgement' or 'undo', got {event!r}",
                              hint="is this an annotations file written by 'rlhf-lightning label'?")
    for name, kind in fields.items():
        if name not in record:
            raise DataFormatError(path, line, name, "missing")
        if not isinstance(record[name], kind):
            expected = "string" if kind is str else kind.__name__
            raise DataFormatError(path, line, name, f"expected a {expected}, got {type(record[name]).__name__}")
    if record["event"] == "judgement" and record["choice"] not in CHOICES:
        raise DataFormatError(path, line, "choice", f"expected one of {', '.join(CHOICES)}, got {record['choice']!r}")
    return record


def read_annotations(path: str | os.PathLike[str]) -> list[Record]:
    """The events of an annotations file, each checked by :func:`check_event`; ``[]`` when it
    does not exist yet. A file that cannot be read (a folder, no permission) is a
    :class:`DataFormatError` too."""
    try:
        return read_log(path, check_event)
    except OSError as err:
        raise DataFormatError(path, 0, None, f"cannot read it ({err.strerror or err})") from err


class JsonlLog:
    """An append-only JSONL file with locked, fsync'ed appends (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()

    @contextmanager
    def locked(self) -> Iterator[int]:
        """Hold both locks; yields an ``O_APPEND`` descriptor of the file (created if needed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    yield fd
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def records(self) -> list[Record]:
        return read_log(self.path)

    def append(self, record: Record) -> Record:
        """Append one record durably and return it."""
        with self.locked() as fd:
            self._append_locked(fd, record)
        return record

    @staticmethod
    def _append_locked(fd: int, record: Record) -> None:
        _drop_torn_tail(fd)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(fd, data)
        if written != len(data):  # a short write on a regular file means the disk is full
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        os.fsync(fd)


def _drop_torn_tail(fd: int) -> None:
    """Cut a final line that lacks its newline (never acknowledged) so the next line is whole."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = size
    while start > 0:
        chunk_start = max(0, start - 4096)
        cut = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
        if cut >= 0:
            start = chunk_start + cut + 1
            break
        start = chunk_start
    os.ftruncate(fd, start)


class AlreadyLabelled(Exception):
    """The annotator has a (not undone) judgement of this item already."""


class AnnotationLog(JsonlLog):
    """The annotations file: judgements and undo events of every annotator."""

    def judge(self, judgement: Record) -> Record:
        """Append a judgement unless its annotator already labelled its item (atomic check)."""
        with self.locked() as fd:
            for existing in judgements(self.records()):
                if existing["annotator"] == judgement["annotator"] and existing["item"] == judgement["item"]:
                    raise AlreadyLabelled(judgement["item"])
            self._append_locked(fd, judgement)
        return judgement

    def undo(self, annotator: str) -> Record | None:
        """Undo the annotator's latest judgement that is still in force; ``None`` if there is none."""
        with self.locked() as fd:
            mine = [j for j in judgements(self.records()) if j["annotator"] == annotator]
            if not mine:
                return None
            target = mine[-1]
            event = {"event": "undo", "id": uuid.uuid4().hex, "time": now(), "annotator": annotator,
                     "undoes": target["id"]}
            self._append_locked(fd, event)
        return target


def judgements(events: list[Record]) -> list[Record]:
    """The judgements still in force, in file order: every ``undo`` removes the one it names."""
    undone = {e.get("undoes") for e in events if e.get("event") == "undo"}
    return [e for e in events if e.get("event") == "judgement" and e.get("id") not in undone]


def done_items(events: list[Record], annotator: str) -> set[str]:
    """Ids of the items ``annotator`` has labelled (tie and skip included)."""
    return {j["item"] for j in judgements(events) if j["annotator"] == annotator}


def make_judgement(
    *,
    annotator: str,
    item: str,
    prompt: str,
    responses: list[str],
    shown: list[int],
    choice: str,
    ranking: list[int] | None,
    comment: str = "",
) -> Record:
    """A judgement event (see the module docstring), with a fresh id and the current time."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    return {
        "event": "judgement", "id": uuid.uuid4().hex, "time": now(), "annotator": annotator,
        "item": item, "prompt": prompt, "responses": list(responses), "shown": list(shown),
        "choice": choice, "ranking": list(ranking) if ranking is not None else None, "comment": comment,
    }
