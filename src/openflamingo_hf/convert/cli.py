"""`openflamingo-convert`: turn an original OpenFlamingo checkpoint into a transformers model folder.

    openflamingo-convert --release OpenFlamingo-9B-vitl-mpt7b --output ./OpenFlamingo-9B-hf
    openflamingo-convert --checkpoint checkpoint.pt --language-model anas-awadalla/mpt-7b \
        --vision-model openai/clip-vit-large-patch14 --output ./converted

The folder holds sharded safetensors, `config.json`, the processor (tokenizer with `<|endofchunk|>`, `<image>` and
`<PAD>` at the ids the checkpoint was trained with, CLIP image processor, chat template), `generation_config.json`
(stops at `<|endofchunk|>`) and a model card; it loads with `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` once `openflamingo_hf` is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import pickle
import re
import sys
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

from ..cli.parsing import OneLineErrorParser
from ..hub import ExportError, check_output_dir, staged_output_dir, unwritable_location
from ..modeling.configuration_openflamingo import OpenFlamingoConfig
from ..modeling.modeling_mosaic_gpt import MosaicGPTForCausalLM
from ..modeling.modeling_openflamingo import (
    OpenFlamingoForConditionalGeneration,
    _load_vision_tower,
    _vision_tower_config,
    openflamingo_generation_config,
)
from ..processing.processing_openflamingo import OpenFlamingoProcessor, default_image_processor
from ..releases import (
    RELEASE_EOC_TOKEN_ID,
    RELEASE_MEDIA_TOKEN_ID,
    RELEASES,
    OpenFlamingoRelease,
    get_release,
    get_release_config,
)
from .convert_original import (
    ConversionError,
    ConversionReport,
    base_state_dict_from_backbones,
    convert_original_state_dict,
    infer_cross_attn_every_n_layers,
    normalize_original_key,
    original_input_embedding_key,
    unwrap_checkpoint,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        metadata={"help": "dtype of the saved weights.", "choices": list(DTYPES)},
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> OneLineErrorParser:
    return OneLineErrorParser(
        ConvertArguments,
        prog="openflamingo-convert",
        description=textwrap.dedent(
            """\
            Convert an original OpenFlamingo checkpoint (open_flamingo v2) into a Hugging Face transformers model
            folder (OpenFlamingoForConditionalGeneration + OpenFlamingoProcessor).

            A released checkpoint.pt holds only the trained weights (Perceiver, gated cross-attention, embeddings);
            the language model and the vision tower are loaded from their own repos and merged in. Every weight of
            the checkpoint must find its place and every weight of the model must be filled, else the conversion
            stops and names the offending keys.

            Examples:
              openflamingo-convert --release OpenFlamingo-3B-vitl-mpt1b --output ./OpenFlamingo-3B-vitl-mpt1b-hf
              openflamingo-convert --release OpenFlamingo-9B-vitl-mpt7b --checkpoint ./checkpoint.pt --output ./out
              openflamingo-convert --checkpoint ./checkpoint.pt --language-model ./my-lm \\
                  --vision-model openai/clip-vit-large-patch14 --tokenizer ./my-lm --output ./out
            """
        ),
        epilog=_release_table(),
        formatter_class=_HelpFormatter,
    )


class UsageError(ValueError):
    """The arguments do not describe a conversion that can be done (exit status 2, through `parser.error`)."""


# OpenFlamingoConfig fields that the converter sets itself, so an override of them would be overwritten or would
# contradict the files it reads: field -> where its value comes from.
DERIVED_CONFIG_FIELDS = {
    "vision_config": "the config of --vision-model",
    "text_config": "the config of --language-model",
    "media_token_id": "the tokenizer (<image>)",
    "eoc_token_id": "the tokenizer (<|endofchunk|>)",
    "tie_word_embeddings": "the language model's config",
}


def overridable_config_fields() -> list[str]:
    """The fields OpenFlamingoConfig declares itself (not PreTrainedConfig's bookkeeping) that --config-overrides may set."""
    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [
        f.name
        for f in dataclasses.fields(OpenFlamingoConfig)
        if f.name not in inherited and f.name not in DERIVED_CONFIG_FIELDS
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def _download_checkpoint(release: OpenFlamingoRelease, local_files_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(release.checkpoint_repo, release.checkpoint_file, local_files_only=local_files_only)
    except Exception as error:  # network, auth or cache miss: say what to do instead
        raise UsageError(
            f"Could not get {release.checkpoint_repo}/{release.checkpoint_file} ({type(error).__name__}: {error}). "
            "Download it yourself and pass --checkpoint PATH."
        ) from error


def check_checkpoint_file(path: str) -> str:
    """
    Cheap checks that `path` is a whole checkpoint file, before anything is loaded; returns its format: "safetensors"
    (header and data sizes are validated), "torch-zip" (the zip directory at its end must be readable, so a truncated
    download fails here) or "torch-legacy" (torch.save's old pickle or tar format: only recognised here, checked when
    it is read). The format is recognised from the content, not the file name.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file.")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UsageError(f"{path} is empty; download or save the checkpoint again.")
    if head.startswith(b"PK\x03\x04"):  # torch.save's default (zip) format
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as error:
            raise UsageError(f"{path} is truncated or corrupt ({error}); download or save it again.") from error
        return "torch-zip"
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt"):  # checks that the header's tensors cover the file exactly
                pass
        except Exception as error:  # SafetensorError is not exported under a stable name
            raise UsageError(f"{path} is truncated or corrupt ({error}); download or save it again.") from error
        return "safetensors"
    if head.startswith(b"\x80") or tarfile.is_tarfile(path):  # a pickle stream (protocol 2+), or the oldest format
        return "torch-legacy"
    raise UsageError(
        f"{path} is not a checkpoint (neither safetensors nor a torch.save file; it starts with {head!r}). If it was "
        "downloaded, it may be an error page: download it again."
    )


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """
    Reads an original checkpoint: safetensors, or a torch.save file read with `torch.load(weights_only=True)`. Any
    failure to read is a `UsageError` naming the file.
    """
    file_format = check_checkpoint_file(path)
    try:
        if file_format == "safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a damaged file as OSError, RuntimeError, KeyError, EOFError, ...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise UsageError(
                f"Could not read {path} with torch.load(weights_only=True): it holds pickled objects other than "
                f"tensors and plain containers ({refused.group(1)}), which are refused. Load it yourself in a trusted "
                "environment and save its state dict with torch.save(state_dict, path)."
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {first_line}); download or save it again."
        ) from error


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint file; a file that holds no state dict is a `UsageError` too."""
    try:
        state_dict, _ = unwrap_checkpoint(load_checkpoint(path))
    except ConversionError as error:
        raise UsageError(f"{path}: {error}") from error
    return state_dict


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """
    The `--config-overrides` JSON object, checked: valid JSON, only fields of OpenFlamingoConfig that the converter
    does not set itself, and values of the right types (a misspelled field would otherwise be stored and ignored).
    """
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"--config-overrides is not valid JSON ({error.msg} at character {error.pos} of {text!r}). Give a JSON "
            'object, e.g. \'{"perceiver_num_heads": 8}\'.'
        ) from error
    if not isinstance(overrides, dict):
        raise UsageError(f"--config-overrides must be a JSON object of OpenFlamingoConfig fields, got {text!r}.")
    problems = [_override_key_problem(key) for key in overrides]
    problems = [problem for problem in problems if problem]
    if problems:
        raise UsageError(
            f"--config-overrides: {'; '.join(problems)}. Fields that can be set: "
            f"{', '.join(overridable_config_fields())}."
        )
    try:  # type and value checks of the strict config, on a throwaway config (default sub-configs are cheap)
        OpenFlamingoConfig(**overrides)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise UsageError(f"--config-overrides {text!r}: {error}") from error
    return overrides


def _override_key_problem(key: str) -> str | None:
    """Why `key` cannot be overridden, with the closest valid field name; `None` if it can."""
    valid = overridable_config_fields()
    if key in valid:
        return None
    if key in DERIVED_CONFIG_FIELDS:
        return f"{key!r} cannot be overridden, it is taken from {DERIVED_CONFIG_FIELDS[key]}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key!r} is not a field of OpenFlamingoConfig{hint}"


def check_arguments(args: ConvertArguments) -> None:
    """
    Everything about the arguments that can be checked without loading anything, so that a mistake fails in a
    second instead of after the backbones are loaded: which sources are given, the overrides, the checkpoint file,
    and that --output and --report can be written.
    """
    if args.release is None and not (args.checkpoint and args.language_model and args.vision_model):
        raise UsageError(
            "Give --release NAME, or a local conversion with --checkpoint FILE --language-model PATH_OR_ID "
            "--vision-model PATH_OR_ID (and optionally --tokenizer). See --help for the releases."
        )
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}.")
    parse_config_overrides(args.config_overrides)
    try:
        check_output_dir(Path(args.output), args.overwrite)
    except ExportError as error:
        raise UsageError(f"--output: {error}") from error  # the message names the folder
    if args.report:
        _check_report_path(Path(args.report))
    if args.checkpoint:
        try:
            check_checkpoint_file(args.checkpoint)
        except UsageError as error:
            raise UsageError(f"--checkpoint {error}") from error


def _check_report_path(report: Path) -> None:
    if report.is_dir():
        raise UsageError(f"--report {report} is a folder; give the path of a JSON file to write.")
    problem = unwritable_location(report)
    if problem is None and report.exists() and not os.access(report, os.W_OK):
        problem = f"the file {report} is not writable"
    if problem:
        raise UsageError(f"--report {report} cannot be written: {problem}. Choose another path.")


def _infer_perceiver_fields(state_dict: dict[str, torch.Tensor]) -> dict:
    """Perceiver sizes that the checkpoint determines unambiguously."""
    fields: dict = {}
    if "perceiver.latents" in state_dict:
        fields["perceiver_num_latents"] = state_dict["perceiver.latents"].shape[0]
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("perceiver.layers.")}
    if layers:
        fields["perceiver_depth"] = max(layers) + 1
    fields["perceiver_max_num_frames"] = (
        state_dict["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state_dict else None
    )
    fields["perceiver_max_num_media"] = (
        state_dict["perceiver.media_time_embs"].shape[0] if "perceiver.media_time_embs" in state_dict else None
    )
    return fields


def build_config(
    args: ConvertArguments,
    release: OpenFlamingoRelease | None,
    state_dict: dict[str, torch.Tensor],
    processor: OpenFlamingoProcessor,
) -> OpenFlamingoConfig:
    """
    The target architecture: the release's, or one built from the backbones' configs and the checkpoint. The token
    ids come from the processor's tokenizer; the vocabulary size is the number of rows of the checkpoint's embedding.
    """
    normalized = {normalize_original_key(k): v for k, v in state_dict.items()}
    overrides = parse_config_overrides(args.config_overrides)
    interval = args.cross_attn_every_n_layers or infer_cross_attn_every_n_layers(normalized)

    if release is not None:
        config = get_release_config(release.name)
        if args.cross_attn_every_n_layers and args.cross_attn_every_n_layers != release.cross_attn_every_n_layers:
            raise UsageError(
                f"{release.name} has a gated block every {release.cross_attn_every_n_layers} layers; "
                f"--cross-attn-every-n-layers {args.cross_attn_every_n_layers} contradicts it. Drop the option."
            )
        if (processor.eoc_token_id, processor.image_token_id) != (RELEASE_EOC_TOKEN_ID, RELEASE_MEDIA_TOKEN_ID):
            raise UsageError(
                f"The tokenizer gives <|endofchunk|> id {processor.eoc_token_id} and <image> id "
                f"{processor.image_token_id}, but {release.name} was trained with {RELEASE_EOC_TOKEN_ID} and "
                f"{RELEASE_MEDIA_TOKEN_ID} (GPT-NeoX-20B tokenizer, 50277 entries, plus the original's tokens). Use "
                f"the release's tokenizer ({release.tokenizer})."
            )
        for key, value in overrides.items():
            setattr(config, key, value)
    else:
        if interval is None:
            raise UsageError(
                "The checkpoint holds no gated cross-attention block, so their interval cannot be inferred: pass "
                "--cross-attn-every-n-layers."
            )
        text_config = AutoConfig.from_pretrained(
            args.language_model, local_files_only=args.local_files_only, trust_remote_code=False
        )
        fields = dict(
            vision_config=_vision_tower_config(args.vision_model, local_files_only=args.local_files_only),
            text_config=text_config,
            cross_attn_every_n_layers=interval,
            **_infer_perceiver_fields(normalized),
        )
        fields.update(overrides)
        config = OpenFlamingoConfig(**fields)

    embedding_key = original_input_embedding_key(config)
    if embedding_key in normalized:
        rows = normalized[embedding_key].shape[0]
        if release is None:
            config.text_config.vocab_size = rows
    else:
        rows = config.text_config.vocab_size
    if len(processor.tokenizer) > rows:
        raise UsageError(
            f"The tokenizer has {len(processor.tokenizer)} tokens (OpenFlamingo's included) but the model's embedding "
            f"has {rows} rows: new rows would have no trained weights. Use the tokenizer the checkpoint was trained with."
        )
    if release is not None and embedding_key in normalized and rows != len(processor.tokenizer):
        raise UsageError(
            f"{embedding_key} has {rows} rows but the tokenizer has {len(processor.tokenizer)} tokens; the original "
            "resized the embeddings to len(tokenizer), so this is not the release's tokenizer or checkpoint."
        )
    processor.update_model_config(config)
    return config


def render_model_card(
    output: str, release: OpenFlamingoRelease | None, args: ConvertArguments, config: OpenFlamingoConfig
) -> str:
    """A README.md: sources, published scores (releases), and usage with a few-shot prompt."""
    lm = release.language_model if release and not args.language_model else args.language_model
    vision = args.vision_model or (release.vision_model if release else None)
    title = release.name if release else f"OpenFlamingo converted from {Path(args.checkpoint).name}"
    base_models = [m for m in (lm, vision) if m and not os.path.exists(m)]
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "license: mit", "tags:",
             "- openflamingo", "- flamingo", "- image-text-to-text"]
    if base_models:
        front += ["base_model:"] + [f"- {m}" for m in base_models]
    front.append("---")
    if release is not None:
        source = (
            f"Converted from the original checkpoint [`{release.checkpoint_repo}`](https://huggingface.co/"
            f"{release.checkpoint_repo}) with `openflamingo-convert --release {release.name}`.\n\n{release.description}"
        )
        scores = (
            "## Published results\n\n| benchmark | 4-shot |\n|---|---|\n"
            f"| COCO captioning (CIDEr) | {release.coco_cider_4shot} |\n"
            f"| VQAv2 (accuracy) | {release.vqav2_accuracy_4shot} |\n\n"
            "Numbers as reported by the OpenFlamingo authors for the original implementation; this conversion was "
            "checked for numerical equivalence, not re-evaluated.\n"
        )
    else:
        source = f"Converted from a local OpenFlamingo checkpoint (`{Path(args.checkpoint).name}`) with `openflamingo-convert`."
        scores = ""
    text_config = config.get_text_config()
    return "\n".join(front) + f"""

# {title}

{source}

- Vision encoder: `{vision}` (patch tokens of the last layer, CLS dropped), Perceiver resampler with
  {config.perceiver_num_latents} latents.
- Language model: `{lm}` ({text_config.model_type}, {text_config.num_hidden_layers} layers), with a gated
  cross-attention block before every N-th decoder layer (N = {config.cross_attn_every_n_layers}).
- Special tokens: `<image>` (id {config.media_token_id}) marks where an image goes; `<|endofchunk|>` (id
  {config.eoc_token_id}) ends the text that belongs to an image and is the generation stop token.

{scores}
## Usage

Needs the `openflamingo_hf` package (the `openflamingo-hf` project that wrote this folder); importing it registers
the model with the transformers Auto classes.

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
import openflamingo_hf  # noqa: F401

model = AutoModelForImageTextToText.from_pretrained("{output}")
processor = AutoProcessor.from_pretrained("{output}")

# Few-shot captioning: one demonstration, then the query image.
demo, query = Image.open("demo.jpg"), Image.open("query.jpg")
prompt = "<image>Output:Two cats sleeping on a couch.<|endofchunk|><image>Output:"
inputs = processor(images=[[demo, query]], text=[prompt], return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=20, num_beams=3)
print(processor.post_process_generation(generated, inputs["input_ids"])[0])
```

With a pipeline:

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{output}")
print(pipe(images=[demo, query], text=prompt, generate_kwargs={{"max_new_tokens": 20}}, return_full_text=False))
```

VQA prompts follow `<image>Question:{{question}} Short answer:{{answer}}<|endofchunk|>` per demonstration, ending
with `<image>Question:{{question}} Short answer:` for the query.
"""


def convert(args: ConvertArguments) -> ConversionReport:
    """
    Runs the conversion described by `args` and writes the output folder (through a staging folder swapped in at the
    end, so a failed conversion leaves a previous output as it was and an overwritten one holds only new files).
    """
    check_arguments(args)
    release = get_release(args.release) if args.release else None
    output = Path(args.output)
    dtype = DTYPES[args.dtype]
    language_model = args.language_model or release.language_model
    vision_model = args.vision_model or release.vision_model
    checkpoint_path = args.checkpoint or _download_checkpoint(release, args.local_files_only)
    print(f"Reading {checkpoint_path}")
    state_dict = read_checkpoint(checkpoint_path)

    # Processor first: adding the special tokens fixes their ids, which the config and the checks need.
    processor = _build_processor(args, release, language_model, vision_model)
    config = build_config(args, release, state_dict, processor)

    print(f"Loading the language model {language_model} and the vision tower {vision_model}")
    lm = load_language_model(language_model, config.text_config, dtype=dtype, local_files_only=args.local_files_only)
    if lm.config.model_type != config.text_config.model_type:
        raise UsageError(
            f"{language_model} loads as a '{lm.config.model_type}' model but the checkpoint's architecture needs "
            f"'{config.text_config.model_type}'. Pass the language model the checkpoint was trained on (for the 3B "
            "releases the MosaicGPT repo, whose config.json has model_type 'mosaic_gpt'; for the 9B release an MPT-7B "
            "repo, model_type 'mpt')."
        )
    vision = _load_vision_tower(vision_model, dtype=dtype, local_files_only=args.local_files_only)
    base = base_state_dict_from_backbones(lm, vision)
    converted, report = convert_original_state_dict(state_dict, config, base_state_dict=base, return_report=True)
    del base, state_dict
    print(report.summary())

    model = OpenFlamingoForConditionalGeneration.from_pretrained(
        None, config=config, state_dict={k: v.to(dtype) for k, v in converted.items()}, dtype=dtype
    )
    del converted, lm, vision
    # The model's own settings (stop at <|endofchunk|>, the original's stop token), plus a default answer length.
    model.generation_config = openflamingo_generation_config(model.config, model.generation_config)
    model.generation_config.max_new_tokens = 20

    with staged_output_dir(output, overwrite=args.overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(render_model_card(str(output), release, args, config), encoding="utf-8")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    print(f"Wrote {output}")
    return report


def load_language_model(
    path: str, text_config: PreTrainedConfig, dtype: torch.dtype | None = None, local_files_only: bool = False
) -> PreTrainedModel:
    """
    The base language model at `path`, as the class the target config builds. trust_remote_code=False: the converter
    never runs code from the Hub; MosaicGPT (MPT-1B) and MPT-7B are implemented in this package. For a MosaicGPT
    target, an MPT repo (MPT-7B, the 9B release's LM) loads into `MosaicGPTForCausalLM` with its config and names
    translated, so its weights come out in our layout; anything else loads with `AutoModelForCausalLM`.
    """
    if text_config.model_type == "mosaic_gpt":
        config_dict, _ = PreTrainedConfig.get_config_dict(path, local_files_only=local_files_only)
        if config_dict.get("model_type") in ("mosaic_gpt", "mpt"):
            return MosaicGPTForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_files_only)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=local_files_only, trust_remote_code=False
    )


def _build_processor(
    args: ConvertArguments, release: OpenFlamingoRelease | None, language_model: str, vision_model: str
) -> OpenFlamingoProcessor:
    """The tokenizer (OpenFlamingo's tokens are added by the processor) and the image processor of the output."""
    tokenizer_path = args.tokenizer or (release.tokenizer if release and not args.language_model else language_model)
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path, local_files_only=args.local_files_only, trust_remote_code=False
    )
    if args.image_processor:
        image_processor = AutoImageProcessor.from_pretrained(args.image_processor, local_files_only=args.local_files_only)
    elif release is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_model, local_files_only=args.local_files_only)
        except OSError:
            print(f"{vision_model} has no image processor; using OpenAI CLIP preprocessing at 224 px.")
            image_processor = default_image_processor()
    else:
        image_processor = default_image_processor()
    return OpenFlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `openflamingo-convert`. Returns 0 on success; every error (bad arguments or input files, a
    checkpoint whose keys do not fit the architecture, an output that cannot be written) is one
    `openflamingo-convert: error: ...` line and exit status 2.
    """
    parser = build_parser()
    args = parser.parse_command_line(argv)
    try:
        convert(args)
    except (UsageError, ConversionError, ExportError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
