"""The command line's flags become EngineArgs by name (engine_args.py): an option is added there and to the flags,
and reaches LLM, the engine and the server with nothing threaded between."""

import pytest

from ossie.cli import build_parser
from ossie.engine_args import EngineArgs


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_speculative_flags_reach_the_engine_args(command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    args = build_parser().parse_args([command, "some/model", *extra, "--speculative", "ngram",
                                      "--num-speculative-tokens", "3"])
    engine = EngineArgs.from_cli_args(args)
    assert (engine.speculative, engine.num_speculative_tokens) == ("ngram", 3)
    default = EngineArgs.from_cli_args(build_parser().parse_args([command, "some/model", *extra]))
    assert default.speculative is None and default.num_speculative_tokens == 4


def test_engine_args_refuse_what_cannot_be():
    assert EngineArgs("m", speculative="off").speculative is None  # the command line's name for off
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineArgs("m", speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        EngineArgs("m", num_speculative_tokens=0)
