"""`OpenFlamingoTrainingArguments`: `TrainingArguments` with the OpenFlamingo pretraining recipe's defaults.

    from openflamingo_hf.trainer import OpenFlamingoTrainer, OpenFlamingoTrainingArguments

    args = OpenFlamingoTrainingArguments("out", max_steps=10_000)   # AdamW 1e-4, 5000 warmup steps, then constant
    trainer = OpenFlamingoTrainer(model=model, args=args, streams=..., ...)

`openflamingo-train` parses its `TrainingArguments` flags into this class, so the command line and Python start from
the same values; every field can still be set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class OpenFlamingoTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the recipe's defaults (AdamW 1e-4, decay 0.1 on xattn, 5000 warmup, constant)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (the recipe's 1e-4)."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "Weight decay, applied to the gated cross-attention blocks only (all their "
                                      "parameters, as the original)."}
    )
    warmup_steps: float = field(default=5000, metadata={"help": "Linear warmup steps (the recipe's 5000)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata={"help": "Schedule after warmup (constant, linear, cosine, ...)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: samples carry skip counts."})


__all__ = ["OpenFlamingoTrainingArguments"]
