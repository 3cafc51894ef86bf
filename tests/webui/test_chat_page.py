"""The chat page in Chromium: a conversation streamed with its reasoning, stop, regenerate, edit, settings reaching
the request, conversations kept across reloads, rename / delete / search, export and import in `ossie chat`'s
/save format, copy, and model output that tries to run code."""

import json
import re
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from ossie.chat_cli import Chat
from tests.helpers.server import MODEL, Server
from tests.helpers.server import metrics as read_metrics
from tests.webui.conftest import scripted_server, stopped

expect = pytest.importorskip("playwright.sync_api").expect  # the [test] extra installs it

FINAL = "<|start|>assistant<|channel|>final<|message|>"
LONG = " ".join(f"word{i}" for i in range(400))
HOSTILE = ('Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
           "[a link](javascript:window.__pwned=3) <a href=\"javascript:window.__pwned=4\">raw</a> "
           "![pic](https://tracker.example/pixel.png) [fine](https://example.com/ok)")
SCRIPT = [
    {"match": "hello", "completion": "<|channel|>analysis<|message|>The user greets me. Some code will do.<|end|>"
                                     + FINAL + "Hi! Here is **code**:\n\n```python\nprint(1 + 1)\n```\n<|return|>"},
    {"match": "think at length", "completion": "<|channel|>analysis<|message|>" + LONG[:600] + "<|end|>" + FINAL
                                               + "Done thinking.<|return|>"},
    {"match": "write at length", "completion": "<|channel|>analysis<|message|>A long one.<|end|>" + FINAL + LONG
                                               + "<|return|>"},
    {"match": "be hostile", "completion": "<|channel|>analysis<|message|><img src=x onerror=\"window.__pwned=5\">"
                                          "<|end|>" + FINAL + HOSTILE + "<|return|>"},
    {"match": "ORIGINAL question", "completion": "<|channel|>final<|message|>Answer to the original.<|return|>"},
    {"match": "EDITED question", "completion": "<|channel|>final<|message|>Answer to the edit.<|return|>"},
    {"match": "Reasoning: high", "completion": "<|channel|>final<|message|>Thinking hard.<|return|>"},
    "<|channel|>final<|message|>Answer one.<|return|>",
    "<|channel|>final<|message|>Answer two.<|return|>",
]


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    s = scripted_server(tmp_path_factory.mktemp("webui"), tiny_repo, SCRIPT, "--max-prompt-tokens", "400",
                        pace=0.02)
    yield s
    stopped(s)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def answers(page):
    return page.locator("article.assistant")


def wait_done(page, n=1):
    """Until the n-th answer has its closing figures."""
    answers(page).nth(n - 1).locator(".stats", has_text=re.compile("finished|cut at|stopped|failed")).wait_for()


def metric(server, name):
    return read_metrics(server.url)[name]


def test_the_page_streams_an_answer_with_its_reasoning_and_figures(server, page):
    page.goto(server.url)
    page.locator("#model", has_text=MODEL).wait_for()
    send(page, "think at length")
    reasoning = page.locator("article.assistant details.reasoning")
    reasoning.locator(".reasoning-text", has_text="word5 ").wait_for()
    assert reasoning.get_attribute("open") is not None  # open while the model reasons
    assert reasoning.locator("summary").inner_text() == "Thinking…"
    assert re.search(r"≈\d+ tokens so far · [\d.]+ tok/s · first token", answers(page).first.inner_text())
    wait_done(page)
    assert reasoning.get_attribute("open") is None  # collapsed once the answer came
    assert re.match(r"Reasoning \(\d+ words\)", reasoning.locator("summary").inner_text())
    send(page, "hello there")
    wait_done(page, 2)
    reasoning = answers(page).nth(1).locator("details.reasoning")
    answer = answers(page).nth(1)
    assert answer.locator(".markdown strong").inner_text() == "code"
    assert answer.locator("pre code.hljs").inner_text().strip() == "print(1 + 1)"  # highlighted
    assert "The user greets me." in reasoning.locator(".reasoning-text").text_content()
    figures = answer.locator(".stats").inner_text()
    assert re.search(r"\d+ tokens \(\d+ reasoning\) · [\d.]+ tok/s · first token [\d.]+ s · prompt \d+ tokens, \d+ "
                     r"cached · finished", figures), figures
    assert page.locator("#conversations li").count() == 1
    assert page.locator("#title").inner_text() == "think at length"


def test_the_second_turn_reads_the_first_from_the_prefix_cache(tiny_repo, page):
    """On the tiny model itself (the scripted runner has no prefix cache): the figures say what the cache served."""
    s = Server(tiny_repo)
    try:
        page.goto(s.url)
        page.click("#open-settings")
        page.get_by_label("Max tokens").fill("8")
        page.get_by_role("button", name="Save").click()
        send(page, "hello again")
        wait_done(page)
        send(page, "and once more")
        wait_done(page, 2)
        figures = answers(page).nth(1).locator(".stats").inner_text()
        cached = int(re.search(r"(\d+) cached", figures).group(1))
        assert cached > 0, figures
    finally:
        stopped(s)


def test_stop_ends_the_generation_on_the_server(server, page):
    page.goto(server.url)
    cancelled = metric(server, "ossie_requests_cancelled_total")
    send(page, "write at length")
    answers(page).first.locator(".markdown", has_text="word5 ").wait_for()
    page.click("#stop")
    wait_done(page)
    assert "stopped" in answers(page).first.locator(".stats").inner_text()
    deadline = time.time() + 5
    while metric(server, "ossie_requests_cancelled_total") == cancelled and time.time() < deadline:
        time.sleep(0.1)
    assert metric(server, "ossie_requests_cancelled_total") == cancelled + 1
    generated = metric(server, "ossie_generation_tokens_total")
    time.sleep(0.5)
    assert metric(server, "ossie_generation_tokens_total") == generated  # nothing more generated for it
    assert "word399" not in answers(page).first.inner_text()
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()


def test_escape_stops_too(server, page):
    page.goto(server.url)
    send(page, "write at length")
    answers(page).first.locator(".markdown", has_text="word5 ").wait_for()
    page.keyboard.press("Escape")
    wait_done(page)
    assert "stopped" in answers(page).first.locator(".stats").inner_text()


def test_regenerate_keeps_both_answers(server, page):
    page.goto(server.url)
    send(page, "say something")
    wait_done(page)
    first = answers(page).first.locator(".markdown").inner_text()
    answers(page).first.get_by_role("button", name="Regenerate").click()
    answers(page).first.locator(".actions", has_text="2/2").wait_for()
    wait_done(page)
    second = answers(page).first.locator(".markdown").inner_text()
    assert {first, second} == {"Answer one.", "Answer two."}
    answers(page).first.get_by_role("button", name="Previous version").click()
    expect(answers(page).first.locator(".markdown")).to_have_text(first)
    expect(answers(page).first.locator(".actions")).to_contain_text("1/2")
    page.reload()  # the branch shown is remembered
    expect(answers(page).first.locator(".markdown")).to_have_text(first)


def test_edit_resends_and_keeps_the_earlier_branch(server, page):
    page.goto(server.url)
    send(page, "ORIGINAL question")
    wait_done(page)
    page.locator("article.user").get_by_role("button", name="Edit").click()
    field = page.get_by_label("Edit the message")
    field.fill("EDITED question")
    field.press("Enter")
    page.locator("article.user .actions", has_text="2/2").wait_for()
    wait_done(page)
    assert page.locator("article.user .user-text").inner_text() == "EDITED question"
    assert answers(page).first.locator(".markdown").inner_text() == "Answer to the edit."
    page.locator("article.user").get_by_role("button", name="Previous version").click()
    expect(page.locator("article.user .user-text")).to_have_text("ORIGINAL question")
    expect(answers(page).first.locator(".markdown")).to_have_text("Answer to the original.")


def test_effort_and_settings_reach_the_request(server, page):
    page.goto(server.url)
    page.click("#open-settings")
    page.get_by_label("Temperature").fill("0.5")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Max tokens").fill("50")
    page.get_by_role("button", name="Save").click()
    page.select_option("#effort", "high")
    page.click("#system-box summary")
    page.fill("#system", "You are terse.")
    page.locator("#system").blur()
    with page.expect_request("**/v1/responses") as sent:
        send(page, "how hard do you think")
    body = sent.value.post_data_json
    assert body["reasoning"] == {"effort": "high"}
    assert (body["temperature"], body["seed"], body["max_output_tokens"]) == (0.5, 7, 50)
    assert body["input"][0] == {"type": "message", "role": "system", "content": "You are terse."}
    assert body["stream"] is True and body["store"] is False
    wait_done(page)
    assert answers(page).first.locator(".markdown").inner_text() == "Thinking hard."  # the server rendered "high"
    page.reload()  # the settings and the conversation's effort are remembered
    expect(page.locator("#effort")).to_have_value("high")
    page.click("#open-settings")
    assert page.get_by_label("Temperature").input_value() == "0.5"


def test_model_output_cannot_run_code(server, page):
    page.goto(server.url)
    send(page, "be hostile")
    wait_done(page)
    answer = answers(page).first
    assert "<img src=x" in answer.locator(".markdown").inner_text()  # shown as text
    assert answer.locator("img, script, iframe, object").count() == 0
    assert answer.locator('a[href^="javascript"]').count() == 0
    answer.get_by_text("a link").click()
    answer.get_by_text("raw").click()
    assert answer.locator("a", has_text="[image: pic]").get_attribute("href") == "https://tracker.example/pixel.png"
    ok = answer.locator("a", has_text="fine")
    assert ok.get_attribute("rel") == "noopener noreferrer nofollow" and ok.get_attribute("target") == "_blank"
    page.reload()  # rendered again from the stored conversation
    wait_done(page)
    assert page.evaluate("window.__pwned") is None
    # and behind the sanitizer, the CSP: an inline handler put into the page by hand does not run either
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=\"window.__pwned=6\">')")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    page.console.errors.clear()  # the CSP's refusals and the blocked image are logged as errors


def test_conversations_survive_a_reload_and_can_be_renamed_searched_and_deleted(server, page):
    page.goto(server.url)
    send(page, "ORIGINAL question")
    wait_done(page)
    page.click("#new-chat")
    send(page, "hello world")
    wait_done(page)
    page.reload()
    items = page.locator("#conversations li")
    expect(items).to_have_count(2)
    expect(page.locator("#title")).to_have_text("hello world")  # the latest reopens
    expect(answers(page)).to_have_count(1)
    items.filter(has_text="ORIGINAL").get_by_role("button", name="Rename").click()
    page.get_by_label("New name").fill("Renamed one")
    page.get_by_label("New name").press("Enter")
    items.filter(has_text="Renamed one").wait_for()
    page.fill("#search", "greets")  # in a reasoning only: not searched
    expect(items).to_have_count(0)
    page.fill("#search", "original")  # a message's text
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Renamed one")
    page.fill("#search", "")
    page.once("dialog", lambda d: d.accept())
    items.filter(has_text="Renamed one").get_by_role("button", name="Delete").click()
    items.filter(has_text="Renamed one").wait_for(state="detached")
    page.reload()
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("hello world")


def test_export_is_what_ossie_chat_loads_and_import_reads_what_it_saves(server, page, tmp_path):
    page.goto(server.url)
    page.select_option("#effort", "low")
    send(page, "hello there")
    wait_done(page)
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "exported.json"
    download.value.save_as(exported)
    saved = json.loads(exported.read_text())
    assert saved["reasoning_effort"] == "low" and saved["messages"][0] == {"role": "user", "content": "hello there"}
    assert saved["messages"][1]["content"].startswith("Hi! Here is **code**")
    assert saved["messages"][1]["reasoning_content"] == "The user greets me. Some code will do."
    # ossie chat's own /load and /save, on a stand-in for its session (no model needed for either)
    chat = SimpleNamespace(options={"reasoning_effort": "medium"}, tools=None, system=None, messages=[],
                           console=Console(file=open("/dev/null", "w")), _fresh_conversation=lambda: None,
                           error=lambda text: pytest.fail(text))
    Chat.load(chat, str(exported))
    assert chat.messages == saved["messages"] and chat.options["reasoning_effort"] == "low"
    chat.messages = [{"role": "user", "content": "from the terminal"},
                     {"role": "assistant", "content": "Terminal answer.", "reasoning_content": "Terminal thought."}]
    chat.system = "Be brief."
    Chat.save(chat, str(tmp_path / "from_chat.json"))
    page.set_input_files("#import-file", str(tmp_path / "from_chat.json"))
    expect(page.locator("#title")).to_have_text("from the terminal")
    expect(page.locator("article.user .user-text")).to_have_text("from the terminal")
    expect(answers(page).first.locator(".markdown")).to_have_text("Terminal answer.")
    expect(page.locator("#system")).to_have_value("Be brief.")
    (tmp_path / "bad.json").write_text('{"not": "a conversation"}')
    page.set_input_files("#import-file", str(tmp_path / "bad.json"))
    expect(page.locator("#banner")).to_contain_text("Cannot import bad.json")  # read after the file, in a moment


def test_copy_puts_the_code_on_the_clipboard(server, page):
    page.goto(server.url)
    send(page, "hello there")
    wait_done(page)
    answers(page).first.get_by_role("button", name="Copy code").click()
    assert page.evaluate("navigator.clipboard.readText()").strip() == "print(1 + 1)"
    answers(page).first.get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("Hi! Here is **code**")


def test_the_page_works_where_the_browser_is_not_in_a_secure_context(server, page):
    """Opened by a LAN address over http (`ossie serve --host 0.0.0.0`), a page has no crypto.randomUUID and no
    navigator.clipboard: ids and copying fall back (emulated here by removing both before the page loads)."""
    page.add_init_script("delete Crypto.prototype.randomUUID; "
                         "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})")
    page.goto(server.url)
    assert page.evaluate("typeof crypto.randomUUID") == "undefined"
    send(page, "hello there")
    wait_done(page)
    copy = answers(page).first.get_by_role("button", name="Copy code")
    copy.click()
    expect(copy).to_have_text("Copied")
    page.reload()
    expect(answers(page)).to_have_count(1)


def test_a_prompt_over_the_limit_says_what_to_do(server, page):
    page.goto(server.url)
    send(page, " ".join(["many words"] * 400))
    wait_done(page)
    error = answers(page).first.locator(".error").inner_text()
    assert "no longer fits the model's context" in error and "Start a new chat" in error
    page.console.errors.clear()  # the browser logs the 400


def test_enter_sends_and_shift_enter_adds_a_line(server, page):
    page.goto(server.url)
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.locator("#input").input_value() == "first line\nsecond line"
    assert answers(page).count() == 0
    page.press("#input", "Enter")
    wait_done(page)
    assert page.locator("article.user .user-text").inner_text() == "first line\nsecond line"


def test_a_phone_width_window_slides_the_conversations_in(server, browser):
    ctx = browser.new_context(viewport={"width": 390, "height": 800})
    page = ctx.new_page()
    page.goto(server.url)
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 0  # off the screen
    page.get_by_role("button", name="Show the conversations").click()
    page.wait_for_timeout(400)
    assert page.locator("#sidebar").bounding_box()["x"] >= 0
    page.get_by_role("button", name="Hide the conversations").click()
    page.wait_for_timeout(400)
    assert page.locator("#sidebar").bounding_box()["x"] < 0
    ctx.close()


def test_dark_follows_the_system(server, browser):
    colors = {}
    for scheme in ("light", "dark"):
        ctx = browser.new_context(color_scheme=scheme)
        page = ctx.new_page()
        page.goto(server.url)
        colors[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        ctx.close()
    assert colors["light"] == "rgb(255, 255, 255)" and colors["dark"] != colors["light"]
