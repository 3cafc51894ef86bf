"""How `ossie serve` serves the chat page (the files, their CSP, the size, --no-webui, the key), and the page
against what a server does: a key it must ask for, a busy server, a server gone, built-in tools and citations;
and an accessibility check of the page with axe-core."""

import gzip
import re
import threading
import time

import httpx
import pytest

from ossie.server import webui
from tests.helpers.server import MODEL, Server
from tests.server.test_server_tools import SCRIPT as TOOL_SCRIPT
from tests.tools.test_tools import BIG, PAGES
from tests.webui.conftest import scripted_server, stopped
from tests.webui.test_chat_page import answers, send, wait_done

PAGE_BUDGET = 150 * 1024  # the limit: the page and everything it loads, gzipped


def test_the_page_fits_in_150_kb_gzipped():
    files = [webui.WEBUI_DIR / "index.html", *webui.static_files().values()]
    total = sum(len(gzip.compress(f.read_bytes(), 9)) for f in files)
    assert total <= PAGE_BUDGET, f"{total} bytes gzipped"
    names = set(webui.static_files())
    assert {"app.js", "vendor/marked.esm.js", "vendor/purify.min.js", "vendor/LICENSE-marked.txt"} <= names


def test_everything_the_page_loads_is_served_from_the_package():
    """No CDN: every script, style and module import names a file the server has."""
    html = (webui.WEBUI_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    for js in webui.static_files().values():
        if js.suffix == ".js":
            refs += [f"/ui/static/{js.parent.relative_to(webui.WEBUI_DIR / 'static').as_posix()}/{m}".replace(
                "/./", "/") for m in re.findall(r'from\s*"(\./[^"]+)"', js.read_text())]
    files = webui.static_files()
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("/ui/static/"), ref
        assert ref.removeprefix("/ui/static/").lstrip("./") in files, ref


@pytest.fixture(scope="module")
def keyed(tiny_repo, tmp_path_factory):
    s = scripted_server(tmp_path_factory.mktemp("keyed"), tiny_repo, ["<|channel|>final<|message|>Keyed answer."
                                                                      "<|return|>"], "--api-key", "sesame")
    yield s
    stopped(s)


def test_page_files_carry_the_csp_and_need_no_key_but_the_config_does(keyed):
    for path in ("/", "/ui/static/app.js", "/ui/static/vendor/marked.esm.js"):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(keyed.url + "/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.head(keyed.url + "/").status_code == 200
    assert httpx.get(keyed.url + "/ui/config").status_code == 401
    r = httpx.get(keyed.url + "/ui/config", headers={"Authorization": "Bearer sesame"})
    assert r.json() == {"models": [MODEL], "max_model_len": r.json()["max_model_len"], "builtin_tools": []}
    assert httpx.get(keyed.url + "/v1/models").status_code == 401  # the API itself still needs the key
    for path in ("/ui/static/../../server/app.py", "/ui/static/%2e%2e/index.html", "/ui/static/nothing.js"):
        assert httpx.get(keyed.url + path).status_code in (401, 404), path


def test_the_page_asks_for_the_key_once_and_shows_nothing_before(keyed, page):
    page.goto(keyed.url)
    dialog = page.locator("#key-dialog")
    dialog.wait_for()
    assert not page.locator("#app").is_visible() and page.locator("#model").inner_text() == ""
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    page.locator("#key-error", has_text="not accepted").wait_for()
    page.fill("#key", "sesame")
    page.press("#key", "Enter")
    page.locator("#model", has_text=MODEL).wait_for()
    send(page, "hi")
    wait_done(page)
    assert answers(page).first.locator(".markdown").inner_text() == "Keyed answer."
    page.reload()
    page.locator("#model", has_text=MODEL).wait_for()
    assert not dialog.is_visible()
    page.console.errors.clear()  # the 401s of the first tries


def test_a_key_no_longer_accepted_is_asked_for_again(keyed, page):
    page.add_init_script("localStorage.setItem('ossie.apiKey', 'sesame')")
    page.goto(keyed.url)
    page.locator("#model", has_text=MODEL).wait_for()
    page.evaluate("localStorage.setItem('ossie.apiKey', 'rotated')")  # the server's key changed meanwhile
    send(page, "hi")
    page.locator("#key-error", has_text="no longer accepts").wait_for()
    page.fill("#key", "sesame")
    page.press("#key", "Enter")
    page.locator("#model", has_text=MODEL).wait_for()
    answers(page).first.get_by_role("button", name="Regenerate").click()
    answers(page).first.locator(".markdown", has_text="Keyed answer.").wait_for()
    page.console.errors.clear()  # the 401


def test_no_webui(tiny_repo):
    s = Server(tiny_repo, "--no-webui")
    try:
        assert httpx.get(s.url + "/").status_code == 404
        assert httpx.get(s.url + "/ui/static/app.js").status_code == 404
        assert httpx.get(s.url + "/ui/config").status_code == 404
    finally:
        stopped(s)


def test_a_busy_server_is_a_message_with_when_to_retry(tiny_repo, tmp_path, page):
    s = scripted_server(tmp_path, tiny_repo, ["<|channel|>final<|message|>" + "slow " * 200 + "<|return|>"],
                        "--max-running", "1", "--max-queued", "0", pace=0.05)
    try:
        stop = threading.Event()

        def occupy():
            with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60, json={
                    "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

        threading.Thread(target=occupy, daemon=True).start()
        deadline = time.time() + 20
        while s.health()["running"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        page.goto(s.url)
        send(page, "anyone there?")
        wait_done(page)
        error = answers(page).first.locator(".error").inner_text()
        assert "busy" in error and re.search(r"Try again in \d+ s", error), error
        stop.set()
        page.console.errors.clear()  # the browser logs the 429
    finally:
        stopped(s)


def test_a_server_gone_is_a_message_and_the_conversations_stay(tiny_repo, tmp_path, page):
    s = scripted_server(tmp_path, tiny_repo, ["<|channel|>final<|message|>Still here.<|return|>"])
    page.goto(s.url)
    send(page, "first")
    wait_done(page)
    stopped(s)
    send(page, "second")
    wait_done(page, 2)
    error = answers(page).nth(1).locator(".error").inner_text()
    assert "Cannot reach the server" in error and "ossie serve" in error
    assert answers(page).first.locator(".markdown").inner_text() == "Still here."
    page.console.errors.clear()


@pytest.fixture(scope="module")
def tools(tiny_repo, tmp_path_factory):
    s = scripted_server(tmp_path_factory.mktemp("tools"), tiny_repo, TOOL_SCRIPT, "--builtin-tools", "python,browser",
                        "--python-timeout", "5", pages=PAGES)
    yield s
    stopped(s)


def test_python_calls_are_cards_with_their_output(tools, page):
    page.goto(tools.url)
    with page.expect_request("**/v1/responses") as sent:
        send(page, "run some python")
    assert {t["type"] for t in sent.value.post_data_json["tools"]} == {"code_interpreter", "web_search_preview"}
    wait_done(page)
    card = answers(page).first.locator(".tool")
    assert card.locator("summary").inner_text() == "Python"
    assert card.locator("code").inner_text().strip() == "print(2**100)"
    assert card.locator(".tool-output").inner_text().strip() == BIG
    assert answers(page).first.locator(".markdown").inner_text() == f"It is {BIG}."


def test_browser_calls_are_cards_and_citations_links(tools, page):
    page.goto(tools.url)
    send(page, "search the web")
    wait_done(page)
    cards = answers(page).first.locator(".tool")
    assert cards.count() == 2
    assert "Searched the web for “moon tides”" in cards.nth(0).inner_text()
    assert cards.nth(1).locator("a").get_attribute("href") == "https://tides.example/"
    citation = answers(page).first.locator(".markdown a.citation")
    assert citation.inner_text() == "[1]" and citation.get_attribute("href") == "https://tides.example/"
    assert answers(page).first.locator(".markdown").inner_text() == "The Moon pulls the sea[1]."
    page.reload()  # stored with the conversation
    assert answers(page).first.locator(".markdown a.citation").get_attribute("href") == "https://tides.example/"


def test_no_serious_accessibility_violation(tools, page):
    from axe_playwright_python.sync_playwright import Axe

    def serious(results):
        return [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
                for v in results.response["violations"] if v["impact"] in ("serious", "critical")]

    page.goto(tools.url)
    page.locator("#model", has_text=MODEL).wait_for()
    assert serious(Axe().run(page)) == []
    send(page, "run some python")
    wait_done(page)
    send(page, "search the web")
    wait_done(page, 2)
    assert serious(Axe().run(page)) == []
    for scheme in ("dark", "light"):
        page.emulate_media(color_scheme=scheme)
        assert serious(Axe().run(page)) == [], scheme


def test_json_of_config_is_the_servers(tools):
    config = httpx.get(tools.url + "/ui/config").json()
    assert config["builtin_tools"] == ["python", "browser"]
