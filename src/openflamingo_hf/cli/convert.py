"""`openflamingo-convert` (also `openflamingo convert`): an original OpenFlamingo checkpoint to a transformers folder.

    openflamingo-convert --release OpenFlamingo-9B-vitl-mpt7b --output ./OpenFlamingo-9B-hf
    openflamingo-convert --checkpoint checkpoint.pt --language-model anas-awadalla/mpt-7b \\
        --vision-model openai/clip-vit-large-patch14 --output ./converted

The conversion is `openflamingo_hf.convert.release_conversion.convert_checkpoint`; this module reads the command line,
checks everything that needs no model before anything is loaded, and reports every problem as one
`openflamingo-convert: error: ...` line with exit status 2.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..releases import RELEASES
from .parsing import OneLineErrorParser, UsageError, parse_config_overrides

PROG = "openflamingo-convert"
# The dtypes the weights can be saved in (`release_conversion.DTYPES` maps them to torch dtypes).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _release_table() -> str:
    lines = ["Releases (--release NAME):"]
    for r in RELEASES.values():
        lines.append(
            f"  {r.name}\n"
            f"      checkpoint {r.checkpoint_repo}/{r.checkpoint_file}; language model and tokenizer "
            f"{r.language_model}; vision {r.vision_model}; cross-attention every {r.cross_attn_every_n_layers} "
            f"layer(s); COCO 4-shot CIDEr {r.coco_cider_4shot}, VQAv2 4-shot accuracy {r.vqav2_accuracy_4shot}"
        )
    return "\n".join(lines)


@dataclass
class ConvertArguments:
    """Arguments of `openflamingo-convert`. Give `--release`, or `--checkpoint` with the backbones, or both."""

    output: str = field(
        metadata={"help": "Folder to write the converted model, processor, generation config and model card to."}
    )
    release: str | None = field(
        default=None,
        metadata={
            "help": "Name of a released model (listed below). Sets the architecture and, unless given explicitly, "
            "downloads openflamingo/<NAME>/checkpoint.pt, the language model, tokenizer and vision tower from the "
            "Hugging Face Hub (needs network access).",
            "choices": list(RELEASES),
        },
    )
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Local original checkpoint (.pt, read with torch.load(weights_only=True); or .safetensors): a "
            "released trainable-only checkpoint.pt or a full state dict (flat or under 'model_state_dict'). "
            "Overrides the release's download."
        },
    )
    language_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the language model the checkpoint was trained on (loaded with "
            "AutoModelForCausalLM). Its weights complete a trainable-only checkpoint; its config is the text config."
        },
    )
    vision_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the CLIP vision tower (a CLIPVisionModel, or a full CLIP model whose "
            "vision tower is used). Default for releases: openai/clip-vit-large-patch14."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the tokenizer (default: the language model's). OpenFlamingo's tokens "
            "are added the way the original did, so their ids match the checkpoint's embedding rows."
        },
    )
    image_processor: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the image processor. Default: the vision model's own, if it has one "
            "(local mode), else OpenAI CLIP preprocessing at 224 px (what every release used)."
        },
    )
    cross_attn_every_n_layers: int | None = field(
        default=None,
        metadata={
            "help": "A gated cross-attention block before every N-th decoder layer. Default: the release's value, "
            "or inferred from the checkpoint's gated-block indices."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of OpenFlamingoConfig fields to set, for checkpoints with non-default sizes, e.g. "
            '\'{"perceiver_num_heads": 8, "cross_attn_head_dim": 64}\'. Perceiver depth, number of latents and '
            "frame / media-time embeddings are read from the checkpoint."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the saved weights.", "choices": list(DTYPE_NAMES)},
    )
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Largest safetensors shard written by save_pretrained (e.g. '2GB')."}
    )
    report: str | None = field(
        default=None,
        metadata={"help": "Write a JSON report (target weight -> source keys, and skipped source entries) here."},
    )
    local_files_only: bool = field(
        default=False, metadata={"help": "Never download: use only local files and the Hugging Face cache."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Write into --output even if it is not empty."})


def build_parser() -> OneLineErrorParser:
    return OneLineErrorParser(
        ConvertArguments,
        prog=PROG,
        description=textwrap.dedent(
            """\
            Convert an original OpenFlamingo checkpoint (open_flamingo v2) into a Hugging Face transformers model
            folder (OpenFlamingoForConditionalGeneration + OpenFlamingoProcessor).

            A released checkpoint.pt holds only the trained weights (Perceiver, gated cross-attention, embeddings);
            the language model and the vision tower are loaded from their own repos and merged in. Every weight of
            the checkpoint must find its place and every weight of the model must be filled, else the conversion
            stops and names the offending keys. The Perceiver's and the gated blocks' head counts and feed-forward
            widths are read from the checkpoint's shapes (the head width stays 64 unless overridden).

            Examples:
              openflamingo-convert --release OpenFlamingo-3B-vitl-mpt1b --output ./OpenFlamingo-3B-vitl-mpt1b-hf
              openflamingo-convert --release OpenFlamingo-9B-vitl-mpt7b --checkpoint ./checkpoint.pt --output ./out
              openflamingo-convert --checkpoint ./checkpoint.pt --language-model ./my-lm \\
                  --vision-model openai/clip-vit-large-patch14 --tokenizer ./my-lm --output ./out
            """
        ),
        epilog=_release_table(),
    )


def check_arguments(args: ConvertArguments) -> None:
    """
    Everything about the arguments that can be checked without loading anything, so that a mistake fails in a
    second instead of after the backbones are loaded: which sources are given, the overrides, that --output and
    --report can be written, and the checkpoint file.
    """
    from ..hub import ExportError, check_output_dir

    if args.release is None and not (args.checkpoint and args.language_model and args.vision_model):
        raise UsageError(
            "Give --release NAME, or a local conversion with --checkpoint FILE --language-model PATH_OR_ID "
            "--vision-model PATH_OR_ID (and optionally --tokenizer). See --help for the releases."
        )
    parse_config_overrides(args.config_overrides, "--config-overrides")
    try:
        check_output_dir(Path(args.output), args.overwrite)
    except ExportError as error:
        raise UsageError(f"--output: {error}") from error  # the message names the folder
    if args.report:
        _check_report_path(Path(args.report))
    if args.checkpoint:
        from ..convert.release_conversion import ConversionInputError, check_checkpoint_file

        try:
            check_checkpoint_file(args.checkpoint)
        except ConversionInputError as error:
            raise UsageError(f"--checkpoint {error}") from error


def _check_report_path(report: Path) -> None:
    from ..hub import unwritable_location

    if report.is_dir():
        raise UsageError(f"--report {report} is a folder; give the path of a JSON file to write.")
    problem = unwritable_location(report)
    if problem is None and report.exists() and not os.access(report, os.W_OK):
        problem = f"the file {report} is not writable"
    if problem:
        raise UsageError(f"--report {report} cannot be written: {problem}. Choose another path.")


def conversion_settings(args: ConvertArguments):
    """The library's `ConversionSettings` of the command line (the overrides parsed)."""
    from ..convert.release_conversion import ConversionSettings

    return ConversionSettings(
        output=args.output,
        release=args.release,
        checkpoint=args.checkpoint,
        language_model=args.language_model,
        vision_model=args.vision_model,
        tokenizer=args.tokenizer,
        image_processor=args.image_processor,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        config_overrides=parse_config_overrides(args.config_overrides, "--config-overrides"),
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        report=args.report,
        local_files_only=args.local_files_only,
        overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `openflamingo-convert`. Returns 0 on success; every error (bad arguments or input files, a
    checkpoint whose keys do not fit the architecture, an output that cannot be written) is one
    `openflamingo-convert: error: ...` line and exit status 2.
    """
    parser = build_parser()
    args = parser.parse_command_line(argv)
    try:
        check_arguments(args)
        from .. import register_auto_classes
        from ..convert import ConversionError, ConversionInputError, convert_checkpoint
        from ..hub import ExportError

        register_auto_classes()  # a MosaicGPT language model folder loads through AutoConfig
        try:
            convert_checkpoint(conversion_settings(args))
        except (ConversionInputError, ConversionError, ExportError) as error:
            raise UsageError(str(error)) from error
    except UsageError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ConvertArguments", "build_parser", "check_arguments", "conversion_settings", "main"]
