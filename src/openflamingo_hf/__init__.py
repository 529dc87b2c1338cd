"""OpenFlamingo as a native Hugging Face transformers model.

Importing this package registers the OpenFlamingo classes with the transformers Auto classes (`AutoConfig`,
`AutoModel` (the headless `OpenFlamingoModel`), `AutoModelForImageTextToText`, `AutoProcessor`) and the MPT-1B
("MosaicGPT") language model with `AutoConfig` / `AutoModelForCausalLM`.

The one exception is a process that starts one of the package's commands (`openflamingo`, `openflamingo-convert`,
...; their modules are under `openflamingo_hf.cli`): registering imports torch and the transformers model code (about
ten seconds), which `--help`, `--version` or an argument error do not need. There the names below are imported on first
use, and a command registers the Auto classes (`register_auto_classes`) before it loads a model.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# Public name -> module (relative to this package) that defines it; imported on first access.
_LAZY_NAMES = {
    "GatedCrossAttentionBlock": ".modeling.modeling_openflamingo",
    "MosaicGPTConfig": ".modeling.configuration_mosaic_gpt",
    "MosaicGPTForCausalLM": ".modeling.modeling_mosaic_gpt",
    "MosaicGPTModel": ".modeling.modeling_mosaic_gpt",
    "OpenFlamingoConfig": ".modeling.configuration_openflamingo",
    "OpenFlamingoForConditionalGeneration": ".modeling.modeling_openflamingo",
    "OpenFlamingoMediaCache": ".modeling.modeling_openflamingo",
    "OpenFlamingoModel": ".modeling.modeling_openflamingo",
    "OpenFlamingoPerceiverResampler": ".modeling.modeling_openflamingo",
    "OpenFlamingoPreTrainedModel": ".modeling.modeling_openflamingo",
    "OpenFlamingoProcessor": ".processing.processing_openflamingo",
    "decode_compile_config": ".modeling.modeling_openflamingo",
    "export_for_hub": ".hub",
    "find_decoder_layers": ".modeling.modeling_openflamingo",
}


def register_auto_classes() -> None:
    """
    Registers OpenFlamingo with `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor`, and
    MosaicGPT with `AutoConfig` / `AutoModelForCausalLM`. Importing the package does this; calling it again is free.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .modeling.configuration_openflamingo import OpenFlamingoConfig
    from .modeling.modeling_mosaic_gpt import register as register_mosaic_gpt
    from .modeling.modeling_openflamingo import OpenFlamingoForConditionalGeneration, OpenFlamingoModel
    from .processing.processing_openflamingo import OpenFlamingoProcessor

    register_mosaic_gpt()
    AutoConfig.register("openflamingo", OpenFlamingoConfig, exist_ok=True)
    AutoModel.register(OpenFlamingoConfig, OpenFlamingoModel, exist_ok=True)
    AutoModelForImageTextToText.register(OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(OpenFlamingoConfig, OpenFlamingoProcessor, exist_ok=True)


def _started_by_a_command() -> bool:
    """
    Whether this package is being imported only as the parent of a command module (`openflamingo_hf.cli...`) by the
    program's main module: a console script (`from openflamingo_hf.cli.main import main`), `python -m
    openflamingo_hf.cli...` (runpy) or `python -c "import openflamingo_hf.cli..."`. Python runs this file before any
    submodule and tells it nothing about which one was asked for, so the importing frames are read: the module
    importlib is loading (`name` in `_find_and_load`, `mod_name` in runpy's lookup), and who asked for it. A library
    or a test importing a command module gets the eager registration.
    """
    getframe = getattr(sys, "_getframe", None)
    if getframe is None:  # not CPython: register eagerly, as always
        return False
    target = None  # the outermost module importlib is loading in this chain of imports
    frame = getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_filename.startswith("<frozen importlib") or module.startswith("importlib"):
            if frame.f_code.co_name == "_find_and_load":
                target = frame.f_locals.get("name", target)
        elif module == "runpy":
            if _is_command_module(frame.f_locals.get("mod_name")):
                return True
        elif module != __name__:
            return module == "__main__" and _is_command_module(target)
        frame = frame.f_back
    return False


def _is_command_module(name: object) -> bool:
    return isinstance(name, str) and (name == f"{__name__}.cli" or name.startswith(f"{__name__}.cli."))


def _import_name(name: str) -> Any:
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()  # a command process: the first use of a class is where the Auto classes are needed
    return _import_name(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_NAMES])


if not _started_by_a_command():
    register_auto_classes()
    for _name in _LAZY_NAMES:
        _import_name(_name)
    del _name

__all__ = [
    "GatedCrossAttentionBlock",
    "MosaicGPTConfig",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "OpenFlamingoConfig",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoMediaCache",
    "OpenFlamingoModel",
    "OpenFlamingoPerceiverResampler",
    "OpenFlamingoPreTrainedModel",
    "OpenFlamingoProcessor",
    "decode_compile_config",
    "export_for_hub",
    "find_decoder_layers",
    "register_auto_classes",
]
