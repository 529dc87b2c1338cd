"""Export an OpenFlamingo model and its processor as a self-contained Hugging Face Hub folder, and push it.

The command `openflamingo-export` (module `openflamingo_hf.cli.export`) runs `export_for_hub` and `push_export_to_hub`:

    openflamingo-export --model ./OpenFlamingo-9B-hf --output ./OpenFlamingo-9B-hub            # remote-code folder
    openflamingo-export --model ./OpenFlamingo-9B-hf --output ./plain --no-remote-code         # needs openflamingo_hf

The default, *remote-code* folder loads anywhere transformers is installed, without this package:

    AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True)
    AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    pipeline("image-to-text", model=repo_id, trust_remote_code=True)

It holds the usual `save_pretrained` files (safetensors weights, `config.json`, `generation_config.json`, the
processor's files) plus the model code, copied from this installed package, and `auto_map` / `custom_pipelines`
entries that point the transformers Auto classes at it. The code files import only torch / transformers /
huggingface_hub and each other (single-dot relative imports), which is what makes them work from a flat Hub folder.

`auto_map` is written into the JSON files here instead of through `register_for_auto_class`: that classmethod sets a
class attribute, so every later `save_pretrained` of the same class in the process would silently become a
remote-code save too.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.dynamic_module_utils import get_imports, get_relative_imports


if TYPE_CHECKING:  # the functions take models and processors; importing their classes would import torch
    from transformers import PreTrainedModel, ProcessorMixin

PACKAGE = "openflamingo_hf"

# Code files shipped in a remote-code folder: file name in the folder -> module of this package it is copied from.
CODE_FILES: dict[str, str] = {
    "configuration_mosaic_gpt.py": f"{PACKAGE}.modeling.configuration_mosaic_gpt",
    "configuration_openflamingo.py": f"{PACKAGE}.modeling.configuration_openflamingo",
    "modeling_mosaic_gpt.py": f"{PACKAGE}.modeling.modeling_mosaic_gpt",
    "modeling_openflamingo.py": f"{PACKAGE}.modeling.modeling_openflamingo",
    "processing_openflamingo.py": f"{PACKAGE}.processing.processing_openflamingo",
    "media_inputs.py": f"{PACKAGE}.processing.media_inputs",
    "pipeline_openflamingo.py": f"{PACKAGE}.pipeline_openflamingo",
}
PIPELINE_FILE = "pipeline_openflamingo.py"
PIPELINE_CLASS = "OpenFlamingoPipeline"
PIPELINE_TASK = "image-to-text"

# `auto_map` entries, "<module file without .py>.<class>", as `custom_object_save` would write them.
MODEL_AUTO_MAP = {
    # (From a local folder transformers copies each auto_map module with its relative imports into a directory named
    # after a hash of those files, so the config and model modules may import two copies of configuration_mosaic_gpt;
    # modeling_openflamingo builds a mosaic_gpt language model directly, so that does not matter.)
    "AutoConfig": "configuration_openflamingo.OpenFlamingoConfig",
    # The classes the plain package registers too: the headless model (final hidden states, for harnesses that load
    # with AutoModel) and the image-text-to-text model. It is not mapped to AutoModelForCausalLM, so
    # `AutoModelForCausalLM.from_pretrained(repo)` fails the same way for both variants instead of handing
    # text-generation code a model that expects images.
    "AutoModel": "modeling_openflamingo.OpenFlamingoModel",
    "AutoModelForImageTextToText": "modeling_openflamingo.OpenFlamingoForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_openflamingo.OpenFlamingoProcessor"}
# `custom_pipelines` entry of config.json, in the format `Pipeline.save_pretrained` writes and `pipeline()` reads
# (`impl` is "<module>.<class>" inside the repo, `pt` names transformers Auto classes).
PIPELINE_ENTRY = {
    "impl": f"{PIPELINE_FILE[:-3]}.{PIPELINE_CLASS}",
    "pt": ["AutoModelForImageTextToText"],
    "type": "multimodal",
}

CONFIG_FILE = "config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Language-model types the shipped code can build besides transformers' own: the MPT-1B port it carries.
SHIPPED_CAUSAL_LM_TYPES = ("mosaic_gpt",)


class ExportError(ValueError):
    """The model, the processor or the output folder cannot be exported as asked; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_for_hub(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    output_dir: str | os.PathLike,
    *,
    remote_code: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """
    Writes `model` and `processor` as a folder ready to be uploaded to the Hugging Face Hub.

    The folder holds `model.save_pretrained` (safetensors, sharded above `max_shard_size`, and the model's
    `generation_config.json`, which stops at `<|endofchunk|>` unless the user chose otherwise: the model sets that
    itself, see `openflamingo_generation_config`), `processor.save_pretrained` (`processor_config.json`, tokenizer
    files, `chat_template.jinja`). With `remote_code=True` it also holds the model / processor / pipeline code of this
    package and the `auto_map` (and `custom_pipelines`) entries that make it load with `trust_remote_code=True` where
    `openflamingo_hf` is not installed.

    The folder is written next to `output_dir` first and swapped into place at the end (see [`staged_output_dir`]),
    so a failed export leaves the previous `output_dir` as it was and nothing else behind, and an overwritten folder
    holds only this export's files. The model and processor objects are not changed beyond what their
    `save_pretrained` does.

    Args:
        model: an `OpenFlamingoForConditionalGeneration`.
        processor: its `OpenFlamingoProcessor` (its `<image>` / `<|endofchunk|>` ids must match the model config).
        output_dir: folder to create. It must not exist or be empty, unless `overwrite=True`.
        remote_code: ship the code and `auto_map` (default). `False` writes a plain folder, which loads only where
            `openflamingo_hf` is imported.
        max_shard_size: largest safetensors file, e.g. `"5GB"` (Hub downloads of many moderate files resume and
            parallelize better than one huge file).
        overwrite: replace an existing non-empty `output_dir` (everything in it is deleted).

    Returns:
        `Path` of the written folder.

    Raises:
        ExportError: the output folder is a file, cannot be written, or holds files and `overwrite` is not set;
            writing failed (the message names `output_dir` and the cause); the model and processor disagree on
            token ids or vocabulary size; or (remote code) a backbone's model type is not one the shipped code can
            build.
    """
    output_dir = Path(output_dir)
    _check_model_and_processor(model, processor)
    if remote_code:
        _check_remote_code_can_build(model.config)
        code_sources = _code_sources()

    with staged_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        if remote_code:
            for file_name, source in code_sources.items():
                shutil.copyfile(source, staging / file_name)
            _update_json(staging / CONFIG_FILE, _model_remote_code_entries())
            # The same files `register_for_auto_class` would mark; AutoProcessor reads processor_config.json first.
            for name in (PROCESSOR_CONFIG_FILE, TOKENIZER_CONFIG_FILE):
                if (staging / name).is_file():
                    _update_json(staging / name, {"auto_map": dict(PROCESSOR_AUTO_MAP)})
        else:
            _strip_remote_code(staging)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# Output folders (shared with the conversion)
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def staged_output_dir(output_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """
    Yields an empty staging folder next to `output_dir` to write into; when the block succeeds, the staging folder
    replaces `output_dir` (the previous one, if any, is deleted only after the swap). When the block fails, the
    staging folder is deleted and `output_dir` is left exactly as it was.

    Writing into `output_dir` directly would mix old and new files on `overwrite`: an earlier unsharded
    `model.safetensors` next to a new sharded index (or the reverse) is what `from_pretrained` then loads.

    Raises:
        ExportError: `output_dir` cannot be used (see [`check_output_dir`]), or an `OSError` while writing (disk
            full, permissions); the message names `output_dir`, never the staging folder.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    tag = uuid.uuid4().hex[:12]
    # Next to the destination (same file system, so the swap is a rename); made with mkdir, not mkdtemp, so that
    # the folder gets the usual permissions rather than mkdtemp's owner-only ones.
    staging = output_dir.parent / f".{output_dir.name}.staging-{tag}"
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        yield staging
        _swap_in(staging, output_dir, tag)
    except OSError as error:
        cause = str(error).replace(str(staging), str(output_dir))
        raise ExportError(
            f"Could not write {output_dir} ({type(error).__name__}: {cause}); nothing was changed there. Free space "
            "or fix the permissions, or choose another output folder."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap


def _swap_in(staging: Path, output_dir: Path, tag: str) -> None:
    """Moves `staging` to `output_dir`; a previous `output_dir` is moved aside first and restored if that fails."""
    if not output_dir.exists() and not output_dir.is_symlink():
        os.replace(staging, output_dir)
        return
    previous = output_dir.parent / f".{output_dir.name}.previous-{tag}"
    os.replace(output_dir, previous)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(previous, output_dir)
        raise
    if previous.is_symlink():  # the output path was a link to a folder: drop the link, not what it points to
        previous.unlink()
    else:
        shutil.rmtree(previous, ignore_errors=True)


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """
    Raises `ExportError` unless `output_dir` can become the output folder: a folder or nothing, empty unless
    `overwrite`, not the home, current or root folder, and inside a folder this process may write to (the staging
    folder and the swap need that, not write access to `output_dir` itself).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"{output_dir} exists and is not a folder. Choose another output path.")
    problem = unwritable_location(output_dir)
    if problem:
        raise ExportError(f"Cannot write {output_dir}: {problem}. Choose another output path.")
    if not output_dir.is_dir():
        return
    present = sorted(p.name for p in output_dir.iterdir())
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (f", ... ({len(present)} entries)" if len(present) > 5 else "")
        raise ExportError(
            f"{output_dir} is not empty (it holds {shown}). Choose a new or empty folder, or pass "
            "overwrite=True (CLI: --overwrite) to replace everything in it."
        )
    if present and output_dir.resolve() in (Path.home().resolve(), Path.cwd().resolve(), Path("/").resolve()):
        raise ExportError(
            f"Refusing to replace {output_dir}, which is the home, current or root folder. Choose a new folder."
        )


def unwritable_location(path: Path) -> str | None:
    """
    Why a file or folder cannot be created (or replaced) at `path`, or `None`: its nearest existing ancestor folder
    must be a folder this process may write to. A cheap check made before hours of work, not a guarantee.
    """
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is not writable"
    return None


def _check_model_and_processor(model: PreTrainedModel, processor: ProcessorMixin) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "openflamingo":
        raise ExportError(
            f"export_for_hub exports OpenFlamingo models; got {type(model).__name__} with model_type "
            f"{getattr(config, 'model_type', None)!r}. Pass an OpenFlamingoForConditionalGeneration."
        )
    for name in ("image_token_id", "eoc_token_id", "tokenizer"):
        if not hasattr(processor, name):
            raise ExportError(
                f"The processor ({type(processor).__name__}) has no `{name}`; pass the model's OpenFlamingoProcessor."
            )
    mismatches = [
        f"{field_name}={getattr(config, field_name)} but the processor's {token} is {token_id}"
        for field_name, token, token_id in (
            ("media_token_id", "<image> id", processor.image_token_id),
            ("eoc_token_id", "<|endofchunk|> id", processor.eoc_token_id),
        )
        if getattr(config, field_name) != token_id
    ]
    if mismatches:
        raise ExportError(
            "The model and the processor disagree: model config " + "; ".join(mismatches) + ". Export the processor "
            "the model was trained with, or call `processor.update_model_config(model.config)` if the model is new."
        )
    num_embeddings = model.get_input_embeddings().num_embeddings
    if num_embeddings < len(processor.tokenizer):
        raise ExportError(
            f"The model has {num_embeddings} token embeddings but the tokenizer has {len(processor.tokenizer)} tokens, "
            f"so some token ids would index past the embedding. Call `model.resize_token_embeddings("
            f"{len(processor.tokenizer)})` (and train the new rows) before exporting."
        )


def _check_remote_code_can_build(config) -> None:
    """
    The shipped code builds the backbones with `AutoModel` / `AutoModelForCausalLM.from_config`, so both must be
    types that transformers knows without this package (or the MosaicGPT port the folder carries).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    problems = []
    text_type = getattr(config.text_config, "model_type", None)
    if text_type not in SHIPPED_CAUSAL_LM_TYPES and not (
        text_type in CONFIG_MAPPING_NAMES and text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        problems.append(
            f"its language model has model_type {text_type!r}, which is neither a causal LM built into transformers "
            f"nor one shipped with the code ({', '.join(SHIPPED_CAUSAL_LM_TYPES)})"
        )
    vision_type = getattr(config.vision_config, "model_type", None)
    if not (vision_type in CONFIG_MAPPING_NAMES and vision_type in MODEL_MAPPING_NAMES):
        problems.append(
            f"its vision tower has model_type {vision_type!r}, which is not a model built into transformers"
        )
    if problems:
        raise ExportError(
            "The remote code of the Hub folder cannot build this model: "
            + "; ".join(problems)
            + ". Such a model only loads where its code is registered: export it with `remote_code=False` "
            "(CLI: --no-remote-code) and load it after importing the packages that register those types, or use a "
            "backbone type that transformers supports."
        )


def _code_sources() -> dict[str, Path]:
    """
    The files to ship, from the installed package, checked to be self-contained in a flat folder: no absolute import
    of this package and no relative import of a module that is not shipped.
    """
    sources = {}
    for file_name, module_name in CODE_FILES.items():
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
            raise ExportError(
                f"Cannot find the source file of {module_name} to ship as {file_name}: the installed "
                f"{PACKAGE} is incomplete. Reinstall it (pip install -e . in a checkout)."
            )
        sources[file_name] = Path(spec.origin)
    shipped = {name[: -len(".py")] for name in sources}
    for file_name, source in sources.items():
        if PACKAGE in get_imports(source):
            raise ExportError(
                f"{source} imports {PACKAGE}, which a remote-code folder does not have. Use single-dot relative "
                "imports of the other shipped files instead."
            )
        missing = sorted(set(get_relative_imports(source)) - shipped)
        if missing:
            raise ExportError(
                f"{source} imports .{', .'.join(missing)}, which is not among the shipped files "
                f"({', '.join(sorted(sources))}). Only single-dot relative imports of shipped files work in a flat "
                "Hub folder."
            )
    return sources


def _model_remote_code_entries() -> dict[str, Any]:
    return {"auto_map": dict(MODEL_AUTO_MAP), "custom_pipelines": {PIPELINE_TASK: copy.deepcopy(PIPELINE_ENTRY)}}


def _update_json(path: Path, entries: dict[str, Any]) -> None:
    """Adds `entries` to a JSON object file; dict values are merged into what the file has under that key."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _strip_remote_code(folder: Path) -> None:
    """
    A plain folder must not point at code it does not hold: a model that was itself loaded from remote code saves
    its `auto_map` and code files through transformers, so those are removed again.
    """
    for name in CODE_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in (CONFIG_FILE, PROCESSOR_CONFIG_FILE, TOKENIZER_CONFIG_FILE):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if "auto_map" in data or "custom_pipelines" in data:
            data.pop("auto_map", None)
            data.pop("custom_pipelines", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------------


def push_export_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload OpenFlamingo",
):
    """
    Uploads a folder written by [`export_for_hub`] to the Hub repository `repo_id` (created if needed), in one
    `HfApi.upload_folder` call (resumable, large files through Xet when `hf_xet` is installed).

    Args:
        folder: the exported folder.
        repo_id: `"org/name"`.
        private: visibility of a newly created repository (`None`: the owner's default).
        token: Hub token (`None`: the one saved by `hf auth login`).
        revision: branch to commit to (default: the main branch).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: message of the commit.

    Returns:
        The `CommitInfo` of `upload_folder`.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(
            f"{folder} has no {CONFIG_FILE}, so it is not an exported model folder. Run export_for_hub (or "
            "openflamingo-export) first and push its output folder."
        )
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


__all__ = [
    "ExportError",
    "check_output_dir",
    "export_for_hub",
    "push_export_to_hub",
    "staged_output_dir",
    "unwritable_location",
]
