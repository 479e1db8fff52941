"""The real labelling page in headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped with a reason when Playwright or ``/usr/bin/chromium`` is missing; ``.ci/run`` installs
both. Nothing is downloaded: Playwright launches the system browser (``executable_path``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the labelling app needs Flask: pip install -e '.[label]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[test]'")

from rlhf_lightning.labelling.export import export_annotations
from rlhf_lightning.labelling.storage import judgements, read_log
from tests.test_label_app import make_session, running_server

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
