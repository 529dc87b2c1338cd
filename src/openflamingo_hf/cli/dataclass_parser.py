"""`OneLineErrorParser`: the `HfArgumentParser` (dataclass) flavour of this package's one-line-error parsers.

Apart from `parsing` because it imports transformers; `from openflamingo_hf.cli.parsing import OneLineErrorParser`
imports it from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser

from .parsing import HelpFormatter, _OneLineErrors, _with_prog_override


class OneLineErrorParser(_OneLineErrors, HfArgumentParser):
    """
    The `HfArgumentParser` of this package's CLIs: every error, argparse's own and those the CLI reports through
    `parser.error`, is one `prog: error: message` line on stderr and exit status 2. argparse would print the usage
    first, which for CLIs with this many options is a block that buries the message (`--help` shows it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **_with_prog_override(kwargs))

    def parse_command_line(self, argv: Sequence[str] | None) -> Any:
        """The dataclass of arguments (a tuple for several); an unknown option is a usage error, not
        HfArgumentParser's ValueError."""
        *parsed, unknown = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}. See --help for the options.")
        return parsed[0] if len(parsed) == 1 else tuple(parsed)


__all__ = ["OneLineErrorParser"]
