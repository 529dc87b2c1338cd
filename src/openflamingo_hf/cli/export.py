"""`openflamingo-export` (also `openflamingo export`): write a self-contained Hub folder of a model, optionally push it.

    openflamingo-export --model ./OpenFlamingo-9B-hf --output ./OpenFlamingo-9B-hub            # remote-code folder
    openflamingo-export --model ./OpenFlamingo-9B-hf --output ./plain --no-remote-code         # needs openflamingo_hf

The folder and its upload are `openflamingo_hf.hub.export_for_hub` and `push_export_to_hub`; this module reads the
command line, checks it before the model is loaded, and reports every problem as one
`openflamingo-export: error: ...` line with exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parsing import OneLineErrorParser, UsageError, check_hub_reachable, check_model_source

PROG = "openflamingo-export"


@dataclass
class ExportArguments:
    """Arguments of `openflamingo-export`."""

    model: str = field(
        metadata={
            "help": "Folder or Hub id of an OpenFlamingo model in transformers format (e.g. the output of "
            "openflamingo-convert); loaded with AutoModelForImageTextToText in its saved dtype."
        }
    )
    output: str = field(metadata={"help": "Folder to write the Hub folder to (must not exist or be empty)."})
    processor: str | None = field(
        default=None, metadata={"help": "Folder or Hub id of the processor, if it is not saved with the model."}
    )
    remote_code: bool = field(
        default=True,
        metadata={
            "help": "Ship the model code and auto_map so the folder loads with trust_remote_code=True where "
            "openflamingo_hf is not installed. --no-remote-code writes a plain save_pretrained folder instead."
        },
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors file, e.g. 5GB or 500MB."})
    overwrite: bool = field(default=False, metadata={"help": "Replace everything in a non-empty output folder."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "After exporting, upload the folder to this Hub repository (org/name)."}
    )
    private: bool = field(default=False, metadata={"help": "With --push-to-hub: create the repository private."})


def build_parser() -> OneLineErrorParser:
    return OneLineErrorParser(
        ExportArguments,
        prog=PROG,
        description="Load an OpenFlamingo model and its processor, write a Hub folder, optionally push it.",
    )


def check_arguments(args: ExportArguments) -> None:
    """Everything that can be checked before the model is loaded: the sources, then the output folder."""
    from ..hub import ExportError, check_output_dir

    check_model_source("--model", args.model, needs_config=True)
    if args.processor:
        check_model_source("--processor", args.processor, needs_config=False)
    try:
        check_output_dir(Path(args.output), args.overwrite)
    except ExportError as error:
        raise UsageError(str(error)) from None
    check_hub_reachable("--model", args.model)
    if args.processor:
        check_hub_reachable("--processor", args.processor)


def load_model_and_processor(args: ExportArguments) -> tuple[Any, Any]:
    """The model (in its saved dtype) and its processor; a source that cannot be loaded is a `UsageError`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import register_auto_classes

    register_auto_classes()
    option, source = "--model", args.model
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto")
        option, source = ("--processor", args.processor) if args.processor else (option, source)
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:  # missing files, unknown model type, Hub errors: the message says which
        raise UsageError(f"{option} {source} could not be loaded ({type(error).__name__}: {error}).") from error
    return model, processor


def export(args: ExportArguments) -> Path:
    """Checks `args`, loads the model and processor, writes the folder (see `export_for_hub`) and pushes it when
    asked; prints what was written. Raises `UsageError` for what the user must fix."""
    from ..hub import ExportError, export_for_hub, push_export_to_hub

    check_arguments(args)
    model, processor = load_model_and_processor(args)
    try:
        folder = export_for_hub(
            model,
            processor,
            args.output,
            remote_code=args.remote_code,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except ExportError as error:
        raise UsageError(str(error)) from None
    print(f"Wrote {folder} ({'remote code' if args.remote_code else 'plain'}):")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name}")
    if args.push_to_hub:
        info = push_export_to_hub(folder, args.push_to_hub, private=args.private or None)
        print(f"Pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return folder


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `openflamingo-export`: 0 on success. A problem with the arguments or the export is one
    `openflamingo-export: error: ...` line on stderr and exit status 2; the arguments are checked before the model
    is loaded.
    """
    parser = build_parser()
    args = parser.parse_command_line(argv)
    try:
        export(args)
    except UsageError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExportArguments", "build_parser", "check_arguments", "export", "load_model_and_processor", "main"]
