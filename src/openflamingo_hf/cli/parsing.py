"""Argument parsers of this package's commands: every error is one `prog: error: message` line and exit status 2.

argparse would print the usage first, which for commands with this many options is a block that buries the message
(`--help` shows it). `OneLineErrorParser` (in `dataclass_parser`, importable from here) is the `HfArgumentParser`
(dataclass) flavour used by `openflamingo-convert`, `-export`, `-train` and `-eval`; `OneLineArgumentParser` is the plain argparse flavour used by the
`openflamingo` command itself. `command_name` lets `openflamingo convert ...` run the `openflamingo-convert` code
with its messages naming `openflamingo convert`.

The checks every command shares are here too: `check_model_source` (a model folder or a reachable Hub id),
`parse_config_overrides` (a JSON object of OpenFlamingoConfig fields) and `require_extra`. Importing this module loads
no torch: `--help` and argument errors are answered in about a second.
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The `--help` layout of every command: descriptions keep their own line breaks (examples, lists), and an
    option's default is appended when its help text does not mention one."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(_terminal_width(), 118))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns - 2
    except OSError:
        return 118


class OneLineArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    """A plain `argparse.ArgumentParser` whose errors are one `prog: error: message` line with exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **_with_prog_override(kwargs))


def __getattr__(name: str) -> Any:
    # `OneLineErrorParser` subclasses transformers' `HfArgumentParser`, and importing transformers takes over a second,
    # which `openflamingo --help` and the errors of its own subcommands do without: it is imported when first used.
    if name == "OneLineErrorParser":
        from .dataclass_parser import OneLineErrorParser

        return OneLineErrorParser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(ValueError):
    """The arguments do not describe a run that can be done: the command reports it as one `prog: error:` line and
    exits with status 2."""


def check_model_source(option: str, source: str, *, needs_config: bool = True) -> None:
    """
    `source` of `option` (e.g. `--model_name_or_path`) is a local folder that exists (holding config.json when
    `needs_config`), or at least looks like a Hub repo id (org/name), so that a mistyped path fails at once, not
    after a model download attempt. Raises `UsageError` saying which. Whether a Hub id can be downloaded is
    `check_hub_reachable`, which the commands call after their other checks.
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


# Files one of which a cached Hub repo of a model, a tokenizer or a processor holds.
_CACHE_MARKERS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def check_hub_reachable(option: str, source: str) -> None:
    """
    When `source` is a Hub id (not a local folder) that is not in the local Hugging Face cache, one quick request to
    the Hub says whether it can be downloaded: a refused or timed-out connection, an unknown repository or offline
    mode (`HF_HUB_OFFLINE=1`) is a `UsageError` at once. Without this check, loading retries the download for
    minutes, printing a warning per attempt, before it fails.
    """
    if os.path.isdir(source):
        return
    from huggingface_hub import HfApi, constants, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if any(isinstance(try_to_load_from_cache(source, name), str) for name in _CACHE_MARKERS):
        return
    if is_offline_mode():
        raise UsageError(
            f"{option} {source} is not in the local Hugging Face cache, and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) "
            "is set. Download it while online (hf download REPO_ID) or pass a local folder."
        )
    try:
        HfApi().model_info(source, timeout=10)
    except GatedRepoError:
        return  # it exists; loading reports the access problem (log in with `hf auth login`)
    except RepositoryNotFoundError:
        raise UsageError(
            f"{option} {source}: no such repository on the Hub ({constants.ENDPOINT}), or it is private: check the id, "
            "or log in with `hf auth login`."
        ) from None
    except HfHubHTTPError:
        return  # the Hub answered; loading reports what it says
    except Exception as error:  # connection refused, DNS, timeout: raised by the HTTP client, whose module (httpx,
        # httpx2, ...) depends on the huggingface_hub version
        raise UsageError(
            f"{option} {source} is not in the local Hugging Face cache and the Hub ({constants.ENDPOINT}) cannot be "
            f"reached ({type(error).__name__}: {' '.join(str(error).split())[:200]}). Connect to the network, or "
            "download it elsewhere and pass its folder."
        ) from None


# OpenFlamingoConfig fields that the commands set themselves from the files they read, so an override of them would
# be overwritten or would contradict those files: field -> where its value comes from.
DERIVED_CONFIG_FIELDS = {
    "vision_config": "the vision model's config",
    "text_config": "the language model's config",
    "media_token_id": "the tokenizer (<image>)",
    "eoc_token_id": "the tokenizer (<|endofchunk|>)",
    "tie_word_embeddings": "the language model's config",
}


def overridable_config_fields() -> list[str]:
    """The fields OpenFlamingoConfig declares itself (not PreTrainedConfig's bookkeeping) that overrides may set."""
    import dataclasses

    from transformers import PreTrainedConfig

    from ..modeling.configuration_openflamingo import OpenFlamingoConfig

    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [
        f.name
        for f in dataclasses.fields(OpenFlamingoConfig)
        if f.name not in inherited and f.name not in DERIVED_CONFIG_FIELDS
    ]


def parse_config_overrides(text: str | None, option: str) -> dict[str, Any]:
    """
    The JSON object of `option` (`--config-overrides`, `--config_overrides`), checked: valid JSON, only fields of
    OpenFlamingoConfig that the command does not set itself, and values of the right types (a misspelled field would
    otherwise be stored and ignored). Raises `UsageError` naming what is wrong.
    """
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{option} is not valid JSON ({error.msg} at character {error.pos} of {text!r}). Give a JSON object, e.g. "
            '\'{"perceiver_num_heads": 8}\'.'
        ) from error
    if not isinstance(overrides, dict):
        raise UsageError(f"{option} must be a JSON object of OpenFlamingoConfig fields, got {text!r}.")
    valid = overridable_config_fields()
    problems = [problem for problem in (_override_key_problem(key, valid) for key in overrides) if problem]
    if problems:
        raise UsageError(
            f"{option} has unknown OpenFlamingoConfig fields or fields the command sets itself: {'; '.join(problems)}. "
            f"Fields that can be set: {', '.join(valid)}."
        )
    from huggingface_hub.errors import StrictDataclassError

    from ..modeling.configuration_openflamingo import OpenFlamingoConfig

    try:  # type and value checks of the strict config, on a throwaway config (default sub-configs are cheap)
        OpenFlamingoConfig(**overrides)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise UsageError(f"{option} {text!r}: {error}") from error
    return overrides


def _override_key_problem(key: str, valid: list[str]) -> str | None:
    """Why `key` cannot be overridden, with the closest valid field name; `None` if it can."""
    if key in valid:
        return None
    if key in DERIVED_CONFIG_FIELDS:
        return f"{key!r} cannot be overridden, it is taken from {DERIVED_CONFIG_FIELDS[key]}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key!r} is not a field of OpenFlamingoConfig{hint}"


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


__all__ = [
    "DERIVED_CONFIG_FIELDS",
    "HelpFormatter",
    "OneLineArgumentParser",
    "OneLineErrorParser",
    "UsageError",
    "check_hub_reachable",
    "check_model_source",
    "command_name",
    "overridable_config_fields",
    "parse_config_overrides",
    "require_extra",
]
