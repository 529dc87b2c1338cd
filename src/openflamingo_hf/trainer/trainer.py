"""
`OpenFlamingoTrainer`: the OpenFlamingo pretraining recipe (and fine-tuning) on transformers' `Trainer`.

The recipe (open_flamingo 2.0.1 `train_utils.train_one_epoch`) differs from a plain causal-LM run in four ways, each
handled here and nowhere else:

1. Two data streams in every optimisation step (image-caption pairs and interleaved documents), each with its own
   batch size and loss multiplier. The streams are zipped into one dataloader; `training_step` runs forward and
   backward per stream (so only one stream's activations are alive at a time, as in the original loop) and logs
   `loss_<stream>` besides `loss`.
2. Only some parameters train (`freeze_for_recipe`): the Perceiver, the gated cross-attention blocks and, of the LM's
   input embeddings, only the `<image>` and `<|endofchunk|>` rows (the other rows' gradients are zeroed after every
   backward, so AdamW leaves them bit-identical).
3. Weight decay applies to the gated cross-attention weights only (not their gates, norms or biases).
4. A non-finite loss skips the optimisation step (its gradients are dropped on every process) and is counted.

Everything else — optimiser, schedule, clipping, mixed precision, gradient accumulation and checkpointing, logging,
checkpoints and resumption, DDP / FSDP / DeepSpeed through accelerate, PEFT models — is `Trainer`'s own.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.utils import logging

from .collator import SKIPPED_KEY

logger = logging.get_logger(__name__)

# Parameter-name parts of what the recipe trains besides the input embeddings.
RECIPE_TRAINABLE_MODULES = ("perceiver", "gated_cross_attn_layers")


# ----------------------------------------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------------------------------------


def freeze_for_recipe(
    model: nn.Module,
    train_language_model: bool = False,
    train_vision_model: bool = False,
    freeze_lm_embeddings: bool = False,
) -> dict[str, int]:
    """
    Sets `requires_grad` as the recipe trains: the Perceiver, the gated cross-attention blocks and the LM's input
    embeddings (of which `OpenFlamingoTrainer` keeps only the `<image>` / `<|endofchunk|>` rows' gradients);
    everything else frozen.

    Args:
        model: an `OpenFlamingoForConditionalGeneration`.
        train_language_model: also train the whole LM (then every embedding row trains too).
        train_vision_model: also train the vision tower.
        freeze_lm_embeddings: keep the LM's input embeddings frozen as well (the original's `--freeze_lm_embeddings`).
    Returns:
        Parameter counts: `{"trainable": ..., "total": ...}`.
    """
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.gated_cross_attn_layers.requires_grad_(True)
    if train_language_model:
        model.language_model.requires_grad_(True)
    elif not freeze_lm_embeddings:
        model.get_input_embeddings().requires_grad_(True)
    if train_vision_model:
        model.vision_model.requires_grad_(True)
    counts = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
    logger.info(f"Training {counts['trainable']:,} of {counts['total']:,} parameters.")
    return counts


def is_decayed_parameter(name: str) -> bool:
    """The recipe's weight-decay rule: gated cross-attention weights, but not their gates, norms or biases."""
    return (
        "gated_cross_attn_layers" in name
        and not any(part in name for part in ("attn_gate", "ff_gate", "norm", "bias"))
    )


# ----------------------------------------------------------------------------------------------------------------------
# Two streams, one batch each per step
# ----------------------------------------------------------------------------------------------------------------------


class ZippedStreams(IterableDataset):
    """
    Yields `{stream name: batch}` with one batch of every stream, until the shortest stream ends. Each stream is a
    `DataLoader` of its own (own batch size, collator and workers). Wrapped in a `DataLoader(batch_size=None)` so that
    `Trainer` (and accelerate's `skip_first_batches` on resumption) see a standard dataloader.
    """

    def __init__(self, loaders: Mapping[str, DataLoader]):
        self.loaders = dict(loaders)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        while True:
            batches = {}
            for name, iterator in iterators.items():
                try:
                    batches[name] = next(iterator)
                except StopIteration:
                    return
            yield batches

    def __len__(self) -> int:
        # TypeError when a stream has no length: `Trainer` then needs `max_steps`, as for any iterable dataset.
        return min(len(loader) for loader in self.loaders.values())


def _shard_for_process(dataset, process_index: int, num_processes: int):
    """This process's share of a stream: disjoint across processes (shards, else every n-th example)."""
    if num_processes <= 1:
        return dataset
    from datasets import Dataset as HFDataset
    from datasets import IterableDataset as HFIterableDataset
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, (HFDataset, HFIterableDataset)):
        return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    raise TypeError(
        f"Streams must be `datasets` datasets to be split over {num_processes} processes; got "
        f"{type(dataset).__name__}. Wrap it with datasets.IterableDataset.from_generator."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


class OpenFlamingoTrainer(Trainer):
    """
    `Trainer` with the OpenFlamingo recipe (see the module docstring).

    Args:
        streams: `{name: dataset}` for the two-stream recipe, e.g. `{"laion": pairs, "mmc4": documents}` (datasets
            of samples as `openflamingo_hf.trainer.data` yields them); every optimisation step takes one batch of
            each. Without `streams`, `train_dataset` trains as with `Trainer` (fine-tuning).
        stream_batch_sizes: per-device batch size of each stream (default: `per_device_train_batch_size`).
        loss_multipliers: weight of each stream's loss in the step's loss (default 1.0 each; v2 used laion 0.2).
        trainable_embedding_ids: the input-embedding rows that train (default: the model config's `<image>` and
            `<|endofchunk|>` ids). The filter applies while the input embeddings are the only trainable part of the
            LM (it is off when the whole LM trains, see `freeze_for_recipe`).
        loss_logits_only: training forwards apply the LM head only where the next token carries a label (the
            model's `loss_logits_only`): the same loss for less time and memory. Off with label smoothing or a
            `compute_loss_func`, which need the logits of every position.
        **kwargs: `Trainer` arguments (`model`, `args`, `data_collator`, `processing_class`, ...).
    """

    def __init__(
        self,
        *args,
        streams: Mapping[str, Any] | None = None,
        stream_batch_sizes: Mapping[str, int] | None = None,
        loss_multipliers: Mapping[str, float] | None = None,
        trainable_embedding_ids: list[int] | None = None,
        loss_logits_only: bool = True,
        **kwargs,
    ):
        if streams is not None and kwargs.get("train_dataset") is not None:
            raise ValueError("Pass either streams (the two-stream recipe) or train_dataset, not both.")
        super().__init__(*args, **kwargs)
        self.streams = dict(streams) if streams is not None else None
        unknown = set(stream_batch_sizes or {}) | set(loss_multipliers or {})
        unknown -= set(self.streams or {})
        if unknown:
            raise ValueError(f"Batch sizes or loss multipliers given for unknown streams {sorted(unknown)}.")
        self.stream_batch_sizes = dict(stream_batch_sizes or {})
        self.loss_multipliers = dict(loss_multipliers or {})
        config = self.accelerator.unwrap_model(self.model).config
        if trainable_embedding_ids is None:
            trainable_embedding_ids = [i for i in (config.media_token_id, config.eoc_token_id) if i is not None]
        self.trainable_embedding_ids = list(trainable_embedding_ids)
        self.loss_logits_only = loss_logits_only
        self._stream_losses: dict[str, list[torch.Tensor]] = {}
        self.skipped_samples: Counter = Counter()
        self.nonfinite_steps = 0

    # ---------------------------------------------------------------- data
    def get_train_dataloader(self) -> DataLoader:
        if self.streams is None:
            return super().get_train_dataloader()
        args = self.args
        loaders = {}
        for name, dataset in self.streams.items():
            loaders[name] = DataLoader(
                _shard_for_process(dataset, args.process_index, args.world_size),
                batch_size=self.stream_batch_sizes.get(name, args.per_device_train_batch_size),
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory,
                persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
                drop_last=True,
            )
        # Not passed through accelerator.prepare: each process already reads its own share of every stream, and
        # `_prepare_inputs` moves each batch to the device.
        return DataLoader(ZippedStreams(loaders), batch_size=None)

    # ---------------------------------------------------------------- optimisation
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if is_decayed_parameter(name)]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs=False, num_items_in_batch=None):
        full_logits_needed = self.label_smoother is not None or self.compute_loss_func is not None
        if self.loss_logits_only and model.training and "labels" in inputs and not full_logits_needed:
            inputs = {**inputs, "loss_logits_only": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self.streams is None:
            self._count_skipped(inputs.pop(SKIPPED_KEY, None))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._mask_embedding_gradients(model)
            return loss
        return self._two_stream_step(model, inputs)

    def _two_stream_step(self, model: nn.Module, batches: dict[str, dict[str, Any]]) -> torch.Tensor:
        """Forward and backward per stream (one stream's activations alive at a time); returns the weighted loss."""
        model.train()
        # DeepSpeed steps its engine inside every `backward`, so there the streams' losses are summed and
        # backpropagated once (both streams' activations alive together).
        one_backward = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        total, pending = torch.zeros((), device=self.args.device), []
        names = list(batches)
        for position, name in enumerate(names):
            batch = dict(batches[name])
            self._count_skipped(batch.pop(SKIPPED_KEY, None))
            batch = self._prepare_inputs(batch)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch)
            if not self._finite_everywhere(loss):
                self._skip_step(model, name)
                return torch.zeros((), device=self.args.device)
            self._stream_losses.setdefault(name, []).append(loss.detach())
            weighted = loss * self.loss_multipliers.get(name, 1.0) / self.current_gradient_accumulation_steps
            total += weighted.detach()
            if one_backward:
                pending.append(weighted)
                continue
            # Gradients are reduced across processes once per micro-batch, at the last stream's backward.
            last = position == len(names) - 1
            with self.accelerator.no_sync(model) if not last else contextlib.nullcontext():
                self.accelerator.backward(weighted)
        if pending:
            self.accelerator.backward(torch.stack(pending).sum(), scale_wrt_gas=False)
        self._mask_embedding_gradients(model)
        return total

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (all must agree, or a skipped backward would hang DDP)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return not bool(bad.item())

    def _skip_step(self, model: nn.Module, stream: str) -> None:
        # Gradients of None make AdamW leave every parameter (and its moments) as it is.
        model.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        logger.warning(
            f"Non-finite {stream} loss at step {self.state.global_step}: skipping the step "
            f"({self.nonfinite_steps} skipped so far)."
        )

    def train(self, *args, **kwargs):
        if self._embedding_rule_applies(self.model) and self.accelerator.distributed_type in (
            DistributedType.DEEPSPEED, DistributedType.FSDP
        ):
            raise ValueError(
                f"With {self.accelerator.distributed_type.value} the gradients are sharded, so the recipe's rule that "
                "only the <image> and <|endofchunk|> rows of the input embeddings train cannot be applied. Freeze "
                "the embeddings (freeze_for_recipe(..., freeze_lm_embeddings=True), CLI --freeze_lm_embeddings) or "
                "use DDP."
            )
        return super().train(*args, **kwargs)

    def _embedding_rule_applies(self, model: nn.Module) -> bool:
        """The input embeddings train while the rest of the LM is frozen: then only some of their rows may train."""
        unwrapped = self.accelerator.unwrap_model(model)
        language_model = getattr(unwrapped, "language_model", None)
        if language_model is None or not self.trainable_embedding_ids:
            return False
        weight = unwrapped.get_input_embeddings().weight
        return weight.requires_grad and not any(
            p.requires_grad for p in language_model.parameters() if p is not weight
        )

    def _mask_embedding_gradients(self, model: nn.Module) -> None:
        """Zero the input-embedding gradient on every row but the trainable ones (the recipe's embedding rule)."""
        if not self._embedding_rule_applies(model):
            return
        weight = self.accelerator.unwrap_model(model).get_input_embeddings().weight
        if weight.grad is None:
            return
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.grad.dtype, device=weight.grad.device)
        keep[self.trainable_embedding_ids] = 1
        weight.grad.mul_(keep)

    # ---------------------------------------------------------------- logging
    def _count_skipped(self, skipped: dict[str, int] | None) -> None:
        if skipped:
            self.skipped_samples.update(skipped)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stream_losses:  # a training log: add each stream's mean since the last one
            for name, losses in self._stream_losses.items():
                mean = torch.stack(losses).mean()
                if self.args.world_size > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[f"loss_{name}"] = round(float(mean), 4)
            self._stream_losses = {}
        if "loss" in logs or "train_loss" in logs:
            if self.skipped_samples:
                # `image_*` reasons count images dropped from documents that were kept; the rest count samples.
                logs["skipped_samples"] = sum(
                    count for reason, count in self.skipped_samples.items() if not reason.startswith("image_")
                )
                logs.update({f"skipped_{reason}": count for reason, count in sorted(self.skipped_samples.items())})
            if self.nonfinite_steps:
                logs["nonfinite_steps"] = self.nonfinite_steps
        if "train_loss" in logs and (self.skipped_samples or self.nonfinite_steps):
            logger.warning(
                f"Skipped during training: {dict(self.skipped_samples)} samples by reason, "
                f"{self.nonfinite_steps} non-finite steps."
            )
        super().log(logs, start_time)


__all__ = ["OpenFlamingoTrainer", "ZippedStreams", "freeze_for_recipe", "is_decayed_parameter"]
