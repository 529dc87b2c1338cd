"""Conversion of a released OpenFlamingo checkpoint (or any original-format one) into a transformers model folder.

`convert_checkpoint(ConversionSettings(...))` reads the checkpoint, builds the processor (tokenizer with
`<|endofchunk|>`, `<image>` and `<PAD>` at the ids the checkpoint was trained with, CLIP image processor, chat
template) and the config, merges the checkpoint into the backbones and writes sharded safetensors, `config.json`, the
processor, `generation_config.json` (stops at `<|endofchunk|>`) and a model card. The folder loads with
`AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` once `openflamingo_hf` is imported.
The command `openflamingo-convert` (`openflamingo_hf.cli.convert`) reads its settings from the command line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

from ..hub import staged_output_dir
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
    OpenFlamingoRelease,
    get_release,
    get_release_config,
)
from .convert_original import (
    GATED_BLOCK,
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


class ConversionInputError(ValueError):
    """An input of the conversion (checkpoint file, backbone, tokenizer, settings) cannot be used; the message names
    it and says what to do."""


@dataclass
class ConversionSettings:
    """
    What to convert and where to. Give `release`, or `checkpoint` with `language_model` and `vision_model`, or both
    (a local checkpoint of a release's architecture).

    Args:
        output: folder to write (it must not exist or be empty, unless `overwrite`).
        release: name of a released model (`openflamingo_hf.releases.RELEASES`): its architecture, and unless given
            explicitly its checkpoint, language model, tokenizer and vision tower from the Hub.
        checkpoint: a local original checkpoint (.pt read with `torch.load(weights_only=True)`, or .safetensors).
        language_model, vision_model, tokenizer, image_processor: folders or Hub ids of the backbones and
            preprocessing (the tokenizer defaults to the language model's; the image processor to the vision model's
            own, else OpenAI CLIP preprocessing at 224 px).
        cross_attn_every_n_layers: interval of the gated blocks (default: the release's, or read from the checkpoint).
        config_overrides: OpenFlamingoConfig fields to set (sizes the checkpoint does not determine).
        dtype: name of the saved weights' dtype, a key of `DTYPES`.
        max_shard_size: largest safetensors shard.
        report: path of a JSON report (target weight -> source keys, skipped source entries) to write.
        local_files_only: never download.
        overwrite: replace a non-empty `output`.
    """

    output: str
    release: str | None = None
    checkpoint: str | None = None
    language_model: str | None = None
    vision_model: str | None = None
    tokenizer: str | None = None
    image_processor: str | None = None
    cross_attn_every_n_layers: int | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    max_shard_size: str = "5GB"
    report: str | None = None
    local_files_only: bool = False
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def _check_settings(settings: ConversionSettings) -> None:
    if settings.release is None and not (settings.checkpoint and settings.language_model and settings.vision_model):
        raise ConversionInputError(
            "Give a release, or a local conversion with a checkpoint, a language model and a vision model (CLI: "
            "--release NAME, or --checkpoint FILE --language-model PATH_OR_ID --vision-model PATH_OR_ID)."
        )
    if settings.dtype not in DTYPES:
        raise ConversionInputError(f"dtype must be one of {list(DTYPES)}, got {settings.dtype!r}.")


def _download_checkpoint(release: OpenFlamingoRelease, local_files_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(release.checkpoint_repo, release.checkpoint_file, local_files_only=local_files_only)
    except Exception as error:  # network, auth or cache miss: say what to do instead
        raise ConversionInputError(
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
        raise ConversionInputError(f"{path}: no such file.")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ConversionInputError(f"{path} is empty; download or save the checkpoint again.")
    if head.startswith(b"PK\x03\x04"):  # torch.save's default (zip) format
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as error:
            raise ConversionInputError(
                f"{path} is truncated or corrupt ({error}); download or save it again."
            ) from error
        return "torch-zip"
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt"):  # checks that the header's tensors cover the file exactly
                pass
        except Exception as error:  # SafetensorError is not exported under a stable name
            raise ConversionInputError(
                f"{path} is truncated or corrupt ({error}); download or save it again."
            ) from error
        return "safetensors"
    if head.startswith(b"\x80") or tarfile.is_tarfile(path):  # a pickle stream (protocol 2+), or the oldest format
        return "torch-legacy"
    raise ConversionInputError(
        f"{path} is not a checkpoint (neither safetensors nor a torch.save file; it starts with {head!r}). If it was "
        "downloaded, it may be an error page: download it again."
    )


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """
    Reads an original checkpoint: safetensors, or a torch.save file read with `torch.load(weights_only=True)`. Any
    failure to read is a `ConversionInputError` naming the file.
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
            raise ConversionInputError(
                f"Could not read {path} with torch.load(weights_only=True): it holds pickled objects other than "
                f"tensors and plain containers ({refused.group(1)}), which are refused. Load it yourself in a trusted "
                "environment and save its state dict with torch.save(state_dict, path)."
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConversionInputError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {first_line}); download or save it again."
        ) from error


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint file; a file that holds no state dict is a `ConversionInputError`
    too."""
    try:
        state_dict, _ = unwrap_checkpoint(load_checkpoint(path))
    except ConversionError as error:
        raise ConversionInputError(f"{path}: {error}") from error
    return state_dict


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


def _infer_attention_sizes(state_dict: dict[str, torch.Tensor], overrides: dict[str, Any]) -> dict[str, int]:
    """
    Head counts and feed-forward multipliers of the Perceiver and the gated cross-attention blocks, read from the
    tensor shapes: a query projection is (heads x head width, input width) and a feed-forward's first linear layer
    (multiplier x width, width). The head width itself is not in the shapes: it stays the configured one (the
    original's 64, or `overrides`). Fields given in `overrides` are left to them.
    """
    patterns = {
        "perceiver": (r"^perceiver\.layers\.\d+\.0\.to_q\.weight$", r"^perceiver\.layers\.\d+\.1\.1\.weight$"),
        "cross_attn": (rf"\.{GATED_BLOCK}\.attn\.to_q\.weight$", rf"\.{GATED_BLOCK}\.ff\.1\.weight$"),
    }
    sizes: dict[str, int] = {}
    for prefix, (query_pattern, ff_pattern) in patterns.items():
        query = next((v for k, v in state_dict.items() if re.search(query_pattern, k)), None)
        ff = next((v for k, v in state_dict.items() if re.search(ff_pattern, k)), None)
        if query is not None and f"{prefix}_num_heads" not in overrides:
            default_head_dim = OpenFlamingoConfig.__dataclass_fields__[f"{prefix}_head_dim"].default
            head_dim = overrides.get(f"{prefix}_head_dim", default_head_dim)
            if query.shape[0] % head_dim:
                raise ConversionInputError(
                    f"The checkpoint's {prefix.replace('_', '-')} attention is {query.shape[0]} wide, not a multiple "
                    f"of {prefix}_head_dim {head_dim}: pass {prefix}_head_dim and {prefix}_num_heads in the config "
                    "overrides (their product must be that width)."
                )
            sizes[f"{prefix}_num_heads"] = query.shape[0] // head_dim
        if ff is not None and f"{prefix}_ff_mult" not in overrides and ff.shape[0] % ff.shape[1] == 0:
            sizes[f"{prefix}_ff_mult"] = ff.shape[0] // ff.shape[1]
    return sizes


def build_config(
    settings: ConversionSettings,
    release: OpenFlamingoRelease | None,
    state_dict: dict[str, torch.Tensor],
    processor: OpenFlamingoProcessor,
) -> OpenFlamingoConfig:
    """
    The target architecture: the release's, or one built from the backbones' configs and the checkpoint. The token
    ids come from the processor's tokenizer; the vocabulary size is the number of rows of the checkpoint's embedding.
    """
    normalized = {normalize_original_key(k): v for k, v in state_dict.items()}
    overrides = dict(settings.config_overrides or {})
    interval = settings.cross_attn_every_n_layers or infer_cross_attn_every_n_layers(normalized)

    if release is not None:
        config = get_release_config(release.name)
        interval_given = settings.cross_attn_every_n_layers
        if interval_given and interval_given != release.cross_attn_every_n_layers:
            raise ConversionInputError(
                f"{release.name} has a gated block every {release.cross_attn_every_n_layers} layers; "
                f"--cross-attn-every-n-layers {settings.cross_attn_every_n_layers} contradicts it. Drop the option."
            )
        if (processor.eoc_token_id, processor.image_token_id) != (RELEASE_EOC_TOKEN_ID, RELEASE_MEDIA_TOKEN_ID):
            raise ConversionInputError(
                f"The tokenizer gives <|endofchunk|> id {processor.eoc_token_id} and <image> id "
                f"{processor.image_token_id}, but {release.name} was trained with {RELEASE_EOC_TOKEN_ID} and "
                f"{RELEASE_MEDIA_TOKEN_ID} (GPT-NeoX-20B tokenizer, 50277 entries, plus the original's tokens). Use "
                f"the release's tokenizer ({release.tokenizer})."
            )
        for key, value in overrides.items():
            setattr(config, key, value)
    else:
        if interval is None:
            raise ConversionInputError(
                "The checkpoint holds no gated cross-attention block, so their interval cannot be inferred: pass "
                "--cross-attn-every-n-layers."
            )
        text_config = AutoConfig.from_pretrained(
            settings.language_model, local_files_only=settings.local_files_only, trust_remote_code=False
        )
        fields = dict(
            vision_config=_vision_tower_config(settings.vision_model, local_files_only=settings.local_files_only),
            text_config=text_config,
            cross_attn_every_n_layers=interval,
            **_infer_perceiver_fields(normalized),
        )
        fields.update(_infer_attention_sizes(normalized, overrides))
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
        raise ConversionInputError(
            f"The tokenizer has {len(processor.tokenizer)} tokens (OpenFlamingo's included) but the model's embedding "
            f"has {rows} rows: new rows would have no trained weights. Use the tokenizer the checkpoint was trained "
            "with."
        )
    if release is not None and embedding_key in normalized and rows != len(processor.tokenizer):
        raise ConversionInputError(
            f"{embedding_key} has {rows} rows but the tokenizer has {len(processor.tokenizer)} tokens; the original "
            "resized the embeddings to len(tokenizer), so this is not the release's tokenizer or checkpoint."
        )
    processor.update_model_config(config)
    return config


def render_model_card(
    output: str, release: OpenFlamingoRelease | None, settings: ConversionSettings, config: OpenFlamingoConfig
) -> str:
    """A README.md: sources, published scores (releases), and usage with a few-shot prompt."""
    lm = release.language_model if release and not settings.language_model else settings.language_model
    vision = settings.vision_model or (release.vision_model if release else None)
    title = release.name if release else f"OpenFlamingo converted from {Path(settings.checkpoint).name}"
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
        source = (
            f"Converted from a local OpenFlamingo checkpoint (`{Path(settings.checkpoint).name}`) with "
            "`openflamingo-convert`."
        )
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


def convert_checkpoint(settings: ConversionSettings) -> ConversionReport:
    """
    Runs the conversion described by `settings` and writes the output folder (through a staging folder swapped in at the
    end, so a failed conversion leaves a previous output as it was and an overwritten one holds only new files).
    """
    _check_settings(settings)
    release = get_release(settings.release) if settings.release else None
    output = Path(settings.output)
    dtype = DTYPES[settings.dtype]
    language_model = settings.language_model or release.language_model
    vision_model = settings.vision_model or release.vision_model
    checkpoint_path = settings.checkpoint or _download_checkpoint(release, settings.local_files_only)
    print(f"Reading {checkpoint_path}")
    state_dict = read_checkpoint(checkpoint_path)

    # Processor first: adding the special tokens fixes their ids, which the config and the checks need.
    processor = _build_processor(settings, release, language_model, vision_model)
    config = build_config(settings, release, state_dict, processor)

    print(f"Loading the language model {language_model} and the vision tower {vision_model}")
    local_files_only = settings.local_files_only
    lm = load_language_model(language_model, config.text_config, dtype=dtype, local_files_only=local_files_only)
    if lm.config.model_type != config.text_config.model_type:
        raise ConversionInputError(
            f"{language_model} loads as a '{lm.config.model_type}' model but the checkpoint's architecture needs "
            f"'{config.text_config.model_type}'. Pass the language model the checkpoint was trained on (for the 3B "
            "releases the MosaicGPT repo, whose config.json has model_type 'mosaic_gpt'; for the 9B release an MPT-7B "
            "repo, model_type 'mpt')."
        )
    vision = _load_vision_tower(vision_model, dtype=dtype, local_files_only=local_files_only)
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

    with staged_output_dir(output, overwrite=settings.overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=settings.max_shard_size)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(render_model_card(str(output), release, settings, config), encoding="utf-8")
    if settings.report:
        Path(settings.report).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.report).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
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
    settings: ConversionSettings, release: OpenFlamingoRelease | None, language_model: str, vision_model: str
) -> OpenFlamingoProcessor:
    """The tokenizer (OpenFlamingo's tokens are added by the processor) and the image processor of the output."""
    release_tokenizer = release.tokenizer if release and not settings.language_model else None
    tokenizer_path = settings.tokenizer or release_tokenizer or language_model
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path, local_files_only=settings.local_files_only, trust_remote_code=False
    )
    if settings.image_processor:
        image_processor = AutoImageProcessor.from_pretrained(
            settings.image_processor, local_files_only=settings.local_files_only
        )
    elif release is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(
                vision_model, local_files_only=settings.local_files_only
            )
        except OSError:
            print(f"{vision_model} has no image processor; using OpenAI CLIP preprocessing at 224 px.")
            image_processor = default_image_processor()
    else:
        image_processor = default_image_processor()
    return OpenFlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)


__all__ = [
    "DTYPES",
    "ConversionInputError",
    "ConversionSettings",
    "build_config",
    "check_checkpoint_file",
    "convert_checkpoint",
    "load_checkpoint",
    "load_language_model",
    "read_checkpoint",
    "render_model_card",
]
