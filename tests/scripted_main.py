"""`python -m tests.scripted_main SCRIPT.json COMMAND ARGS...`: the ossie command line with its model's runner
replaced by a ScriptedRunner (tests/scripted.py) replaying SCRIPT.json, for the server and chat tests that run
ossie in a subprocess."""

import json
import logging
import os
import sys
from pathlib import Path

from ossie import cli
from tests.helpers import use_runner
from tests.scripted import ScriptedRunner


def main() -> int:
    script = json.loads(Path(sys.argv[1]).read_text())
    load = cli.load_llm

    def load_scripted(args):
        llm = load(args)
        pace = float(os.environ.get("OSSIE_TEST_SECONDS_PER_TOKEN", "0"))
        use_runner(llm, ScriptedRunner(llm.runner, script, seconds_per_token=pace))
        logging.getLogger("ossie").warning("replaying scripted completions instead of sampling")
        return llm

    cli.load_llm = load_scripted
    pages = os.environ.get("OSSIE_TEST_PAGES")  # the browser tool searches and opens these pages, not the web
    if pages:
        import ossie.tools.browser
        from ossie.tools import LocalBackend

        served = json.loads(Path(pages).read_text())
        ossie.tools.browser.make_backend = lambda name: LocalBackend(served)
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
