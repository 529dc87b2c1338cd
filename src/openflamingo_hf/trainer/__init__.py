"""Training OpenFlamingo on `transformers.Trainer`: the pretraining recipe (two streams) and fine-tuning (LoRA).

    from openflamingo_hf.trainer import (OpenFlamingoTrainer, OpenFlamingoDataCollator, freeze_for_recipe,
                                         build_pair_dataset, build_interleaved_dataset, build_finetune_dataset)

See the README's "Training" section; the command line is `openflamingo-train` (`openflamingo_hf.cli.train`).
"""

from .collator import OpenFlamingoDataCollator
from .data import (
    Video,
    VideoSetupError,
    build_interleaved_dataset,
    build_pair_dataset,
    encode_video_base64,
    expand_shards,
    preprocess_interleaved,
    preprocess_pair,
)
from .finetune import apply_lora, build_finetune_dataset, load_lora, lora_config_for, merge_lora
from .trainer import OpenFlamingoTrainer, freeze_for_recipe

__all__ = [
    "OpenFlamingoDataCollator",
    "OpenFlamingoTrainer",
    "Video",
    "VideoSetupError",
    "apply_lora",
    "build_finetune_dataset",
    "build_interleaved_dataset",
    "build_pair_dataset",
    "encode_video_base64",
    "expand_shards",
    "freeze_for_recipe",
    "load_lora",
    "lora_config_for",
    "merge_lora",
    "preprocess_interleaved",
    "preprocess_pair",
]
