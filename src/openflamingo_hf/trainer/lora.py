"""
LoRA adapters for OpenFlamingo, on PEFT.

`apply_lora(model, targets=("language_model", "gated_cross_attn_layers"))` wraps the model in a `peft.PeftModel`
with LoRA on the linear layers under the chosen parts only; everything else is frozen. The target list is built
from the model's own module names, so the vision tower and the perceiver (whose layers share names like `q_proj`,
`fc1` or `to_q` with the language model and the gated blocks) are never adapted. Save with
`peft_model.save_pretrained(dir)`, load with `load_lora(model, dir)` (or `PeftModel.from_pretrained`), fold the
adapter into the weights with `merge_lora(peft_model)`. `peft_model.generate(...)` takes the same arguments as
`model.generate(...)` (`pixel_values` included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

# Parts of OpenFlamingo that LoRA may adapt (all of them by default), and parts it never touches.
LORA_TARGET_PARTS = ("language_model", "gated_cross_attn_layers")
LORA_EXCLUDED_PARTS = ("vision_model", "perceiver")


def _adaptable_module_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def check_lora_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """
    `targets` as a tuple, checked without a model: each is a part LoRA may adapt (`language_model`,
    `gated_cross_attn_layers`) or a module path under one. Raises `ValueError` saying why not (the vision side and
    the Perceiver are never adapted).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError(f"`targets` is empty; choose from {list(LORA_TARGET_PARTS)} (or paths under them).")
    for target in targets:
        part = target.split(".", 1)[0]
        if part not in LORA_TARGET_PARTS:
            why = (
                f"LoRA never adapts {part!r}: OpenFlamingo keeps its vision side frozen. "
                if part in LORA_EXCLUDED_PARTS
                else ""
            )
            raise ValueError(
                f"{why}LoRA target {target!r} is not under {list(LORA_TARGET_PARTS)}; use those parts or module paths "
                "under them."
            )
    return targets


def lora_target_modules(model: nn.Module, targets: str | Sequence[str] = LORA_TARGET_PARTS) -> list[str]:
    """
    The full names of the linear layers (`nn.Linear`, and GPT-2's `Conv1D`) under `targets`, for
    `LoraConfig(target_modules=...)`.

    Args:
        model: an `OpenFlamingoForConditionalGeneration` (not yet wrapped by PEFT).
        targets: module paths under `language_model` or `gated_cross_attn_layers`: the parts themselves, or
            narrower paths such as `"gated_cross_attn_layers.3"` or `"language_model.model.layers.0"`. The language
            model's output embedding (`lm_head`) is never included (it is large and often tied to the input
            embedding; train it with `modules_to_save` if needed).

    Raises:
        `ValueError` for a target outside those two parts (`vision_model` / `perceiver` are never adapted), a target
        that is not a module of the model, or targets without linear layers.
    """
    targets = check_lora_targets(targets)
    if _is_peft_model(model):
        raise ValueError("The model is already a PeftModel; pass the base OpenFlamingo model.")
    for target in targets:
        try:
            model.get_submodule(target)
        except AttributeError:
            raise ValueError(f"LoRA target {target!r} is not a module of the model.") from None

    output_embeddings = None
    language_model = getattr(model, "language_model", None)
    if language_model is not None and hasattr(language_model, "get_output_embeddings"):
        output_embeddings = language_model.get_output_embeddings()
    adaptable = _adaptable_module_types()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, adaptable) or module is output_embeddings:
            continue
        if name.split(".", 1)[0] in LORA_EXCLUDED_PARTS:
            continue
        if any(name == target or name.startswith(target + ".") for target in targets):
            names.append(name)
    if not names:
        raise ValueError(f"No linear layer under the LoRA targets {list(targets)}.")
    return sorted(names)


def lora_config_for(
    model: nn.Module,
    targets: str | Sequence[str] = LORA_TARGET_PARTS,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    **kw,
):
    """
    A `peft.LoraConfig` adapting only the linear layers under `targets` (see `lora_target_modules`):
    `target_modules` is the explicit list of their full names, so a layer of the vision tower or perceiver that
    shares a name (`q_proj`, `fc1`, `to_q`, ...) is never caught.

    Args:
        model: the base `OpenFlamingoForConditionalGeneration`.
        targets: `"language_model"`, `"gated_cross_attn_layers"`, both (default), or module paths under them.
        r, alpha, dropout: LoRA rank, `lora_alpha` and `lora_dropout`.
        **kw: other `LoraConfig` fields (`bias`, `modules_to_save`, `use_rslora`, `init_lora_weights`, ...).
            `task_type` defaults to `None`: a plain `PeftModel`, which passes every argument of `forward` /
            `generate` (`pixel_values` included) to OpenFlamingo unchanged.
    """
    from peft import LoraConfig

    for key in ("target_modules", "exclude_modules"):
        if key in kw:
            raise TypeError(f"lora_config_for builds `{key}` itself from `targets`; pass `targets` instead.")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, targets),
        **kw,
    )


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] = LORA_TARGET_PARTS,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    config=None,
    adapter_name: str = "default",
    **kw,
):
    """
    Wraps `model` in a `peft.PeftModel` with LoRA adapters (in place: the model's layers are replaced by LoRA
    layers). Only the adapter weights (and any `modules_to_save`) are trainable; everything else is frozen.

    Args:
        model: the base `OpenFlamingoForConditionalGeneration`.
        targets, r, alpha, dropout, **kw: as for `lora_config_for`.
        config: a ready `LoraConfig` to use instead (it may not adapt the vision tower or perceiver).
        adapter_name: the adapter's name.

    Returns:
        `peft.PeftModel`; `peft_model(**batch)` and `peft_model.generate(...)` take OpenFlamingo's arguments.
    """
    from peft import get_peft_model

    if config is None:
        config = lora_config_for(model, targets, r=r, alpha=alpha, dropout=dropout, **kw)
    elif kw:
        raise TypeError(f"Pass LoRA settings either in `config` or as arguments, not both (got {sorted(kw)}).")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    check_lora_placement(peft_model)
    return peft_model


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False, **kwargs):
    """
    Loads an adapter saved with `peft_model.save_pretrained(adapter_dir)` onto a base model
    (`PeftModel.from_pretrained`), checking that it adapts neither the vision tower nor the perceiver.

    Args:
        model: the base `OpenFlamingoForConditionalGeneration` the adapter was trained on.
        adapter_dir: the adapter's folder (or Hub id).
        is_trainable: `True` to keep training the adapter; `False` (default) loads it for inference.
        **kwargs: passed to `PeftModel.from_pretrained`.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, os.fspath(adapter_dir), is_trainable=is_trainable, **kwargs)
    check_lora_placement(peft_model)
    return peft_model


def merge_lora(peft_model, safe_merge: bool = False):
    """
    Folds the LoRA adapters into the base weights (`merge_and_unload`) and returns the plain
    `OpenFlamingoForConditionalGeneration`, which saves and loads like any other (no PEFT needed). The parameters
    frozen by `apply_lora` stay frozen (`requires_grad=False`).

    Args:
        peft_model: a `PeftModel` from `apply_lora` / `load_lora`.
        safe_merge: check the merged weights for NaNs before replacing the originals.
    """
    if not _is_peft_model(peft_model):
        raise TypeError(f"merge_lora needs a peft.PeftModel, got {type(peft_model).__name__}.")
    return peft_model.merge_and_unload(safe_merge=safe_merge)


def lora_module_names(model: nn.Module) -> list[str]:
    """Names (relative to the OpenFlamingo model) of the modules that carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if _is_peft_model(model) else model
    return [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]


def check_lora_placement(model: nn.Module) -> None:
    """Raises a `ValueError` if a LoRA layer sits in the vision tower or the perceiver."""
    misplaced = [name for name in lora_module_names(model) if name.split(".", 1)[0] in LORA_EXCLUDED_PARTS]
    if misplaced:
        raise ValueError(
            f"The LoRA config adapts {len(misplaced)} layers of {list(LORA_EXCLUDED_PARTS)} (e.g. {misplaced[0]!r}); "
            "OpenFlamingo's vision side stays frozen. Build the config with `lora_config_for(model, targets=...)`."
        )


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is part of the training extra
        return False
    return isinstance(model, PeftModel)


__all__ = [
    "LORA_EXCLUDED_PARTS",
    "LORA_TARGET_PARTS",
    "apply_lora",
    "check_lora_placement",
    "check_lora_targets",
    "load_lora",
    "lora_config_for",
    "lora_module_names",
    "lora_target_modules",
    "merge_lora",
]
