"""The labelling web app: a Flask app serving one static page and a small JSON API.

Flask (with Werkzeug's threaded server) because it is the most widely used and long-maintained
synchronous Python web library: a blocking ``fsync`` inside a request is natural there, it
needs no build step or ASGI server, and Werkzeug's ``make_server`` lets the command bind first
(so a port in use is a one-line error) and then print the real address.

API (JSON; with an access token every ``/api/`` request carries it as ``X-Label-Token`` or ``?token=``):

* ``GET /api/next?annotator=NAME``: the first item NAME has not labelled, with its responses
  in a per-(annotator, item) random order (``shown``), and progress ``done``/``total``.
* ``POST /api/judge``: ``{annotator, item, shown, choice: "ranked"|"tie"|"skip", order,
  comment}``, ``order`` being display positions best first. Answered only once the judgement
  is fsync'ed.
* ``POST /api/undo``: ``{annotator}``: appends an undo event for NAME's latest judgement.
* ``GET /api/info``: ``{guidelines}``, the labelling guidelines' text (``null`` without
  ``--guidelines``); the page shows it as plain text, never as HTML.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

from flask import Flask, Response, abort, jsonify, request

from .candidates import CandidatePool, Item
from .storage import AlreadyLabelled, AnnotationLog, done_items, make_judgement

MAX_NAME = 64
MAX_COMMENT = 5000
STATIC_FILES = {"label.js": "text/javascript", "label.css": "text/css"}


@dataclass
class LabelSession:
    """What the app serves: the candidate pool, the annotations file, the access rule and the
    annotators' guidelines (plain text)."""

    pool: CandidatePool
    log: AnnotationLog
    token: str | None = None
    seed: int = 0
    guidelines: str | None = None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown_order(seed: int, annotator: str, item_id: str, k: int) -> list[int]:
    """Random display order of an item's responses (against position bias), the same on every
    reload for one annotator, different across annotators and items."""
    digest = hashlib.sha256(f"{seed}\0{annotator}\0{item_id}".encode()).digest()
    order = list(range(k))
    random.Random(digest).shuffle(order)
    return order


class InvalidRequest(Exception):
    """A request the page should never send; answered with status 400 and the message."""


def parse_judgement(body: dict[str, Any], item: Item, annotator: str, seed: int) -> dict[str, Any]:
    """Turn the page's ``{shown, choice, order, comment}`` into a judgement event."""
    k = len(item.responses)
    shown = body.get("shown")
    if shown != shown_order(seed, annotator, item.id, k):
        raise InvalidRequest("'shown' does not match the order this item was served in")
    choice, comment = body.get("choice"), body.get("comment") or ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise InvalidRequest(f"'comment' must be a string of at most {MAX_COMMENT} characters")
    ranking = None
    if choice == "ranked":
        order = body.get("order")
        if not isinstance(order, list) or sorted(order) != list(range(k)):
            raise InvalidRequest(f"'order' must list each display position 0..{k - 1} once, best first")
        ranking = [shown[position] for position in order]
        choice = ("left" if order[0] == 0 else "right") if k == 2 else "ranking"
    elif choice not in ("tie", "skip"):
        raise InvalidRequest("'choice' must be 'ranked', 'tie' or 'skip'")
    return make_judgement(annotator=annotator, item=item.id, prompt=item.prompt, responses=list(item.responses),
                          shown=shown, choice=choice, ranking=ranking, comment=comment.strip())


def create_app(session: LabelSession) -> Flask:
    """The Flask app of one labelling session."""
    app = Flask(__name__, static_folder=None)
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    def static_text(name: str) -> str:
        return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")

    @app.before_request
    def check_token() -> None:
        if session.token is None or not request.path.startswith("/api/"):
            return  # the page and its script hold no data; the API does
        given = request.headers.get("X-Label-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), session.token.encode()):
            abort(Response("access token missing or wrong: open the address the server printed\n", 403,
                           mimetype="text/plain"))

    def annotator_of(value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_NAME:
            raise InvalidRequest(f"annotator name must be 1 to {MAX_NAME} characters")
        return value.strip()

    def progress(annotator: str, items: list[Item] | None = None, done: set[str] | None = None) -> dict[str, Any]:
        """``done``/``total`` of the progress bar, and the state of candidate sampling."""
        items = session.pool.items() if items is None else items
        done = done_items(session.log.records(), annotator) if done is None else done
        return {"done": sum(item.id in done for item in items), "total": session.pool.total,
                "generating": not session.pool.finished, "generation_error": session.pool.error}

    @app.errorhandler(InvalidRequest)
    def bad_request(err: InvalidRequest) -> tuple[Response, int]:
        return jsonify(error=str(err)), 400

    @app.get("/")
    def index() -> Response:
        return Response(static_text("index.html"), mimetype="text/html")

    @app.get("/static/<name>")
    def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            abort(404)
        return Response(static_text(name), mimetype=STATIC_FILES[name])

    @app.get("/api/info")
    def info() -> Response:
        return jsonify(guidelines=session.guidelines)

    @app.get("/api/next")
    def next_item() -> Response:
        annotator = annotator_of(request.args.get("annotator"))
        items, done = session.pool.items(), done_items(session.log.records(), annotator)
        state = progress(annotator, items, done)
        item = next((i for i in items if i.id not in done), None)
        if item is None:
            return jsonify(item=None, **state)
        shown = shown_order(session.seed, annotator, item.id, len(item.responses))
        return jsonify(item={"id": item.id, "prompt": item.prompt, "shown": shown,
                             "responses": [item.responses[i] for i in shown]}, **state)

    @app.post("/api/judge")
    def judge() -> tuple[Response, int] | Response:
        body = request.get_json(silent=True)  # JSON only: a cross-site form post cannot send it
        if not isinstance(body, dict):
            raise InvalidRequest("expected a JSON object")
        annotator = annotator_of(body.get("annotator"))
        item = session.pool.get(str(body.get("item")))
        if item is None:
            raise InvalidRequest(f"unknown item {body.get('item')!r}")
        judgement = parse_judgement(body, item, annotator, session.seed)
        try:
            session.log.judge(judgement)
        except AlreadyLabelled:
            return jsonify(error="already labelled", **progress(annotator)), 409
        return jsonify(saved=judgement["id"], **progress(annotator))

    @app.post("/api/undo")
    def undo() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidRequest("expected a JSON object")
        annotator = annotator_of(body.get("annotator"))
        undone = session.log.undo(annotator)
        return jsonify(undone=undone["item"] if undone else None, **progress(annotator))

    return app
