"""`openflamingo`: one command for the main jobs, thin over the package's Python APIs.

    openflamingo generate                                   # the shipped model captions its bundled sample images
    openflamingo generate --model ./OpenFlamingo-3B-hf --image cat.jpg --image dog.jpg \\
        --prompt "<image>Output:a cat.<|endofchunk|><image>Output:"
    openflamingo releases [--json]                          # the five released models
    openflamingo convert ...                                # = openflamingo-convert ...
    openflamingo export ...                                 # = openflamingo-export ...
    openflamingo train ...                                  # = openflamingo-train ...
    openflamingo eval ...                                   # = openflamingo-eval ...
    openflamingo serve [--model PATH] [--port 8000]         # OpenAI-compatible API on 127.0.0.1

Every subcommand explains itself with `--help`; every usage problem is one `openflamingo <sub>: error: ...` line on
stderr and exit status 2. Importing this module is light: torch models, the processor and the release table are
imported by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .parsing import (
    OneLineArgumentParser,
    UsageError,
    check_hub_reachable,
    check_model_source,
    command_name,
    require_extra,
)
from ..cpu_threads import THREADS_HELP, set_cpu_threads

PROG = "openflamingo"


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands that are whole commands of their own: the rest of the command line goes to them unchanged.
# ----------------------------------------------------------------------------------------------------------------------


def _convert_main(argv: list[str]) -> int:
    from .convert import main

    return main(argv)


def _export_main(argv: list[str]) -> int:
    from .export import main

    return main(argv)


def _train_main(argv: list[str]) -> int:
    from .train import main

    return main(argv)


def _eval_main(argv: list[str]) -> int:
    from .eval import main

    return main(argv)


def _serve_main(argv: list[str]) -> int:
    from .serve import main

    return main(argv)


# name -> (one-line help, entry point taking the remaining argv)
PASSTHROUGH_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "convert": (
        "Convert an original OpenFlamingo checkpoint into a transformers model folder (= openflamingo-convert).",
        _convert_main,
    ),
    "export": (
        "Write a self-contained Hub folder of a model and its processor, optionally push it (= openflamingo-export).",
        _export_main,
    ),
    "train": ("Pretrain or fine-tune an OpenFlamingo model (= openflamingo-train).", _train_main),
    "eval": ("Few-shot evaluation on the paper's benchmarks, random or RICES demonstrations (= openflamingo-eval).",
             _eval_main),
    "serve": ("Serve a model with an OpenAI-compatible chat-completions API (transformers' server; default: the "
              "shipped model on 127.0.0.1:8000).", _serve_main),
}


# ----------------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------------

GENERATE_HELP = "Generate text from images and a prompt (default: the shipped model captions its sample images)."

GENERATE_DESCRIPTION = """\
Generate text from images and a prompt with an OpenFlamingo model, and print the answer: the generated text only,
without the prompt, cut at the first <|endofchunk|> (OpenFlamingo's end of answer), stripped of surrounding spaces.

The prompt interleaves images and text: one <image> marker per image, in the order of --image, where the image goes;
<|endofchunk|> ends the text that belongs to an image. A few-shot caption prompt for three images (two
demonstrations, then the query):

  "<image>Output:a cat.<|endofchunk|><image>Output:a dog.<|endofchunk|><image>Output:"

Defaults, so that the command runs out of the box:
  --model   the small model shipped with the package (trained on its own toy world of coloured shapes); with
            --video, its video variant (frame embeddings; captions clips of a moving shape, e.g. "one red circle
            moving left.").
  --image   the bundled sample images. With --prompt: the first N of them, N = the number of <image> markers
            (a prompt without a marker is text only).
  --prompt  few-shot captioning in the released models' format, "<image>Output:{caption}<|endofchunk|>" per
            demonstration and "<image>Output:" for the query (openflamingo_hf.embedded.default_caption_prompt):
            the bundled sample images with their captions are the demonstrations, and
            - without --image, the last sample image is the query;
            - with --image, each given image is the query in turn (the last sample image replaced by it), and one
              line "IMAGE: answer" is printed per image.

Videos: --video FILE (repeatable) fills the prompt's <video> markers in order (a video takes one media slot, its
frames sampled uniformly to --num_frames, default the processor's num_frames; a model without frame embeddings
needs --num_frames, the frames it flattens into one slot). Without --prompt each video is captioned alone.

Examples:
  openflamingo generate
  openflamingo generate --image my_shapes.png
  openflamingo generate --video clip.mp4
  openflamingo generate --model ./OpenFlamingo-3B-vitl-mpt1b-hf --image cat.jpg --image dog.jpg --image query.jpg \\
      --prompt "<image>Output:a cat.<|endofchunk|><image>Output:a dog.<|endofchunk|><image>Output:" --num_beams 3
"""


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("model and inputs")
    inputs.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="Model folder or Hub repo id that AutoModelForImageTextToText and AutoProcessor load (e.g. the output of "
        "openflamingo convert). Default: the model shipped with the package (with --video, its video variant).",
    )
    inputs.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="An image file; repeat for several, in the order of the prompt's <image> markers. Default: the bundled "
        "sample images.",
    )
    inputs.add_argument(
        "--video",
        action="append",
        metavar="PATH",
        help="A video file (read with PyAV, frames sampled uniformly); repeat for several. Each fills one <video> "
        "marker of --prompt, in order; without --prompt each video is captioned on its own.",
    )
    inputs.add_argument(
        "--num_frames", "--num-frames", type=int, metavar="N",
        help="Frames to sample per video (default: the model's processor's num_frames).",
    )
    inputs.add_argument(
        "--prompt",
        help='Text with one <image> marker per image, e.g. "<image>Output:". Default: a few-shot caption prompt '
        "(see above).",
    )
    inputs.add_argument(
        "--device",
        help="Where to run: cpu, cuda or cuda:N. Default: cuda if available, else cpu.",
    )
    inputs.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=20, metavar="N",
        help="Generate at most N tokens (default: 20).",
    )
    generation.add_argument(
        "--num_beams", "--num-beams", type=int, default=1, metavar="N",
        help="Beam search with N beams; 1 is greedy decoding (default: 1; the evaluation protocol uses 3).",
    )
    generation.add_argument(
        "--do_sample", "--do-sample", action="store_true",
        help="Sample instead of picking the most likely tokens (see --temperature, --top_p, --seed).",
    )
    generation.add_argument(
        "--temperature", type=float, metavar="T",
        help="With --do_sample: divide the logits by T (> 0; the model's generation config by default).",
    )
    generation.add_argument(
        "--top_p", "--top-p", type=float, metavar="P",
        help="With --do_sample: sample from the smallest set of tokens whose probability adds up to P (0 < P <= 1).",
    )
    generation.add_argument(
        "--seed", type=int, help="Seed the random generators (python, numpy, torch) for reproducible sampling."
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="Print only the answer: no progress messages or bars on stderr."
    )


def _check_generation_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    if args.num_beams < 1:
        raise UsageError(f"--num_beams must be at least 1, got {args.num_beams}.")
    for option, value in (("--temperature", args.temperature), ("--top_p", args.top_p)):
        if value is not None and not args.do_sample:
            raise UsageError(f"{option} only applies to sampling: add --do_sample.")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}.")
    for option, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths or []:
            if not os.path.exists(path):
                raise UsageError(f"{option} {path}: no such file.")
            if os.path.isdir(path):
                kind = "an image" if option == "--image" else "a video"
                raise UsageError(f"{option} {path} is a folder; give {kind} file.")
    for position, path in enumerate(args.image or [], start=1):
        _check_image_file(path, position)
    if args.num_frames is not None and args.num_frames < 1:
        raise UsageError(f"--num_frames must be at least 1, got {args.num_frames}.")
    if args.video:
        require_extra("video", ["av"], "--video (video files are read with PyAV)")


def _check_image_file(path: str, position: int) -> None:
    """The `position`-th --image must be an image file PIL can read: checked here, so that the message names the
    argument (the processor only knows the image's slot in the prompt it builds)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: truncated data fails here, not half-way through generation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(
            f"--image {path} (--image number {position}) is not a readable image file ({error}); give a PNG, JPEG, "
            "GIF, BMP or WebP file."
        ) from None


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {requested}: not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {requested}: only cpu and cuda are supported.")
    return requested


def _embedded():
    """The `openflamingo_hf.embedded` module, or a UsageError saying what to pass instead."""
    try:
        from .. import embedded
    except ImportError as error:
        raise UsageError(
            f"the model and sample images shipped with the package are missing ({error}); pass --model, --image and "
            "--prompt."
        ) from error
    return embedded


def _sample_image_paths() -> list[str]:
    try:
        samples = list(_embedded().sample_image_paths())
    except OSError as error:
        raise UsageError(f"the bundled sample images are missing ({error}); pass --image.") from error
    if not samples:
        raise UsageError("the package has no bundled sample images; pass --image.")
    return samples


def _check_generate_model(source: str, *, default: bool) -> None:
    """The shipped model folder when `default` (it must hold config.json), else `--model` as any command checks it:
    an existing model folder or a Hub repo id (`check_model_source`)."""
    from pathlib import Path

    if not default:
        check_model_source("--model", source)
        check_hub_reachable("--model", source)
    elif not (Path(source) / "config.json").is_file():
        missing = "has no config.json" if Path(source).is_dir() else "is missing"
        raise UsageError(f"the shipped model folder {source} {missing} (the package was installed without it); "
                         "pass --model.")


def _count_markers(processor: Any, prompt: str) -> int:
    count = getattr(processor, "_count_markers", None)  # ignores markers escaped as user text, like the processor
    return count(prompt) if callable(count) else prompt.count(processor.image_token)


def build_generation_inputs(
    processor: Any, images: list[str] | None, prompt: str | None
) -> tuple[list[list[str]], list[str], list[str] | None]:
    """
    The `(images per prompt, prompts, labels)` that `generate` runs, after the defaults (see `--help`): one row of
    image paths per prompt, and a label per row to print in front of its answer (`None`: one prompt, no label).
    """
    if prompt is not None:
        if images is None:
            samples = _sample_image_paths()
            num_markers = _count_markers(processor, prompt)
            if num_markers > len(samples):
                raise UsageError(
                    f"the prompt has {num_markers} <image> markers but only {len(samples)} sample images are bundled; "
                    "pass the images with --image."
                )
            images = samples[:num_markers]  # no marker: a text-only prompt, no image
        return [list(images)], [prompt], None

    samples = _sample_image_paths()
    try:
        caption_prompt = _embedded().default_caption_prompt(processor, len(samples))
    except OSError as error:
        raise UsageError(f"the captions of the bundled sample images are missing ({error}); pass --prompt.") from error
    if images is None:
        return [samples], [caption_prompt], None
    demonstrations = samples[:-1]
    return [demonstrations + [image] for image in images], [caption_prompt] * len(images), list(images)


def build_video_inputs(
    images: list[str] | None, videos: list[str], prompt: str | None
) -> tuple[list[list[str]] | None, list[str], list[str] | None, dict[str, Any]]:
    """
    With --video: `(images per prompt, prompts, labels, processor kwargs)`. With a prompt, one row holding the given
    images and videos (each at its marker); without, every video captioned alone (`<video>`), labelled by its path.
    """
    if prompt is not None:
        return ([list(images)] if images else None), [prompt], None, {"videos": [list(videos)]}
    if images:
        raise UsageError("--image with --video needs a --prompt that places them (<image> and <video> markers).")
    return None, ["<video>"] * len(videos), list(videos), {"videos": [[video] for video in videos]}


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """With `enabled`: no progress bars (loading, downloads) and no transformers warnings while it runs."""
    if not enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars, hub_bars_disabled = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_disabled:
            enable_progress_bars()


def run_generate(args: argparse.Namespace) -> int:
    """`openflamingo generate`: checks everything cheap first (arguments, model folder, processor, images, prompt),
    then loads the model (with a progress bar), generates and prints the answers. Raises `UsageError` for what the
    user must fix."""
    with _quiet(args.quiet):
        return _run_generate(args)


def _run_generate(args: argparse.Namespace) -> int:
    _check_generation_arguments(args)
    device = _resolve_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}.")
    set_cpu_threads(args.threads)
    default_model = args.model is None
    # The shipped default for videos is its video variant (frame embeddings, trained on the world's clips).
    shipped = _embedded().EMBEDDED_VIDEO_MODEL_DIR if args.video else _embedded().EMBEDDED_MODEL_DIR
    source = shipped if default_model else args.model
    _check_generate_model(str(source), default=default_model)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import register_auto_classes

    register_auto_classes()
    option = "the shipped model" if default_model else f"--model {source}"
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{option}: the processor could not be loaded ({type(error).__name__}: {error}).") from error
    for attribute in ("image_token", "post_process_generation"):
        if not hasattr(processor, attribute):
            raise UsageError(
                f"{option}: its processor is a {type(processor).__name__}, not an OpenFlamingoProcessor."
            )

    video_kwargs: dict[str, Any] = {}
    if args.video:
        rows, prompts, labels, video_kwargs = build_video_inputs(args.image, args.video, args.prompt)
        if args.num_frames is not None:
            video_kwargs["num_frames"] = args.num_frames
    else:
        rows, prompts, labels = build_generation_inputs(processor, args.image, args.prompt)
    try:
        inputs = processor(images=rows, text=prompts, padding=True, return_tensors="pt", **video_kwargs)
    except (ValueError, TypeError, OSError) as error:  # marker / image count, unreadable images: the message says
        raise UsageError(str(error)) from error

    _status(args, f"Loading {source} on {device} ...")
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto")
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{option}: the model could not be loaded ({type(error).__name__}: {error}).") from error
    model.to(device).eval()

    import torch

    generation_kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": args.do_sample,
    }
    if args.temperature is not None:
        generation_kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        generation_kwargs["top_p"] = args.top_p
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    num_images, num_videos = sum(len(row) for row in rows or []), len(args.video or [])
    media = f"{num_images} image{'s' if num_images != 1 else ''}" + (
        f", {num_videos} video{'s' if num_videos != 1 else ''}" if num_videos else ""
    )
    _status(
        args,
        f"Generating ({len(prompts)} prompt{'s' if len(prompts) > 1 else ''}, {media}, up to {args.max_new_tokens} "
        "new tokens) ...",
    )
    inputs = inputs.to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, **generation_kwargs)
    answers = processor.post_process_generation(output, inputs["input_ids"])
    for index, answer in enumerate(answers):
        print(answer.strip() if labels is None else f"{labels[index]}: {answer.strip()}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# releases
# ----------------------------------------------------------------------------------------------------------------------

RELEASES_HELP = "List the released OpenFlamingo models (names for openflamingo convert --release)."

RELEASES_DESCRIPTION = """\
List the five released OpenFlamingo v2 models: the language model each was built on, how often a gated
cross-attention block sits between its decoder layers, and the published 4-shot COCO captioning CIDEr and VQAv2
accuracy. Convert one into a transformers folder with:

  openflamingo convert --release NAME --output DIR
"""


def release_rows() -> list[dict[str, Any]]:
    """One dict per release, as `openflamingo releases --json` prints them (from the release data alone)."""
    from ..release_data import release_rows as rows

    return rows()


def format_release_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("Release", lambda r: r["name"]),
        ("Language model", lambda r: r["language_model"]),
        ("xattn every", lambda r: str(r["cross_attn_every_n_layers"])),
        ("COCO CIDEr 4-shot", lambda r: f"{r['coco_cider_4shot']:.1f}"),
        ("VQAv2 acc. 4-shot", lambda r: f"{r['vqav2_accuracy_4shot']:.1f}"),
    ]
    cells = [[header for header, _ in columns]] + [[value(row) for _, value in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [False, False, True, True, True]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)).rstrip()

    header, *body = cells
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(values) for values in body)])


def run_releases(args: argparse.Namespace) -> int:
    rows = release_rows()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        print(format_release_table(rows))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------

DESCRIPTION = """\
OpenFlamingo, a Flamingo-style vision-language model, as a Hugging Face transformers model.

Run `openflamingo generate` to see the shipped model caption its sample images, and `openflamingo <command> --help`
for what each command does and its options.
"""


def build_parser() -> OneLineArgumentParser:
    from .. import __version__

    parser = OneLineArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="<command>")

    generate = commands.add_parser("generate", help=GENERATE_HELP, description=GENERATE_DESCRIPTION)
    _add_generate_arguments(generate)
    generate.set_defaults(run=run_generate, parser=generate)

    releases = commands.add_parser("releases", help=RELEASES_HELP, description=RELEASES_DESCRIPTION)
    releases.add_argument("--json", action="store_true", help="Print the releases as JSON (all fields).")
    releases.set_defaults(run=run_releases, parser=releases)

    # Listed for --help and the "invalid choice" message; `main` hands their command lines over before parsing.
    for name, (help_text, _) in PASSTHROUGH_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `openflamingo`: 0 on success. A usage problem is one `openflamingo [<command>]: error: ...` line
    on stderr and exit status 2 (`SystemExit`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH_COMMANDS:
        name = argv[0]
        with command_name(f"{PROG} {name}"):
            return PASSTHROUGH_COMMANDS[name][1](argv[1:])

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand's parser, not argparse's top-level one
        getattr(args, "parser", parser).error(
            f"unrecognized arguments: {' '.join(unknown)}. See {getattr(args, 'parser', parser).prog} --help."
        )
    if args.command is None:
        parser.error(
            f"no command given: choose one of {', '.join(['generate', 'releases', *PASSTHROUGH_COMMANDS])}. "
            f"See {PROG} --help."
        )
    try:
        return args.run(args)
    except UsageError as error:
        args.parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "build_generation_inputs",
    "build_parser",
    "build_video_inputs",
    "format_release_table",
    "main",
    "release_rows",
]
