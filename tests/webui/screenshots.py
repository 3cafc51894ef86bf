"""`python -m tests.webui.screenshots DIR [CHECKPOINT]`: the README's pictures of the chat page, light and dark, with a
conversation that reasons, runs python and searches the web, on scripted completions (tests/scripted.py) over the
tiny checkpoint (written to a temporary folder when none is given)."""

import sys
import tempfile
from pathlib import Path

from tests.tools.test_tools import PAGES
from tests.webui.conftest import CHROMIUM, scripted_server

SCRIPT = [
    {"match": "prime", "completion":
        "<|channel|>analysis<|message|>The user wants the primes below 30. Quickest to compute them.<|end|>"
        "<|start|>assistant<|channel|>analysis to=python code<|message|>"
        "print([n for n in range(2, 30) if all(n % d for d in range(2, n))])<|call|>"},
    {"match": "[2, 3, 5", "completion":
        "<|channel|>analysis<|message|>The sandbox printed them; a short table and the code.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>There are **10 primes** below 30:\n\n"
        "| range | primes |\n|---|---|\n| 1-9 | 2, 3, 5, 7 |\n| 10-19 | 11, 13, 17, 19 |\n| 20-29 | 23, 29 |\n\n"
        "```python\nprimes = [n for n in range(2, 30) if all(n % d for d in range(2, n))]\n```\n<|return|>"},
    {"match": "tides", "completion": '<|channel|>analysis<|message|>Let me look it up.<|end|><|start|>assistant'
                                     '<|channel|>analysis to=browser.search code<|message|>{"query": "moon tides"}'
                                     '<|call|>'},
    {"match": "Search results for", "completion": '<|channel|>analysis to=browser.open code<|message|>{"id": 0}'
                                                  '<|call|>'},
    {"match": "(https://tides.example/)", "completion": "<|channel|>final<|message|>Tides come from the Moon's "
                                                        "gravity【1†L2】.<|return|>"},
]


def main(out: Path, checkpoint: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            from ossie.synth import write_checkpoint

            checkpoint = Path(tmp) / "tiny"
            write_checkpoint(checkpoint, "tiny")
        server = scripted_server(Path(tmp), checkpoint, SCRIPT, "--builtin-tools", "python,browser", pages=PAGES)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 860})
                page.goto(server.url)
                for i, text in enumerate(("Which numbers below 30 are prime?", "Why are there tides?")):
                    page.fill("#input", text)
                    page.press("#input", "Enter")
                    page.locator("article.assistant").nth(i).locator(".stats", has_text="finished").wait_for()
                page.locator("article.assistant details.reasoning summary").first.click()  # one reasoning shown
                for scheme in ("light", "dark"):
                    page.emulate_media(color_scheme=scheme)
                    page.locator("#messages").evaluate("box => box.scrollTop = 0")
                    page.screenshot(path=str(out / f"webui-{scheme}.png"))
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
