"""`openflamingo-train`: the OpenFlamingo pretraining recipe, or fine-tuning, on `OpenFlamingoTrainer`.

    # Pretraining from backbones: image-caption pairs and interleaved documents in every step.
    openflamingo-train --vision_model openai/clip-vit-large-patch14 --language_model anas-awadalla/mpt-1b-redpajama-200b \
        --laion_shards "laion/{00000..01000}.tar" --mmc4_shards "mmc4/{00000..01000}.tar" \
        --batch_size_laion 32 --batch_size_mmc4 8 --loss_multiplier_laion 0.2 --max_steps 100000 --output_dir out
    # Fine-tuning a trained model on a JSONL of examples, with LoRA.
    openflamingo-train --model_name_or_path ./OpenFlamingo-3B-hf --finetune_data data.jsonl --lora --output_dir ft

Shards may hold videos in place of images (conventions in `openflamingo_hf.trainer.shard_reading`); each video takes one media
slot of `--num_frames` frames sampled uniformly. To tell the order of the frames the model needs learned frame
embeddings: from backbones, add `"perceiver_max_num_frames": N` to --config_overrides.

The streams are drawn as the original draws them, per epoch: each stream's shard list shuffled (seeded by --seed and
the epoch) and split by whole shards over processes and DataLoader workers, or with --dataset_resampled shards drawn
with replacement by every process and worker; samples through a --shuffle_buffer_size buffer (5000). An epoch is
--train_num_samples_* samples (or one pass over the shards); a resumed run continues the same epoch's order.

Flags follow the original `open_flamingo/train/train.py` where the concept is the same; every `TrainingArguments` flag
works too (`--bf16`, `--gradient_checkpointing`, `--save_steps`, `--resume_from_checkpoint`, ...). Scale out with
`accelerate launch --config_file examples/accelerate/<ddp|fsdp|deepspeed_zero2|deepspeed_zero3>.yaml -m
openflamingo_hf.cli.train ...`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ..trainer.training_args import OpenFlamingoTrainingArguments
from .parsing import UsageError, check_hub_reachable, check_model_source, parse_config_overrides, require_extra
from ..cpu_threads import THREADS_HELP, set_cpu_threads

# Light at import: models, datasets and peft are imported when a run starts.


@dataclass
class ModelArguments:
    """Where the model comes from and what of it trains."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An OpenFlamingo folder or Hub id to continue from (AutoModelForImageTextToText)."},
    )
    vision_model: str | None = field(
        default=None,
        metadata={"help": "Vision backbone (name or folder; a full CLIP contributes its vision tower). Its folder's "
                          "image processor is used, else OpenAI CLIP preprocessing."},
    )
    language_model: str | None = field(default=None, metadata={"help": "Causal LM backbone (name or folder)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the language model's)."})
    cross_attn_every_n_layers: int = field(
        default=1, metadata={"help": "A gated cross-attention block before every N-th decoder layer (backbones)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of other OpenFlamingoConfig fields for a model built from backbones, e.g. "
                          '\'{"perceiver_depth": 2, "perceiver_num_latents": 16}\'.'},
    )
    freeze_lm_embeddings: bool = field(
        default=False, metadata={"help": "Also freeze the <image> / <|endofchunk|> embedding rows."}
    )
    train_language_model: bool = field(default=False, metadata={"help": "Also train the whole language model."})
    train_vision_model: bool = field(default=False, metadata={"help": "Also train the vision tower."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters only (PEFT); the rest stays frozen."})
    lora_targets: str = field(
        default="language_model,gated_cross_attn_layers",
        metadata={"help": "Comma-separated parts whose linear layers get adapters (never the vision side)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})


@dataclass
class DataArguments:
    """The two pretraining streams (`--laion_shards` + `--mmc4_shards`) or a fine-tuning JSONL."""

    laion_shards: str | None = field(
        default=None,
        metadata={"help": "Image-caption pair shards: webdataset tars (jpg/png/jpeg + txt), a list, a glob or brace "
                          "notation (shard-{0000..0099}.tar); or a JSONL / image folder. A sample may hold a video "
                          "instead of the image: a mp4/avi/webm/mkv/mov member, a frames.npy (T, H, W, C) array or "
                          "frames x.0.jpg, x.1.jpg, ... in tars; a \"video\" path or list of frame paths in JSONL."},
    )
    mmc4_shards: str | None = field(
        default=None,
        metadata={"help": "Interleaved (MMC4-style) document shards: tars of json samples. An image_info entry may be "
                          "a video: video_base64 (a video file) or frames_base64 (a list of frame images)."},
    )
    finetune_data: str | None = field(
        default=None, metadata={"help": "Fine-tuning JSONL (prompt/answer, chat messages or captions)."}
    )
    batch_size_laion: int = field(default=128, metadata={"help": "Pairs per device per step."})
    batch_size_mmc4: int = field(default=128, metadata={"help": "Interleaved documents per device per step."})
    loss_multiplier_laion: float = field(default=1.0, metadata={"help": "Weight of the pair loss (v2: 0.2)."})
    loss_multiplier_mmc4: float = field(default=1.0, metadata={"help": "Weight of the interleaved loss."})
    mmc4_textsim_threshold: float = field(
        default=0.24,
        metadata={"help": "Minimum image-sentence similarity (v2 trained with 0.24; the original script's "
                          "default of 30 drops every image)."},
    )
    mmc4_max_num_images: int = field(default=6, metadata={"help": "Images kept per document at most."})
    mmc4_min_num_images: int = field(default=1, metadata={"help": "Documents with fewer images are skipped."})
    train_num_samples_laion: int | None = field(
        default=None,
        metadata={"help": "Pairs per epoch (all processes together), as the original: an epoch is "
                          "ceil(N / (batch_size_laion x processes)) steps (the shorter stream's), the stream starting "
                          "over within the epoch if the shards hold fewer. Default: an epoch is one pass over the "
                          "shards. Needed with --dataset_resampled."},
    )
    train_num_samples_mmc4: int | None = field(default=None, metadata={"help": "Documents per epoch (see above)."})
    dataset_resampled: bool = field(
        default=False,
        metadata={"help": "Draw shards with replacement (each process and DataLoader worker its own draws, seeded "
                          "by --seed and the epoch) instead of reading every epoch's shuffled shard list once, split "
                          "over processes and workers."},
    )
    shuffle_buffer_size: int = field(
        default=5000,
        metadata={"help": "Samples in each stream's shuffle buffer (the original's 5000; 0: shuffle shards only). "
                          "The shard order is shuffled every epoch, seeded by --seed and the epoch."},
    )
    laion_max_length: int = field(default=32, metadata={"help": "Tokens per pair (padded / truncated)."})
    mmc4_max_length: int = field(default=256, metadata={"help": "Tokens per document (padded / truncated)."})
    finetune_max_length: int = field(default=512, metadata={"help": "Tokens per fine-tuning example at most."})
    mask_eos: bool = field(default=False, metadata={"help": "No loss on eos (the original trained it)."})
    num_frames: int | None = field(
        default=None,
        metadata={"help": "Frames sampled uniformly from each video in the data (shorter videos keep all theirs; "
                          "batches pad and mask the missing frames). Default: the processor's num_frames, else the "
                          "model's perceiver_max_num_frames. Needed when the shards hold videos and neither is set. "
                          "Saved with the processor, so generation samples videos the same way."},
    )


def build_parser():
    from .parsing import OneLineErrorParser

    return OneLineErrorParser(
        (ModelArguments, DataArguments, OpenFlamingoTrainingArguments),
        prog="openflamingo-train",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked before loading anything."""
    if bool(model_args.model_name_or_path) == bool(model_args.vision_model or model_args.language_model):
        raise UsageError(
            "Start from an OpenFlamingo checkpoint (--model_name_or_path) or from backbones (--vision_model and "
            "--language_model), not both or neither."
        )
    if not model_args.model_name_or_path and not (model_args.vision_model and model_args.language_model):
        raise UsageError("Starting from backbones needs both --vision_model and --language_model.")
    pretraining = bool(data_args.laion_shards or data_args.mmc4_shards)
    modules = ["datasets", *(["webdataset"] if pretraining else []), *(["peft"] if model_args.lora else [])]
    require_extra("train", modules, "openflamingo-train")
    if pretraining == bool(data_args.finetune_data):
        raise UsageError("Give --laion_shards and --mmc4_shards (pretraining) or --finetune_data (fine-tuning).")
    if pretraining and not (data_args.laion_shards and data_args.mmc4_shards):
        raise UsageError("The recipe trains on both streams: give --laion_shards and --mmc4_shards.")
    epoch_samples = (data_args.train_num_samples_laion, data_args.train_num_samples_mmc4)
    if pretraining and (data_args.dataset_resampled or training_args.max_steps <= 0) and not all(epoch_samples):
        needs = "--dataset_resampled draws forever" if data_args.dataset_resampled else "Shards have no length"
        raise UsageError(
            f"{needs}: give --train_num_samples_laion and --train_num_samples_mmc4 (samples per epoch)"
            + ("." if data_args.dataset_resampled else ", or --max_steps.")
        )
    if pretraining and any(n is not None and n < 1 for n in epoch_samples):
        raise UsageError(f"--train_num_samples_laion / --train_num_samples_mmc4 must be positive, got {epoch_samples}.")
    if data_args.shuffle_buffer_size < 0:
        raise UsageError(f"--shuffle_buffer_size must be >= 0 (0: shuffle shards only), got "
                         f"{data_args.shuffle_buffer_size}.")
    if data_args.num_frames is not None and data_args.num_frames < 1:
        raise UsageError(f"--num_frames must be at least 1 (frames per video), got {data_args.num_frames}.")
    parse_config_overrides(model_args.config_overrides, "--config_overrides")
    for option, source in model_sources(model_args):
        check_model_source(option, source, needs_config=option != "--tokenizer")
    if model_args.threads is not None and model_args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {model_args.threads}.")
    if model_args.lora:
        from ..trainer.lora import check_lora_targets

        try:
            check_lora_targets(lora_targets(model_args))
        except ValueError as error:
            raise UsageError(f"--lora_targets {model_args.lora_targets}: {error}") from None
    if data_args.finetune_data and not os.path.isfile(data_args.finetune_data):
        raise UsageError(f"--finetune_data {data_args.finetune_data}: no such file (a JSONL of examples).")
    for option, source in model_sources(model_args):  # last: it may ask the Hub
        check_hub_reachable(option, source)


def model_sources(model_args: ModelArguments) -> list[tuple[str, str]]:
    """(option, folder or Hub id) of every model, tokenizer or backbone the run loads."""
    options = ("--model_name_or_path", "--vision_model", "--language_model", "--tokenizer")
    values = (model_args.model_name_or_path, model_args.vision_model, model_args.language_model, model_args.tokenizer)
    return [(option, value) for option, value in zip(options, values) if value]


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def load_processor(model_args: ModelArguments):
    """The run's processor: the checkpoint's, or the language model's tokenizer with the vision model's image
    processor (OpenAI CLIP preprocessing when its folder has none). Loaded before the data, the model after it."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from .. import register_auto_classes
    from ..processing.processing_openflamingo import OpenFlamingoProcessor, default_image_processor

    register_auto_classes()
    if model_args.model_name_or_path:
        return AutoProcessor.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer or model_args.language_model)
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_args.vision_model)
    except (OSError, ValueError):
        image_processor = default_image_processor()
    return OpenFlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_model(model_args: ModelArguments, processor):
    """The model to train: a checkpoint, or a fresh OpenFlamingo around the backbones (with `processor`'s token ids
    and resized LM embeddings)."""
    from transformers import AutoModelForImageTextToText

    from ..modeling.modeling_openflamingo import OpenFlamingoForConditionalGeneration

    if model_args.model_name_or_path:
        return AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path)
    return OpenFlamingoForConditionalGeneration.from_backbones(
        model_args.vision_model,
        model_args.language_model,
        cross_attn_every_n_layers=model_args.cross_attn_every_n_layers,
        processor=processor,
        **parse_config_overrides(model_args.config_overrides, "--config_overrides"),
    )


def load_model_and_processor(model_args: ModelArguments):
    """The model to train and its processor (see `load_processor`, `load_model`)."""
    processor = load_processor(model_args)
    return load_model(model_args, processor), processor


def set_num_frames(processor, model, num_frames: int | None) -> None:
    """
    `processor.num_frames` for the run (saved with the processor): `num_frames` (--num_frames), else the processor's
    own, else the model's frame embeddings' count (`config.perceiver_max_num_frames`); None leaves videos unusable.
    """
    max_frames = getattr(model.config, "perceiver_max_num_frames", None)
    num_frames = num_frames or processor.num_frames or max_frames
    if num_frames and max_frames and num_frames > max_frames:
        raise UsageError(
            f"--num_frames {num_frames} is more frames than the model has frame embeddings for "
            f"(config.perceiver_max_num_frames = {max_frames}): give --num_frames {max_frames} or fewer, or more "
            "frame embeddings in --config_overrides for a model built from backbones."
        )
    processor.num_frames = num_frames


def lora_targets(model_args: ModelArguments) -> tuple[str, ...]:
    return tuple(target.strip() for target in model_args.lora_targets.split(",") if target.strip())


def prepare_trainable(model, model_args: ModelArguments):
    """Freezing per the recipe, or LoRA adapters (everything else frozen)."""
    from ..trainer.lora import apply_lora
    from ..trainer.trainer import freeze_for_recipe

    if model_args.lora:
        try:
            return apply_lora(model, targets=lora_targets(model_args), r=model_args.lora_r,
                              alpha=model_args.lora_alpha, dropout=model_args.lora_dropout)
        except ValueError as error:  # e.g. a module path that this model does not have
            raise UsageError(f"--lora_targets {model_args.lora_targets}: {error}") from None
    freeze_for_recipe(
        model,
        train_language_model=model_args.train_language_model,
        train_vision_model=model_args.train_vision_model,
        freeze_lm_embeddings=model_args.freeze_lm_embeddings,
    )
    return model


def build_streams(data_args: DataArguments, processor, seed: int) -> dict:
    """
    The two pretraining streams, drawn as the original draws them: shards shuffled per epoch (or resampled with
    --dataset_resampled), samples through a shuffle buffer; with a per-epoch sample count, each stream starts over
    within an epoch rather than end it early.
    """
    from ..trainer.data import build_interleaved_dataset, build_pair_dataset

    sampling = dict(seed=seed, mask_eos=data_args.mask_eos, num_frames=processor.num_frames,
                    shuffle_buffer_size=data_args.shuffle_buffer_size, resampled=data_args.dataset_resampled)
    laion = build_pair_dataset(
        data_args.laion_shards,
        processor,
        max_length=data_args.laion_max_length,
        repeat=bool(data_args.train_num_samples_laion),
        **sampling,
    )
    mmc4 = build_interleaved_dataset(
        data_args.mmc4_shards,
        processor,
        sim_threshold=data_args.mmc4_textsim_threshold,
        min_num_images=data_args.mmc4_min_num_images,
        max_num_images=data_args.mmc4_max_num_images,
        max_length=data_args.mmc4_max_length,
        repeat=bool(data_args.train_num_samples_mmc4),
        **sampling,
    )
    return {"laion": laion, "mmc4": mmc4}


def samples_per_epoch(data_args: DataArguments) -> dict[str, int] | None:
    """`OpenFlamingoTrainer`'s `samples_per_epoch` from --train_num_samples_*; None: an epoch is one pass."""
    if not (data_args.train_num_samples_laion and data_args.train_num_samples_mmc4):
        return None
    return {"laion": data_args.train_num_samples_laion, "mmc4": data_args.train_num_samples_mmc4}


def train(model_args: ModelArguments, data_args: DataArguments, training_args) -> OpenFlamingoTrainer:  # noqa: F821
    """Runs the whole job; returns the trainer (its `state.log_history` holds the losses)."""
    from ..trainer.collator import OpenFlamingoDataCollator
    from ..trainer.trainer import OpenFlamingoTrainer

    set_cpu_threads(model_args.threads)
    processor = _loading("the processor", load_processor, model_args)
    dataset = None
    if data_args.finetune_data:  # every line is checked before the model loads
        from ..trainer.finetune import build_finetune_dataset

        try:
            dataset = build_finetune_dataset(data_args.finetune_data, processor,
                                             max_length=data_args.finetune_max_length)
        except (OSError, ValueError) as error:
            raise UsageError(f"--finetune_data {error}") from None
    model = _loading("the model", load_model, model_args, processor)
    set_num_frames(processor, model, data_args.num_frames)
    model = prepare_trainable(model, model_args)
    collator = OpenFlamingoDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    kwargs = {"model": model, "args": training_args, "data_collator": collator, "processing_class": processor}
    if dataset is not None:
        trainer = OpenFlamingoTrainer(train_dataset=dataset, **kwargs)
    else:
        trainer = OpenFlamingoTrainer(
            streams=build_streams(data_args, processor, training_args.seed),
            stream_batch_sizes={"laion": data_args.batch_size_laion, "mmc4": data_args.batch_size_mmc4},
            samples_per_epoch=samples_per_epoch(data_args),
            loss_multipliers={"laion": data_args.loss_multiplier_laion, "mmc4": data_args.loss_multiplier_mmc4},
            **kwargs,
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_final(trainer, model_args, training_args.output_dir)
    if trainer.is_world_process_zero():
        # The absolute path: without --output_dir it is TrainingArguments' default, relative to the working folder.
        output_dir = os.path.abspath(training_args.output_dir)
        adapter = f"; the LoRA adapter in {os.path.join(output_dir, 'adapter')}" if model_args.lora else ""
        print(f"openflamingo-train: wrote the model and processor to {output_dir}{adapter}.")
    return trainer


def _loading(what: str, load, *args):
    """`load(*args)`, with a model source that cannot be loaded (a Hub id without network, a folder without the
    files) reported as one usage line."""
    try:
        return load(*args)
    except OSError as error:
        raise UsageError(f"could not load {what}: {' '.join(str(error).split())[:400]}") from None


def save_final(trainer, model_args: ModelArguments, output_dir: str) -> None:
    """`output_dir` ends with a model `AutoModelForImageTextToText` loads (LoRA merged in; the adapter itself in
    `output_dir/adapter`), its processor, and `trainer_state.json`."""
    trainer.save_state()
    if model_args.lora:
        from ..trainer.lora import merge_lora
        from ..trainer.trainer import clear_tokenizer_call_settings

        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(os.path.join(output_dir, "adapter"))
            merge_lora(trainer.model).save_pretrained(output_dir)
            clear_tokenizer_call_settings(trainer.processing_class)
            trainer.processing_class.save_pretrained(output_dir)
        return
    trainer.save_model(output_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    model_args, data_args, training_args = parser.parse_command_line(argv)
    try:
        check_arguments(model_args, data_args, training_args)
    except UsageError as error:
        parser.error(str(error))
    try:
        train(model_args, data_args, training_args)
    except UsageError as error:  # found once the model is loaded (e.g. --num_frames against its frame embeddings)
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
