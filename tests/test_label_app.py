"""The labelling app's API (Flask test client) and a SIGKILL of the real server mid-session."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the labelling app needs Flask: pip install -e '.[label]'")

from rlhf_lightning.labelling import cli as label_cli
from rlhf_lightning.labelling.app import (
    LabelSession,
    create_app,
    is_loopback,
    shown_order,
)
from rlhf_lightning.labelling.candidates import CandidatePool, Item, read_candidates
from rlhf_lightning.labelling.storage import AnnotationLog, judgements, read_log
from tests.conftest import write_lines

ROOT = Path(__file__).resolve().parents[1]


def write_candidates(path: Path, count: int = 3, ranked: int = 0) -> Path:
    """``count`` two-response items, then ``ranked`` three-response items."""
    records = [{"prompt": f"Review {n}: The movie was", "responses": [f" good {n}.", f" bad {n}."]}
               for n in range(count)]
    records += [{"prompt": f"Rank {n}: The plot was", "responses": [f" fun {n}.", f" slow {n}.", f" odd {n}."]}
                for n in range(ranked)]
    return write_lines(path, records)


def make_session(tmp_path: Path, count: int = 3, ranked: int = 0, token: str | None = None) -> LabelSession:
    items = read_candidates(write_candidates(tmp_path / "candidates.jsonl", count, ranked))
    return LabelSession(pool=CandidatePool(items), log=AnnotationLog(tmp_path / "annotations.jsonl"), token=token)


@contextmanager
def running_server(session: LabelSession) -> Iterator[str]:
    """The app on a free loopback port in a thread; yields its base URL."""
    server = label_cli.make_server(create_app(session), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}/"
    finally:
        server.shutdown()
        server.server_close()


def test_next_judge_undo_cycle(tmp_path: Path) -> None:
    session = make_session(tmp_path, count=2, ranked=1)
    client = create_app(session).test_client()
    first = client.get("/api/next?annotator=ann").get_json()
    assert (first["done"], first["total"], first["generating"]) == (0, 3, False)
    item = first["item"]
    responses = session.pool.items()[0].responses
    assert [responses[i] for i in item["shown"]] == item["responses"]

    saved = client.post("/api/judge", json={"annotator": "ann", "item": item["id"], "shown": item["shown"],
                                             "choice": "ranked", "order": [1, 0], "comment": " close "})
    assert saved.status_code == 200 and saved.get_json()["done"] == 1
    (event,) = read_log(session.log.path)
    assert event["ranking"] == [item["shown"][1], item["shown"][0]] and event["choice"] == "right"
    assert event["annotator"] == "ann" and event["comment"] == "close" and event["shown"] == item["shown"]

    second = client.get("/api/next?annotator=ann").get_json()["item"]
    assert second["id"] != item["id"]
    assert client.get("/api/next?annotator=bob").get_json()["item"]["id"] == item["id"]  # per annotator

    undone = client.post("/api/undo", json={"annotator": "ann"}).get_json()
    assert undone["undone"] == item["id"] and undone["done"] == 0
    assert client.get("/api/next?annotator=ann").get_json()["item"]["id"] == item["id"]  # back to it
    assert [e["event"] for e in read_log(session.log.path)] == ["judgement", "undo"]


def test_a_ranking_of_three_and_the_end(tmp_path: Path) -> None:
    session = make_session(tmp_path, count=0, ranked=1)
    client = create_app(session).test_client()
    item = client.get("/api/next?annotator=ann").get_json()["item"]
    assert len(item["responses"]) == 3
    reply = client.post("/api/judge", json={"annotator": "ann", "item": item["id"], "shown": item["shown"],
                                             "choice": "ranked", "order": [2, 0, 1]})
    assert reply.status_code == 200
    assert judgements(read_log(session.log.path))[0]["ranking"] == [item["shown"][p] for p in (2, 0, 1)]
    assert client.get("/api/next?annotator=ann").get_json() == {
        "item": None, "done": 1, "total": 1, "generating": False, "generation_error": None}


def test_shown_order_is_random_across_items_and_stable_on_reload() -> None:
    orders = [tuple(shown_order(0, "ann", f"item{n}", 2)) for n in range(40)]
    assert {(0, 1), (1, 0)} == set(orders)  # both sides get the first candidate
    assert orders == [tuple(shown_order(0, "ann", f"item{n}", 2)) for n in range(40)]
    assert orders != [tuple(shown_order(0, "bob", f"item{n}", 2)) for n in range(40)]


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"shown": "flip"}, 400, "'shown' does not match"),
    ({"order": [0, 0]}, 400, "'order' must list each display position"),
    ({"choice": "left"}, 400, "'choice' must be"),
    ({"item": "nope"}, 400, "unknown item"),
    ({"annotator": " "}, 400, "annotator name"),
    ({"comment": 5}, 400, "'comment' must be a string"),
])
def test_bad_judgements_are_refused_and_not_written(tmp_path: Path, change: dict, status: int, message: str) -> None:
    session = make_session(tmp_path)
    client = create_app(session).test_client()
    item = client.get("/api/next?annotator=ann").get_json()["item"]
    body = {"annotator": "ann", "item": item["id"], "shown": item["shown"], "choice": "ranked", "order": [0, 1],
            **change}
    if change.get("shown") == "flip":
        body["shown"] = item["shown"][::-1]
    reply = client.post("/api/judge", json=body)
    assert reply.status_code == status and message in reply.get_json()["error"]
    assert read_log(session.log.path) == []


def test_a_second_label_of_an_item_is_409_and_a_form_post_is_400(tmp_path: Path) -> None:
    session = make_session(tmp_path)
    client = create_app(session).test_client()
    item = client.get("/api/next?annotator=ann").get_json()["item"]
    body = {"annotator": "ann", "item": item["id"], "shown": item["shown"], "choice": "tie"}
    assert client.post("/api/judge", json=body).status_code == 200
    assert client.post("/api/judge", json=body).status_code == 409
    assert client.post("/api/judge", data={"annotator": "ann"}).status_code == 400  # not JSON
    assert len(read_log(session.log.path)) == 1


def test_with_a_token_the_api_needs_it_and_the_page_does_not(tmp_path: Path) -> None:
    client = create_app(make_session(tmp_path, token="s3cret")).test_client()
    assert client.get("/").status_code == 200 and client.get("/static/label.js").status_code == 200
    assert client.get("/api/next?annotator=ann").status_code == 403
    assert client.get("/api/next?annotator=ann", headers={"X-Label-Token": "wrong"}).status_code == 403
    assert client.get("/api/next?annotator=ann", headers={"X-Label-Token": "s3cret"}).status_code == 200
    assert client.get("/api/next?annotator=ann&token=s3cret").status_code == 200
    assert client.get("/static/other.txt").status_code == 404


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.org"]))


def serve_with_a_stub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> dict:
    """``rlhf-lightning label --candidates ... OPTIONS`` on a stub server that stops at once (as
    Ctrl-C would); returns what it served: ``app``, ``host``, ``closed``."""
    served = {}

    class StubServer:
        port = 8123

        def serve_forever(self) -> None:
            raise KeyboardInterrupt

        def server_close(self) -> None:
            served["closed"] = True

    def stub_make_server(app, host, port):
        served.update(app=app, host=host)
        return StubServer()

    monkeypatch.delenv(label_cli.TOKEN_ENV, raising=False)
    monkeypatch.setattr(label_cli, "make_server", stub_make_server)
    candidates = write_candidates(tmp_path / "c.jsonl")
    assert label_cli.label_command(["--candidates", str(candidates), "--annotations", str(tmp_path / "a.jsonl"),
                                    *options]) == 0
    return served


def test_serving_other_machines_generates_a_token(tmp_path: Path, monkeypatch, capsys) -> None:
    served = serve_with_a_stub_server(tmp_path, monkeypatch, "--host", "0.0.0.0")
    token = re.search(r"http://0\.0\.0\.0:8123/\?token=(\S+)", capsys.readouterr().out).group(1)
    assert len(token) >= 16 and served["closed"] and served["host"] == "0.0.0.0"
    client = served["app"].test_client()
    assert client.get("/api/next?annotator=a").status_code == 403
    assert client.get(f"/api/next?annotator=a&token={token}").status_code == 200


GUIDELINES = "# Guidelines\n\nPrefer the <b>shorter</b> response\nwhen both are correct & kind.\n"


def test_guidelines_file_is_served_by_api_info(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "guidelines.md").write_text(GUIDELINES, encoding="utf-8")
    served = serve_with_a_stub_server(tmp_path, monkeypatch, "--guidelines", str(tmp_path / "guidelines.md"),
                                      "--token", "s3cret")
    client = served["app"].test_client()
    assert client.get("/api/info").status_code == 403  # behind the token like the rest of the API
    assert client.get("/api/info?token=s3cret").get_json() == {"guidelines": GUIDELINES}  # as written, unrendered
    assert create_app(make_session(tmp_path)).test_client().get("/api/info").get_json() == {"guidelines": None}


def test_waiting_for_candidates_while_they_are_sampled(tmp_path: Path) -> None:
    pool = CandidatePool(expected=2)
    client = create_app(LabelSession(pool=pool, log=AnnotationLog(tmp_path / "a.jsonl"))).test_client()
    assert client.get("/api/next?annotator=ann").get_json() == {
        "item": None, "done": 0, "total": 2, "generating": True, "generation_error": None}
    pool.add(Item("x", "P", ("a", "b")))
    assert client.get("/api/next?annotator=ann").get_json()["item"]["id"] == "x"


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def start_server_process(candidates: Path, annotations: Path) -> tuple[subprocess.Popen, str]:
    """``rlhf-lightning label`` as a subprocess on a free port; returns it and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf_lightning.cli", "label", "--candidates", str(candidates),
         "--annotations", str(annotations), "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    printed = []
    for line in process.stdout:  # ends if the server dies before printing its address
        printed.append(line)
        found = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(printed))


def test_sigkill_mid_session_loses_no_acknowledged_label(tmp_path: Path) -> None:
    candidates = write_candidates(tmp_path / "c.jsonl", count=400)
    annotations = tmp_path / "annotations.jsonl"
    process, base = start_server_process(candidates, annotations)
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()

    def annotate(name: str) -> None:
        try:
            while True:
                item = get(f"{base}api/next?annotator={name}")["item"]
                reply = post(f"{base}api/judge", {"annotator": name, "item": item["id"], "shown": item["shown"],
                                                  "choice": "ranked", "order": [0, 1], "comment": "x" * 200})
                with lock:
                    acknowledged.append((name, reply["saved"]))
        except (OSError, ValueError, http.client.HTTPException):  # the server is gone (maybe mid-reply)
            return

    annotators = [threading.Thread(target=annotate, args=(f"a{n}",)) for n in range(4)]
    try:
        for thread in annotators:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)  # while the four annotators are still sending
        process.wait(timeout=10)
        for thread in annotators:
            thread.join(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 60
    events = read_log(annotations)  # every line but a torn last one is whole JSON
    written = {e["id"] for e in events}
    assert {saved for _, saved in acknowledged} <= written
    assert len(events) <= len(acknowledged) + 4  # at most the in-flight ones on top

    # A new server on the same file resumes each annotator after their last label.
    session = LabelSession(pool=CandidatePool(read_candidates(candidates)), log=AnnotationLog(annotations))
    client = create_app(session).test_client()
    for name in ("a0", "a3"):
        mine = [e for e in events if e["annotator"] == name]
        state = client.get(f"/api/next?annotator={name}").get_json()
        assert state["done"] == len(mine) >= sum(1 for who, _ in acknowledged if who == name)
        assert state["item"]["id"] == session.pool.items()[len(mine)].id
