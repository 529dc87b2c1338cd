"""
`OpenFlamingoTrainer`: the OpenFlamingo pretraining recipe (and fine-tuning) on transformers' `Trainer`.

The recipe (open_flamingo 2.0.1 `train_utils.train_one_epoch`) differs from a plain causal-LM run in four ways, each
handled here and nowhere else:

1. Two data streams in every optimisation step (image-caption pairs and interleaved documents), each with its own
   batch size and loss multiplier. The streams are zipped into one dataloader; `training_step` runs forward and
   backward per stream (so only one stream's activations are alive at a time, as in the original loop) and logs
   `loss_<stream>` besides `loss`.
2. Only some parameters train (`freeze_for_recipe`): the Perceiver, the gated cross-attention blocks and, of the LM's
   input embeddings, only the `<image>` and `<|endofchunk|>` rows. Those rows train as a small parameter of their own
   (`EmbeddingRows`): the full embedding weight stays frozen while training, so no vocabulary-sized gradient, gradient
   norm, AdamW update or AdamW state exists, and the rows are copied back into the weight after every optimizer step
   (checkpoints and the final model are the trained model). Where that cannot be done exactly (an output projection
   tied to the embedding without a module of its own, a user-supplied optimizer), the dense gradient is computed and
   all other rows zeroed after every backward, as the original does; either way AdamW leaves them bit-identical.
3. Weight decay applies to every parameter of the gated cross-attention blocks (gates and norms included, as the
   original's `get_grouped_params` decays every name containing `gated_cross_attn`) and to nothing else.
4. A non-finite loss skips the optimisation step (its gradients are dropped on every process) and is counted.

Everything else — optimiser, schedule, clipping, mixed precision, gradient accumulation and checkpointing, logging,
checkpoints and resumption, DDP / FSDP / DeepSpeed through accelerate, PEFT models — is `Trainer`'s own.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .collator import SKIPPED_KEY

logger = logging.get_logger(__name__)


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
    embeddings (of which `OpenFlamingoTrainer` trains only the `<image>` / `<|endofchunk|>` rows, see
    `EmbeddingRows`); everything else frozen.

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
    """The recipe's weight-decay rule, as open_flamingo 2.0.1's `train.py` (`get_grouped_params`): every parameter of
    the gated cross-attention blocks, their tanh gates and LayerNorms included; nothing else (Perceiver, embedding
    rows, LoRA or unfrozen backbones: 0)."""
    return "gated_cross_attn_layers" in name


# ----------------------------------------------------------------------------------------------------------------------
# The embedding-row rule without vocabulary-sized gradients
# ----------------------------------------------------------------------------------------------------------------------


class EmbeddingRows:
    """
    The trainable rows of a frozen input embedding as a parameter of their own: `param` (k, dim) holds rows `ids`.

    While `active`, the embedding weight does not require grad, so backward computes no (vocab, dim) gradient and the
    optimizer holds no (vocab, dim) state; `param` is what the optimizer trains. The forward stays the frozen model's,
    value for value: during a forward (`hooks`) the embedding's output, and a tied output projection's logits, get a
    term `x - x.detach()`, exactly zero, whose gradient is that of the rows. `push` copies `param` into the weight
    after every optimizer step, so the model is the trained model whenever it is saved, and `pull` reads the rows back
    from the weight when training (re)starts, e.g. from a checkpoint. The weight's `requires_grad` is restored on
    `release`, leaving the model as `freeze_for_recipe` set it.
    """

    def __init__(self, embedding: nn.Embedding, head: nn.Linear | None, ids: list[int]):
        self.embedding, self.head = embedding, head
        weight = embedding.weight
        self.ids = torch.tensor(list(dict.fromkeys(ids)), device=weight.device)  # param[j] is row ids[j]
        self.param = nn.Parameter(weight.detach()[self.ids].clone())
        self.active = False

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def activate(self) -> None:
        self.weight.requires_grad_(False)
        self.active = True

    def release(self) -> None:
        self.weight.requires_grad_(True)
        self.active = False

    @torch.no_grad()
    def pull(self) -> None:
        self.param.copy_(self.weight[self.ids])

    @torch.no_grad()
    def push(self) -> None:
        self.weight.index_copy_(0, self.ids, self.param.to(self.weight.dtype))

    @contextlib.contextmanager
    def hooks(self):
        """For one forward call: route the rows' gradients (input side, and the tied output side) to `param`."""
        handles = [self.embedding.register_forward_hook(self._embedding_hook)]
        if self.head is not None:
            handles.append(self.head.register_forward_hook(self._head_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        match = args[0][..., None] == self.ids  # (..., k): which trainable row each token is, if any
        picked = F.embedding(match.int().argmax(-1), self.param) * match.any(-1, keepdim=True)
        return output + (picked - picked.detach()).to(output.dtype)

    def _head_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        columns = F.linear(args[0].detach(), self.param)  # the rows' logits, as the tied weight computes them
        return output.index_add_(-1, self.ids, (columns - columns.detach()).to(output.dtype))


def embedding_rows_for(model: nn.Module, ids: list[int]) -> EmbeddingRows | None:
    """
    `EmbeddingRows` for the model's input embedding, or None where the rows' gradient cannot be rerouted exactly:
    an embedding or output module that is not a plain `nn.Embedding` / `nn.Linear` (scaled, renormalised), or an
    output projection tied to the embedding without a module of its own (MosaicGPT computes its logits from
    `wte.weight` directly).
    """
    embedding = model.get_input_embeddings()
    if type(embedding).forward is not nn.Embedding.forward or embedding.max_norm is not None:
        return None
    head = model.get_output_embeddings()
    if head is embedding:
        return None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return EmbeddingRows(embedding, head, ids) if type(head).forward is nn.Linear.forward else None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is None and getattr(text_config, "tie_word_embeddings", False):
        return None
    return EmbeddingRows(embedding, None, ids)


class _EmbeddingRowsCallback(TrainerCallback):
    """Keeps the embedding weight and the trainer's `EmbeddingRows` in step: read at the start, written back after
    every optimizer step (skipped steps included, whose gradients are dropped)."""

    def __init__(self, trainer: OpenFlamingoTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        rows = self.trainer._active_embedding_rows()
        if rows is not None:
            rows.pull()

    def on_optimizer_step(self, args, state, control, **kwargs):
        rows = self.trainer._active_embedding_rows()
        if rows is not None:
            rows.push()
            rows.param.grad = None


# ----------------------------------------------------------------------------------------------------------------------
# Two streams, one batch each per step
# ----------------------------------------------------------------------------------------------------------------------


class ZippedStreams(IterableDataset):
    """
    Yields `{stream name: batch}` with one batch of every stream, until the shortest stream ends or, with
    `num_steps`, after that many steps: an epoch of the recipe. Each stream is a `DataLoader` of its own (own batch
    size, collator and workers). Served by `StreamsLoader` so that `Trainer` (and accelerate's `skip_first_batches`
    on resumption) see a standard dataloader.
    """

    def __init__(self, loaders: Mapping[str, DataLoader], num_steps: int | None = None, skip_steps: int = 0):
        self.loaders = dict(loaders)
        self.num_steps = num_steps
        self.skip_steps = skip_steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        for step in itertools.count():
            if self.num_steps is not None and step >= self.num_steps:
                return
            batches = {}
            for name, iterator in iterators.items():
                try:
                    batches[name] = next(iterator)
                except StopIteration:
                    return
            if step >= self.skip_steps:
                yield batches

    def __len__(self) -> int:
        # TypeError when a stream has no length: `Trainer` then needs `max_steps`, as for any iterable dataset.
        steps = self.num_steps if self.num_steps is not None else min(len(loader) for loader in self.loaders.values())
        return max(steps - self.skip_steps, 0)

    def set_epoch(self, epoch: int) -> None:
        """Every stream draws epoch `epoch`'s order (`datasets`' `set_epoch`: shard order, shuffle buffer, draws)."""
        for loader in self.loaders.values():
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)

    def skipping(self, steps: int) -> ZippedStreams:
        """The same epoch with its first `steps` steps read and dropped (resumption in the middle of an epoch)."""
        return ZippedStreams(self.loaders, self.num_steps, self.skip_steps + steps)


class StreamsLoader(DataLoader):
    """`DataLoader(ZippedStreams, batch_size=None)` whose `set_epoch`, which `Trainer` calls at the start of every
    epoch, reaches the streams."""

    def __init__(self, streams: ZippedStreams):
        super().__init__(streams, batch_size=None)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def _shard_for_process(dataset, process_index: int, num_processes: int):
    """
    This process's share of a stream, disjoint across processes: whole shards (as the original's `split_by_node`)
    when there are at least as many as processes, else every n-th example.
    """
    if num_processes <= 1:
        return dataset
    from datasets import Dataset as HFDataset
    from datasets import IterableDataset as HFIterableDataset
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, HFIterableDataset):
        strategy = "shards" if dataset.num_shards >= num_processes else "examples"
        return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes, strategy=strategy)
    if isinstance(dataset, HFDataset):
        return split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    raise TypeError(
        f"Streams must be `datasets` datasets to be split over {num_processes} processes; got "
        f"{type(dataset).__name__}. Wrap it with datasets.IterableDataset.from_generator."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def clear_tokenizer_call_settings(processing_class: Any) -> None:
    """
    Drops the padding and truncation that the last tokenizer call left on a fast tokenizer's backend, so that a saved
    `tokenizer.json` holds none. transformers sets them on the backend for each call (training pads and truncates to
    `max_length`) and leaves them there; saved, they would load as the tokenizer's defaults and every later call
    (`generate`'s prompts too) would warn about them. Each call sets its own again, so nothing else changes.

    Args:
        processing_class: a processor with a `tokenizer`, or a tokenizer; one without a `tokenizers` backend (a slow
            tokenizer, an image processor) is left as it is.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()


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
        samples_per_epoch: `{name: samples}`, the original's `--train_num_samples_<name>`: an epoch of each stream
            is ceil(samples / (batch size x processes)) batches, the recipe's epoch that of the shortest, and the
            dataloader then has that length (epochs count for `num_train_epochs`, resumption and `set_epoch`).
            The streams must be long enough (build them with `repeat=True` or `resampled=True`). Default: an
            epoch ends when a stream ends.
        loss_multipliers: weight of each stream's loss in the step's loss (default 1.0 each; v2 used laion 0.2).
        trainable_embedding_ids: the input-embedding rows that train (default: the model config's `<image>` and
            `<|endofchunk|>` ids). The filter applies while the input embeddings are the only trainable part of the
            LM (it is off when the whole LM trains, see `freeze_for_recipe`); those rows then train as
            `EmbeddingRows`, a parameter group of their own in the optimizer this trainer creates.
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
        samples_per_epoch: Mapping[str, int] | None = None,
        loss_multipliers: Mapping[str, float] | None = None,
        trainable_embedding_ids: list[int] | None = None,
        loss_logits_only: bool = True,
        **kwargs,
    ):
        if streams is not None and kwargs.get("train_dataset") is not None:
            raise ValueError("Pass either streams (the two-stream recipe) or train_dataset, not both.")
        super().__init__(*args, **kwargs)
        self.streams = dict(streams) if streams is not None else None
        unknown = set(stream_batch_sizes or {}) | set(loss_multipliers or {}) | set(samples_per_epoch or {})
        unknown -= set(self.streams or {})
        if unknown:
            raise ValueError(
                f"Batch sizes, samples per epoch or loss multipliers given for unknown streams {sorted(unknown)}."
            )
        if samples_per_epoch is not None and set(samples_per_epoch) != set(self.streams or {}):
            raise ValueError(
                f"samples_per_epoch must give every stream's samples ({sorted(self.streams or {})}), got "
                f"{sorted(samples_per_epoch)}."
            )
        self.stream_batch_sizes = dict(stream_batch_sizes or {})
        self.samples_per_epoch = dict(samples_per_epoch) if samples_per_epoch is not None else None
        self.loss_multipliers = dict(loss_multipliers or {})
        config = self.accelerator.unwrap_model(self.model).config
        if trainable_embedding_ids is None:
            trainable_embedding_ids = [i for i in (config.media_token_id, config.eoc_token_id) if i is not None]
        self.trainable_embedding_ids = list(trainable_embedding_ids)
        self.loss_logits_only = loss_logits_only
        self._stream_losses: dict[str, list[torch.Tensor]] = {}
        self.skipped_samples: Counter = Counter()
        self.nonfinite_steps = 0
        self._embedding_rows: EmbeddingRows | None = None
        self.callback_handler.callbacks.insert(0, _EmbeddingRowsCallback(self))  # before any callback that saves

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
        return StreamsLoader(ZippedStreams(loaders, num_steps=self.steps_per_epoch))

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimisation steps in an epoch of the recipe (see `samples_per_epoch`); None without it."""
        if self.samples_per_epoch is None:
            return None
        return min(
            math.ceil(samples / (self.stream_batch_sizes.get(name, self.args.per_device_train_batch_size)
                                 * self.args.world_size))
            for name, samples in self.samples_per_epoch.items()
        )

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        if isinstance(dataloader, StreamsLoader):
            # The epoch's own order (set_epoch follows), its first steps read and dropped.
            return StreamsLoader(dataloader.dataset.skipping(num_batches))
        return super().get_resumed_dataloader(dataloader, num_batches)

    # ---------------------------------------------------------------- optimisation
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if is_decayed_parameter(name)]

    def create_optimizer(self, model: nn.Module | None = None):
        creating = self.optimizer is None
        if creating:
            self._start_embedding_rows()
        optimizer = super().create_optimizer(model)
        if creating and self._embedding_rows is not None:
            optimizer.add_param_group({"params": [self._embedding_rows.param], "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs=False, num_items_in_batch=None):
        full_logits_needed = self.label_smoother is not None or self.compute_loss_func is not None
        if self.loss_logits_only and model.training and "labels" in inputs and not full_logits_needed:
            inputs = {**inputs, "loss_logits_only": True}
        rows = self._active_embedding_rows()
        with rows.hooks() if rows is not None and torch.is_grad_enabled() else contextlib.nullcontext():
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self.streams is None:
            self._count_skipped(inputs.pop(SKIPPED_KEY, None))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._mask_embedding_gradients(model)
            self._reduce_embedding_rows_gradient()
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
        self._reduce_embedding_rows_gradient()
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
        if self._embedding_rows is not None:
            self._embedding_rows.param.grad = None
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
        if self._embedding_rows is not None:  # a later train() with the same optimizer: the rows train again
            self._embedding_rows.activate()
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._embedding_rows is not None:
                self._embedding_rows.release()

    # ---------------------------------------------------------------- the embedding rows
    def _start_embedding_rows(self) -> None:
        """With a new optimizer: train the embedding rows as `EmbeddingRows` where the rule applies and they can."""
        if self._embedding_rows is not None:
            self._embedding_rows.release()
            self._embedding_rows = None
        if not self._embedding_rule_applies(self.model):
            return
        rows = embedding_rows_for(self.accelerator.unwrap_model(self.model), self.trainable_embedding_ids)
        if rows is None:
            logger.info("The input embedding's trainable rows train through its masked full gradient (a scaled "
                        "embedding, or an output projection tied to it without a module of its own).")
            return
        rows.activate()
        self._embedding_rows = rows

    def _active_embedding_rows(self) -> EmbeddingRows | None:
        rows = self._embedding_rows
        return rows if rows is not None and rows.active else None

    def _reduce_embedding_rows_gradient(self) -> None:
        """Averages the rows' gradient over processes at each synchronising step, as DDP does for the model's."""
        rows = self._active_embedding_rows()
        if rows is None or rows.param.grad is None or self.args.world_size <= 1 or not self.accelerator.sync_gradients:
            return
        rows.param.grad = self.accelerator.reduce(rows.param.grad, reduction="mean")

    def _clip_grad_norm(self, model: nn.Module):
        rows = self._active_embedding_rows()
        if rows is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), rows.param], self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        rows = self._active_embedding_rows()
        if grad_norm is None and rows is not None:
            grad_norm = self.accelerator.clip_grad_norm_([*model.parameters(), rows.param], float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

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
        """Zero the input-embedding gradient on every row but the trainable ones (the recipe's embedding rule, where
        the rows do not train as `EmbeddingRows`)."""
        if not self._embedding_rule_applies(model):
            return
        weight = self.accelerator.unwrap_model(model).get_input_embeddings().weight
        if weight.grad is None:
            return
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.grad.dtype, device=weight.grad.device)
        keep[self.trainable_embedding_ids] = 1
        weight.grad.mul_(keep)

    # ---------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every save (checkpoints, `save_model`) writes the processor: without the training's padding / truncation.
        clear_tokenizer_call_settings(self.processing_class)
        super()._save(output_dir, state_dict=state_dict)

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


__all__ = [
    "EmbeddingRows",
    "OpenFlamingoTrainer",
    "StreamsLoader",
    "ZippedStreams",
    "clear_tokenizer_call_settings",
    "embedding_rows_for",
    "freeze_for_recipe",
    "is_decayed_parameter",
]
