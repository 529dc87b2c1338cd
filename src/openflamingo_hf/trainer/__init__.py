"""Training OpenFlamingo on `transformers.Trainer`: the pretraining recipe (two streams) and fine-tuning (LoRA).

    from openflamingo_hf.trainer import (OpenFlamingoTrainer, OpenFlamingoTrainingArguments, OpenFlamingoDataCollator,
                                         freeze_for_recipe, build_pair_dataset, build_interleaved_dataset,
                                         build_finetune_dataset)

One module per concern: `trainer` (`OpenFlamingoTrainer`, what trains), `training_args` (the recipe's
`TrainingArguments`), `collator`, `data` (the recipe's two streams and how each sample is selected),
`shard_reading` (shard readers, skip reasons), `shard_writing` (`write_pair_shard`, `write_interleaved_shard`),
`finetune` (JSONL fine-tuning data) and `lora` (LoRA adapters on PEFT).

See the README's "Training" section; the command line is `openflamingo-train` (`openflamingo_hf.cli.train`).
"""

import importlib
from typing import TYPE_CHECKING

# The names below, by the module that defines them. They are imported on first use, so that importing one module of
# the package (e.g. `shard_writing` to write shards, `training_args` for the command line's parser) does not import
# the others (`Trainer`, `datasets`, PEFT).
_EXPORTS = {
    "collator": ["OpenFlamingoDataCollator"],
    "data": ["build_interleaved_dataset", "build_pair_dataset", "preprocess_interleaved", "preprocess_pair"],
    "finetune": ["build_finetune_dataset"],
    "lora": ["apply_lora", "load_lora", "lora_config_for", "merge_lora"],
    "shard_reading": ["Video", "VideoSetupError", "expand_shards"],
    "shard_writing": ["encode_video_base64"],
    "trainer": ["OpenFlamingoTrainer", "freeze_for_recipe"],
    "training_args": ["OpenFlamingoTrainingArguments"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    from .collator import OpenFlamingoDataCollator
    from .data import build_interleaved_dataset, build_pair_dataset, preprocess_interleaved, preprocess_pair
    from .finetune import build_finetune_dataset
    from .lora import apply_lora, load_lora, lora_config_for, merge_lora
    from .shard_reading import Video, VideoSetupError, expand_shards
    from .shard_writing import encode_video_base64
    from .trainer import OpenFlamingoTrainer, freeze_for_recipe
    from .training_args import OpenFlamingoTrainingArguments


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = sorted(_MODULE_OF)
