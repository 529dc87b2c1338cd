"""
Quantized loading of OpenFlamingo through transformers' own quantizers (torchao, optimum-quanto, bitsandbytes).

    from openflamingo_hf import OpenFlamingoForConditionalGeneration
    from openflamingo_hf.quantization import default_quantization_config

    config = default_quantization_config(path)  # torchao int8 weight-only, runs on CPU and GPU
    model = OpenFlamingoForConditionalGeneration.from_pretrained(path, quantization_config=config)

Any transformers quantization config works with `from_pretrained`; `default_quantization_config` only picks the
modules to leave unquantized (`modules_to_not_convert`):

* the output embedding (`language_model.lm_head`), always: it is tied to the input embedding in every OpenFlamingo
  release, and it is what transformers would skip for a plain causal LM. Transformers' own guess for that list
  (when none is given) also skips the model's last parameter, which for OpenFlamingo is the feed-forward of the last
  gated block rather than the LM head: an explicit list avoids that arbitrary exception.
* below 8 bits, the vision tower too: on the embedded model it is the part whose quantization moves the outputs
  most (int2 everywhere agrees with fp32 on 88% of held-out captions, 98% with the vision tower kept), while
  keeping the Perceiver or the gated blocks made no measurable difference at any width.

Install the backends with `pip install 'openflamingo-hf[quant]'` (torchao and optimum-quanto; bitsandbytes is a
separate install).
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import quantization_config as hf_quantization_config

from .modeling.configuration_openflamingo import OpenFlamingoConfig
from .modeling.modeling_openflamingo import OpenFlamingoForConditionalGeneration

# Weight widths each backend can quantize to through `default_quantization_config`, where this package tests them
# (CPU). torchao's int4 weight-only tensors need the `mslk` kernels (CUDA), so torchao is int8 only here.
SUPPORTED_WEIGHTS: dict[str, tuple[str, ...]] = {
    "torchao": ("int8",),
    "quanto": ("int8", "int4", "int2"),
    "bitsandbytes": ("int8", "int4"),
}

# The package each backend needs, and how to install it.
_BACKEND_PACKAGES = {
    "torchao": ("torchao", "pip install 'openflamingo-hf[quant]'"),
    "quanto": ("optimum.quanto", "pip install 'openflamingo-hf[quant]'"),
    "bitsandbytes": ("bitsandbytes", "pip install bitsandbytes"),
}

def modules_to_not_convert(config: OpenFlamingoConfig | str | os.PathLike, keep: Sequence[str] = ()) -> list[str]:
    """
    The module names a quantizer should leave in the model's dtype: the output embedding (and whatever it is tied
    to) plus `keep`.

    Args:
        config: the model config, or a folder / Hub name to read it from.
        keep: more module names to keep unquantized, e.g. `("vision_model",)`, `("perceiver",
            "gated_cross_attn_layers")` or a deeper name such as `"language_model.model.layers.0"`.
    Returns:
        Names for `modules_to_not_convert` (torchao, quanto) or `llm_int8_skip_modules` (bitsandbytes).
    """
    skeleton = _skeleton(_openflamingo_config(config))
    unknown = [name for name in keep if not _has_submodule(skeleton, name)]
    if unknown:
        top_level = ", ".join(name for name, _ in skeleton.named_children())
        raise ValueError(
            f"keep={list(keep)!r} names modules the model does not have: {', '.join(unknown)}. Give module names of "
            f"OpenFlamingoForConditionalGeneration, e.g. its parts {top_level}."
        )
    return sorted(set(_output_embedding_names(skeleton)) | set(keep))


def default_quantization_config(
    config: OpenFlamingoConfig | str | os.PathLike,
    backend: str = "torchao",
    weights: str = "int8",
    keep: Sequence[str] | None = None,
) -> hf_quantization_config.QuantizationConfigMixin:
    """
    A transformers quantization config for `from_pretrained(..., quantization_config=...)`: weight-only quantization
    of every linear layer but the output embedding and `keep`.

    Args:
        config: the model config, or the folder / Hub name that will be loaded.
        backend: "torchao" (int8 weight-only; the quantized model can be saved and reloaded), "quanto"
            (optimum-quanto: int8, int4 or int2 weights, not serializable) or "bitsandbytes".
        weights: "int8", "int4" or "int2" (see `SUPPORTED_WEIGHTS`).
        keep: modules to leave unquantized (see `modules_to_not_convert`); default: none at 8 bits, the vision
            tower below 8 bits (see the module docstring for the measurements behind that).
    Returns:
        A `TorchAoConfig`, `QuantoConfig` or `BitsAndBytesConfig`.
    """
    _check_backend(backend, weights)
    if keep is None:
        keep = () if weights == "int8" else ("vision_model",)
    skip = modules_to_not_convert(config, keep)
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        return hf_quantization_config.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if backend == "quanto":
        return hf_quantization_config.QuantoConfig(weights=weights, modules_to_not_convert=skip)
    if weights == "int8":
        return hf_quantization_config.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # Computing in the weights' original dtype keeps the unquantized parts and the quantized ones in one dtype.
    return hf_quantization_config.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )


def weight_bytes(model: nn.Module) -> int:
    """
    Bytes held by the parameters and buffers of `model`, counting what quantized weights really store.

    `PreTrainedModel.get_memory_footprint` multiplies each parameter's element count by its nominal element size,
    which torchao and quanto weights report as that of the original dtype, so it shows no saving; here tensor
    subclasses are measured by their inner tensors, and tied weights are counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _leaf_tensors(list(model.parameters()) + list(model.buffers())):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _leaf_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Plain tensors holding the data of `tensors`: tensor subclasses (torchao, quanto) unpacked, and the
    quantization statistics bitsandbytes keeps as attributes (`SCB`, `quant_state`) added."""
    leaves = []
    for tensor in tensors:
        if hasattr(tensor, "__tensor_flatten__"):
            inner_names, _ = tensor.__tensor_flatten__()
            leaves.extend(_leaf_tensors([getattr(tensor, name) for name in inner_names]))
            continue
        leaves.append(tensor)
        extras = [getattr(tensor, "SCB", None)]
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            extras.extend(quant_state.as_dict(packed=True).values())
        leaves.extend(_leaf_tensors([t for t in extras if isinstance(t, torch.Tensor)]))
    return leaves


def _check_backend(backend: str, weights: str) -> None:
    """Refuses backends and widths that `default_quantization_config` does not provide, before anything loads."""
    if backend not in SUPPORTED_WEIGHTS:
        raise ValueError(f"Unknown quantization backend {backend!r}: choose one of {', '.join(SUPPORTED_WEIGHTS)}.")
    if weights not in SUPPORTED_WEIGHTS[backend]:
        others = [name for name, widths in SUPPORTED_WEIGHTS.items() if weights in widths]
        hint = f" Use backend={others[0]!r} for {weights} weights." if others else ""
        why = (
            " (torchao's int4 weight-only tensors need the mslk CUDA kernels: build a TorchAoConfig yourself on a GPU)"
            if backend == "torchao" and weights == "int4"
            else ""
        )
        raise ValueError(
            f"backend={backend!r} does not offer weights={weights!r}{why}; it offers "
            f"{', '.join(SUPPORTED_WEIGHTS[backend])}.{hint}"
        )
    module, install = _BACKEND_PACKAGES[backend]
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"The {backend} quantization backend needs {module.split('.')[-1]}: {install}.") from error


def _openflamingo_config(config: OpenFlamingoConfig | str | os.PathLike) -> OpenFlamingoConfig:
    if isinstance(config, OpenFlamingoConfig):
        return config
    loaded = AutoConfig.from_pretrained(config)
    if not isinstance(loaded, OpenFlamingoConfig):
        raise TypeError(f"{config} holds a {type(loaded).__name__}, not an OpenFlamingo model.")
    return loaded


def _skeleton(config: OpenFlamingoConfig) -> PreTrainedModel:
    """The model built on the meta device (no memory, no weights): its module names and tied weights."""
    with torch.device("meta"):
        # A copy: building a model records settings (attention implementation, ...) in the config it is given.
        return OpenFlamingoForConditionalGeneration(copy.deepcopy(config))


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _output_embedding_names(model: PreTrainedModel) -> list[str]:
    """Names of the output embedding module and of the modules of tied weights (the LM head and input embedding)."""
    output_embedding = model.get_output_embeddings()
    names = [
        name for name, module in model.named_modules() if output_embedding is not None and module is output_embedding
    ]
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    names += [key.removesuffix(".weight") for pair in tied.items() for key in pair]
    return names


__all__ = ["SUPPORTED_WEIGHTS", "default_quantization_config", "modules_to_not_convert", "weight_bytes"]
