"""The chat page in a real browser: Debian's Chromium driven by Playwright (its own browser download cannot work
here), against `ossie serve` replaying scripted completions (tests/scripted.py).

Without Chromium or Playwright these tests skip, unless OSSIE_REQUIRE_BROWSER is set (.ci/run sets it once it has
installed them): then a missing browser fails them."""

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.helpers.server import Server

CHROMIUM = os.environ.get("OSSIE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    else:
        problem = None if CHROMIUM else "no chromium on this machine (apt-get install chromium)"
    if problem and os.environ.get("OSSIE_REQUIRE_BROWSER"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox cannot start as root, which CI is
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Console:
    """What the page reported: console errors (a CSP violation is one) and uncaught exceptions."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


@pytest.fixture
def context(browser):
    """A fresh browser profile (no conversations, no key), clipboard allowed."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 800}, accept_downloads=True,
                              permissions=["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def page(context):
    """A page of a fresh profile; the test fails if the page logged an error or threw (expected ones: the test
    clears page.console.errors)."""
    pg = context.new_page()
    pg.console = Console(pg)
    pg.set_default_timeout(20_000)
    yield pg
    assert not pg.console.errors, pg.console.errors


def scripted_server(folder: Path, checkpoint, script: list, *args: str, pace: float = 0.0, pages: dict | None = None):
    """`ossie serve` replaying `script`, `pace` seconds a token; the browser tool reads `pages` from memory."""
    (folder / "script.json").write_text(json.dumps(script))
    env = {"OSSIE_TEST_SECONDS_PER_TOKEN": str(pace)}
    if pages is not None:
        (folder / "pages.json").write_text(json.dumps(pages))
        env["OSSIE_TEST_PAGES"] = str(folder / "pages.json")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Server(checkpoint, *args, script=folder / "script.json")
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def stopped(server: Server) -> None:
    log = server.stop()
    assert "Traceback" not in log, log


def in_background(work) -> threading.Thread:
    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t
