"""The real labelling page in headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped with a reason when Playwright or ``/usr/bin/chromium`` is missing; ``.ci/run`` installs
both. Nothing is downloaded: Playwright launches the system browser (``executable_path``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the labelling app needs Flask: pip install -e '.[label]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[test]'")

from rlhf_lightning.labelling.export import export_annotations
from rlhf_lightning.labelling.storage import judgements, read_log
from tests.test_label_app import GUIDELINES, make_session, running_server

CHROMIUM = os.environ.get("RLHF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason=f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver (as .ci/run does)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(10_000)
    yield page
    page.evaluate("localStorage.clear()")
    page.close()


def progress(page) -> object:
    return page.locator("#progress-text")


def test_label_by_click_and_keyboard_undo_reload_and_export(tmp_path: Path, page) -> None:
    expect = sync_api.expect
    session = make_session(tmp_path, count=4, ranked=1)
    items = session.pool.items()
    with running_server(session) as base:
        page.goto(base)
        page.fill("#annotator", "Ada")
        page.click("#start")
        expect(progress(page)).to_have_text("0 / 5")
        expect(page.locator("#prompt")).to_have_text(items[0].prompt)
        assert page.locator(".response").count() == 2

        page.click("#response-1")                       # item 0: a click on the left response
        expect(progress(page)).to_have_text("1 / 5")
        expect(page.locator("#prompt")).to_have_text(items[1].prompt)
        page.keyboard.press("2")                        # item 1: the right one, by keyboard
        expect(progress(page)).to_have_text("2 / 5")
        page.keyboard.press("t")                        # item 2: a tie ...
        expect(progress(page)).to_have_text("3 / 5")
        page.keyboard.press("u")                        # ... undone: item 2 is back
        expect(progress(page)).to_have_text("2 / 5")
        expect(page.locator("#prompt")).to_have_text(items[2].prompt)
        page.locator("#comment").press_sequentially("close call; 1 is shorter, u t s")  # keys in the box
        page.locator("#comment").blur()                 # are text, not shortcuts
        expect(progress(page)).to_have_text("2 / 5")
        page.click("#response-1")
        expect(progress(page)).to_have_text("3 / 5")
        expect(page.locator("#comment")).to_have_value("")

        page.reload()                                   # the name is remembered, the place too
        expect(progress(page)).to_have_text("3 / 5")
        expect(page.locator("#prompt")).to_have_text(items[3].prompt)
        page.keyboard.press("s")                        # item 3: skipped
        expect(progress(page)).to_have_text("4 / 5")

        expect(page.locator(".response")).to_have_count(3)  # item 4: rank three
        page.keyboard.press("3")
        expect(page.locator("#response-3 .rank")).to_have_text("#1")
        page.click("#response-1")                       # second best; the last one follows
        expect(progress(page)).to_have_text("5 / 5")
        expect(page.locator("#done")).to_be_visible()

    events = read_log(session.log.path)
    assert [e["event"] for e in events] == ["judgement"] * 3 + ["undo"] + ["judgement"] * 3
    in_force = judgements(events)
    assert [j["item"] for j in in_force] == [i.id for i in items]
    assert [j["choice"] for j in in_force] == ["left", "right", "left", "skip", "ranking"]
    assert all(j["annotator"] == "Ada" for j in in_force)
    assert in_force[2]["comment"] == "close call; 1 is shorter, u t s" and events[2]["choice"] == "tie"
    shown = [j["shown"] for j in in_force]
    assert in_force[4]["ranking"] == [shown[4][2], shown[4][0], shown[4][1]]

    summary = export_annotations(session.log.path, tmp_path / "prefs.jsonl")
    assert summary.pairs == 1 + 1 + 1 + 0 + 3
    pairs = [(r["chosen"], r["rejected"]) for r in read_log(tmp_path / "prefs.jsonl")]
    left, right = (lambda n: items[n].responses[shown[n][0]]), (lambda n: items[n].responses[shown[n][1]])
    assert pairs[:3] == [(left(0), right(0)), (right(1), left(1)), (left(2), right(2))]
    ranked = [items[4].responses[i] for i in in_force[4]["ranking"]]
    assert pairs[3:] == [(ranked[0], ranked[1]), (ranked[0], ranked[2]), (ranked[1], ranked[2])]


def test_side_by_side_on_a_laptop_stacked_on_a_phone(tmp_path: Path, page) -> None:
    session = make_session(tmp_path, count=2)
    with running_server(session) as base:
        page.goto(f"{base}?annotator=Ada")
        sync_api.expect(page.locator("#response-2")).to_be_visible()
        first, second = page.locator("#response-1").bounding_box(), page.locator("#response-2").bounding_box()
        assert first["y"] == second["y"] and second["x"] > first["x"] + first["width"]  # side by side

        page.set_viewport_size({"width": 390, "height": 844})
        first, second = page.locator("#response-1").bounding_box(), page.locator("#response-2").bounding_box()
        assert second["y"] >= first["y"] + first["height"] and first["x"] == second["x"]  # stacked
        assert first["x"] + first["width"] <= 390  # no sideways scrolling
        assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_after_a_judgement_or_undo_enter_presses_nothing(tmp_path: Path, page) -> None:
    expect = sync_api.expect
    session = make_session(tmp_path, count=4)
    with running_server(session) as base:
        page.goto(f"{base}?annotator=Ada")
        expect(progress(page)).to_have_text("0 / 4")
        expect(page.locator("#guidelines")).to_be_hidden()  # none given
        for button, shown in (("#tie", "1 / 4"), ("#skip", "2 / 4"), ("#undo", "1 / 4")):
            page.click(button)
            expect(progress(page)).to_have_text(shown)
            assert page.evaluate("document.activeElement.id") == "task"  # not the button just pressed
            page.keyboard.press("Enter")                # a stray Enter: no label, no second undo
        page.keyboard.press("1")
        expect(progress(page)).to_have_text("2 / 4")
    events = read_log(session.log.path)
    assert [e.get("choice", e["event"]) for e in events] == ["tie", "skip", "undo", "left"]


def test_undo_stays_on_the_all_labelled_screen(tmp_path: Path, page) -> None:
    expect = sync_api.expect
    session = make_session(tmp_path, count=2)
    last = session.pool.items()[1]
    with running_server(session) as base:
        page.goto(f"{base}?annotator=Ada")
        expect(progress(page)).to_have_text("0 / 2")
        page.keyboard.press("1")
        expect(progress(page)).to_have_text("1 / 2")
        page.keyboard.press("2")
        expect(page.locator("#done")).to_be_visible()
        page.click("#done-undo")                        # the last label comes back
        expect(progress(page)).to_have_text("1 / 2")
        expect(page.locator("#done")).to_be_hidden()
        expect(page.locator("#prompt")).to_have_text(last.prompt)
        page.keyboard.press("1")
        expect(page.locator("#done-undo")).to_be_visible()
        page.keyboard.press("u")                        # the key works there too
        expect(progress(page)).to_have_text("1 / 2")
    assert [j["item"] for j in judgements(read_log(session.log.path))] == [session.pool.items()[0].id]


def test_guidelines_are_shown_as_plain_text(tmp_path: Path, page) -> None:
    expect = sync_api.expect
    session = make_session(tmp_path, count=1)
    session.guidelines = GUIDELINES
    with running_server(session) as base:
        page.goto(f"{base}?annotator=Ada")
        expect(page.locator("#guidelines")).to_be_visible()
        page.click("#guidelines summary")
        text = page.locator("#guidelines-text")
        expect(text).to_be_visible()
        assert text.inner_text().strip() == GUIDELINES.strip()  # line breaks kept, markup shown as written
        assert text.locator("b").count() == 0 and page.locator("#guidelines h1").count() == 0
        assert text.bounding_box()["y"] < page.locator("#prompt").bounding_box()["y"]  # above the item


@pytest.mark.slow
def test_a_browser_round_of_the_online_loop(round_zero: Path, tmp_path: Path, browser) -> None:
    """``rlhf-lightning iterate`` with ``rater: browser``: the loop serves the page, waits while a
    person labels the round's quota, then refreshes the reward model and runs PPO."""
    import json
    import socket
    import threading

    from rlhf_lightning.cli import main
    from tests.test_iterate import start_from

    expect = sync_api.expect
    with socket.socket() as probe:  # a free port for the page
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "loop"
    config = start_from(round_zero, run, rounds=1, rater="browser", labels_per_round=3, label_port=port,
                        poll_seconds=0.2)
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(main(["iterate", "--config", str(config)])), daemon=True)
    loop.start()
    deadline = time.monotonic() + 120
    while not page_is_up(port) and loop.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    page = browser.new_page()  # not the page fixture: its teardown needs the server, which the loop stops
    try:
        page.goto(f"http://127.0.0.1:{port}/?annotator=Ada")
        expect(progress(page)).to_have_text("0 / 3", timeout=60_000)  # 3 fresh prompts, sampled meanwhile
        for done in (1, 2):
            expect(page.locator("#response-2")).to_be_visible(timeout=60_000)
            page.keyboard.press("1")
            expect(progress(page)).to_have_text(f"{done} / 3")
        expect(page.locator("#response-2")).to_be_visible(timeout=60_000)
        page.keyboard.press("1")
        # the third label completes the quota: the loop may close the page's server before the
        # page shows "3 / 3", so wait for the label in the round's log instead
        log = run / "round_1" / "annotations.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and len(judgements(read_log(log))) == 3):
            time.sleep(0.2)
    finally:
        page.close()
    loop.join(timeout=600)
    assert result == [0]
    labelled = judgements(read_log(run / "round_1" / "annotations.jsonl"))
    assert len(labelled) == 3 and {j["annotator"] for j in labelled} == {"Ada"}
    rows = json.loads((run / "rounds.json").read_text())
    assert [r["labels"] for r in rows] == [200, 3] and 0.0 <= rows[1]["fresh_accuracy"] <= 1.0
    assert (run / "round_1" / "ppo" / "policy" / "config.json").exists()


def page_is_up(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
            return True
    except OSError:
        return False
