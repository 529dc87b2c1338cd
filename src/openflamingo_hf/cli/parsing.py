"""Argument parsers of this package's commands: every error is one `prog: error: message` line and exit status 2.

argparse would print the usage first, which for commands with this many options is a block that buries the message
(`--help` shows it). `OneLineErrorParser` is the `HfArgumentParser` (dataclass) flavour used by `openflamingo-convert`,
`openflamingo-export` and `openflamingo-train`; `OneLineArgumentParser` is the plain argparse flavour used by the
`openflamingo` command itself. `command_name` lets `openflamingo convert ...` run the `openflamingo-convert` code
with its messages naming `openflamingo convert`.
"""

from __future__ import annotations

import argparse
import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from transformers import HfArgumentParser

# The program name to use instead of the one a command passes to its parser, while `command_name` is active.
_PROG_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("openflamingo_prog", default=None)


@contextmanager
def command_name(prog: str) -> Iterator[None]:
    """Within this context, parsers of this module are named `prog` (in usage, `--help` and error lines)."""
    token = _PROG_OVERRIDE.set(prog)
    try:
        yield
    finally:
        _PROG_OVERRIDE.reset(token)


def _with_prog_override(kwargs: dict[str, Any]) -> dict[str, Any]:
    prog = _PROG_OVERRIDE.get()
    return {**kwargs, "prog": prog} if prog is not None else kwargs


class _OneLineErrors:
    def error(self, message: str) -> NoReturn:
        # Collapsed to one line: messages quoting exceptions (strict-dataclass errors, key lists) span several.
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


class OneLineArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    """A plain `argparse.ArgumentParser` whose errors are one `prog: error: message` line with exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_with_prog_override(kwargs))


class OneLineErrorParser(_OneLineErrors, HfArgumentParser):
    """
    The `HfArgumentParser` of this package's CLIs: every error, argparse's own and those the CLI reports through
    `parser.error`, is one `prog: error: message` line on stderr and exit status 2. argparse would print the usage
    first, which for CLIs with this many options is a block that buries the message (`--help` shows it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_with_prog_override(kwargs))

    def parse_command_line(self, argv: Sequence[str] | None) -> Any:
        """The dataclass of arguments (a tuple for several); an unknown option is a usage error, not
        HfArgumentParser's ValueError."""
        *parsed, unknown = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}. See --help for the options.")
        return parsed[0] if len(parsed) == 1 else tuple(parsed)


class UsageError(ValueError):
    """The arguments do not describe a run that can be done: the command reports it as one `prog: error:` line and
    exits with status 2."""


def check_model_source(option: str, source: str, *, needs_config: bool = True) -> None:
    """
    `source` of `option` (e.g. `--model_name_or_path`) is a local folder that exists (holding config.json when
    `needs_config`), or at least looks like a Hub repo id (org/name), so that a mistyped path fails at once, not
    after a model download attempt. Raises `UsageError` saying which.
    """
    from pathlib import Path

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(source)
    if path.is_dir():
        if needs_config and not (path / "config.json").is_file():
            raise UsageError(
                f"{option} {source} has no config.json, so it is not a transformers model folder. Give the output "
                "folder of openflamingo-convert, -train or save_pretrained, or a Hub repo id."
            )
        return
    if path.exists():
        raise UsageError(f"{option} {source} is a file; give a model folder or a Hub repo id (org/name).")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise UsageError(f"{option} {source}: no such folder, and not a Hub repo id (org/name) either.") from None


def require_extra(extra: str, modules: Sequence[str], needed_by: str) -> None:
    """Raises `UsageError` naming the extra to install when one of `modules` is not importable, so that a command
    stops before any model or data work, not in a traceback half-way through."""
    from importlib.util import find_spec

    missing = [module for module in modules if find_spec(module) is None]
    if missing:
        raise UsageError(
            f"{needed_by} needs {', '.join(missing)} (not installed), from the '{extra}' extra: pip install "
            f"'openflamingo-hf[{extra}]' (in a clone: pip install '.[{extra}]')."
        )


__all__ = ["OneLineArgumentParser", "OneLineErrorParser", "UsageError", "check_model_source", "command_name",
           "require_extra"]
