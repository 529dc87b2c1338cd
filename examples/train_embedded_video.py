"""Trains the video variant of the embedded model: the shipped model plus learned frame embeddings, on the clip task.

    python examples/train_embedded_video.py --output_dir ./embedded-video-run     # 7-9 min on a 2-core CPU
    cp ./embedded-video-run/model/* src/openflamingo_hf/embedded/video_model/   # ship it (tests/test_embedded_video.py)

The world's clips (`world.make_clips`) show one shape moving left, right, up or down over 4 frames; the caption says
which ("one red circle moving left."). Only the order of the frames tells the direction, so a Perceiver without frame
embeddings (permutation-invariant over the flattened frames) cannot learn it. Starting from the shipped model, the
Perceiver gets frame embeddings (`perceiver_max_num_frames=4`, new parameters; frame 0's at zero, so that an image,
one frame, sees the shipped Perceiver), the vision tower stays frozen, and training has two stages:

0. `--warmup_steps` (`warm_up_perceiver`): the Perceiver alone, on cached tower features of clips, learns to put the
   direction into its latents through a linear head on the latents' mean, which is then thrown away; a penalty
   (`--anchor_weight`) keeps the latents of images where the shipped Perceiver put them. Held-out, the direction is
   read from the latents for ~99% of clips after 1,000 steps (~2 min).
1. `--steps`: `OpenFlamingoTrainer` on the whole mix (`MIX`, drawn on the fly): clip captions, and the image tasks of
   the world (caption pairs, VQA pairs, few-shot tag documents) so that the image skills and in-context learning are
   kept. The Perceiver is frozen as stage 0 left it; the gated blocks train, and the LM at `--lm_lr_multiplier` of the
   rate (it has never seen "moving" or the directions: frozen, as in the recipe, it cannot even reach the direction
   token's marginal). The teacher-forced direction is right for ~98% of held-out clips after ~500 steps.

Why stage 0 (issue 12): the direction's sign needs frame index times position, which this Perceiver gets only through
softmax weights that both prefer a position and are read out by frame: a saddle. Through the LM (1 s a step, the
direction token's gradient one of a whole caption's) it stayed at chance for 600 steps; on cached features with a head
(0.1 s a step) it escapes after ~500 steps at a rate of 3e-3 (at 1e-3 it was still at ~55% after 800).
`--direction_steps` (off by default) is the earlier attempt: clips with the loss on the direction's first token alone.

Its own held-out evaluation is printed at the end (`evaluate_embedded_clips`: exact caption, direction, direction of
the reversed clip; images: `evaluate_embedded`) and written to `report.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback, TrainingArguments

from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR
from openflamingo_hf.embedded.world import (
    CLIP_FRAMES,
    DIRECTIONS,
    FORMATS,
    HELD_OUT_SEED_START,
    make_clips,
    make_examples,
    tag_text,
    vqa_text,
)
from openflamingo_hf.trainer import OpenFlamingoDataCollator, OpenFlamingoTrainer, freeze_for_recipe
from openflamingo_hf.trainer.trainer import is_decayed_parameter

# Share of each kind of training sample; clips are the new task, the rest keeps what the shipped model could do.
MIX = {"clip": 0.6, "caption": 0.15, "vqa": 0.1, "tags": 0.15}
CLIP_EVAL_SEED = HELD_OUT_SEED_START + 7000  # held-out clips of the final evaluation
PROBE_SEED = HELD_OUT_SEED_START + 7500  # held-out clips of the progress probe during training


class WorldMix(torch.utils.data.IterableDataset):
    """Training samples drawn on the fly (reproducible from `seed`): clips and the world's image tasks, one kind per
    batch of `batch_size` consecutive samples. One kind a batch because the collator pads every sample to the
    batch's most images and most frames: the vision tower skips padding frames, but the Perceiver still runs over
    the padded slots (masked), so a clip (1 x 4 frames) next to a tag document (4 x 1) would cost it 16 frames."""

    def __init__(self, processor, num_batches: int, batch_size: int, seed: int, mix: dict[str, float] = MIX):
        self.processor, self.num_batches, self.batch_size, self.seed = processor, num_batches, batch_size, seed
        self.kinds, weights = list(mix), np.array(list(mix.values()), dtype=float)
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        for batch in range(self.num_batches):
            rng = np.random.default_rng([self.seed, batch])
            kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights))]
            for index in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                # Seeds from `seed` up, one per sample: far below the held-out seeds.
                yield self.sample(kind, self.seed + index, rng)

    def sample(self, kind: str, seed: int, rng: np.random.Generator) -> dict:
        """One tokenized sample of `kind` with the recipe's labels."""
        interleaved = False
        if kind in ("clip", "direction"):
            clip = make_clips(1, seed)[0]
            media = {"videos": [[clip.frames]], "num_frames": CLIP_FRAMES}
            text = self.processor.pair_text(clip.caption).replace(self.processor.image_token, "<video>", 1)
        elif kind in ("caption", "vqa"):
            example = make_examples(1, seed)[0]
            chunk = example.caption if kind == "caption" else vqa_text(example.question, example.answer)
            media, text = {"images": [[example.image]]}, self.processor.pair_text(chunk)
        else:
            # A few-shot tag document: one format throughout, so that it can only be learned in context.
            examples = make_examples(4, seed)
            format_name = list(FORMATS)[int(rng.integers(len(FORMATS)))]
            chunks = [tag_text(e.tag(format_name)) for e in examples]
            text = self.processor.few_shot_prompt(chunks[:-1], chunks[-1]) + self.processor.eoc_token
            text += self.processor.tokenizer.eos_token or ""
            media, interleaved = {"images": [[e.image for e in examples]]}, True
        batch = self.processor(text=[text], return_tensors="pt", padding_side="right", **media)
        labels = self.processor.pretraining_labels(batch["input_ids"], batch["attention_mask"], interleaved=interleaved)
        if kind == "direction":
            labels = self.direction_only(labels)
        sample = {key: value[0] for key, value in batch.items()}
        sample["labels"] = labels[0]
        return sample

    def direction_only(self, labels: torch.Tensor) -> torch.Tensor:
        """Clip labels with the loss on the direction's first token alone: the one token that needs the frames,
        whose gradient would otherwise be drowned (Adam scales each step by the gradients of the whole caption)."""
        keep = torch.isin(labels, torch.tensor(direction_first_tokens(self.processor)))
        # The direction's first token follows "moving "; earlier uses of these tokens (e.g. "le" of "circle") stay out.
        keep &= keep.cumsum(-1) == keep.sum(-1, keepdim=True)
        return torch.where(keep, labels, torch.full_like(labels, -100))


def direction_first_tokens(processor) -> list[int]:
    """The first token of each direction after "moving " (the one choice in a clip caption that needs the frames)."""
    ids = [processor.tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in DIRECTIONS]
    firsts = [row[1] if len(row) > 1 else row[0] for row in ids]  # " left" -> [" ", "le", ...]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"The directions' first tokens are not distinct: {firsts}.")
    return firsts


def teacher_forced_direction_accuracy(model, processor, clips) -> float:
    """How often the true caption's direction token scores highest of the four, given the true caption before it:
    one forward pass, cheap enough to watch the direction being learned while training."""
    prefixes = [clip.caption[: clip.caption.rindex(" ") + 1] for clip in clips]  # "one red circle moving "
    inputs = processor(videos=[[c.frames] for c in clips], text=["<video>" + p for p in prefixes],
                       num_frames=CLIP_FRAMES, return_tensors="pt", padding_side="left").to(model.device)
    candidates = torch.tensor(direction_first_tokens(processor), device=model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, candidates]
    truth = torch.tensor([list(DIRECTIONS).index(c.direction) for c in clips], device=model.device)
    return float((logits.argmax(-1) == truth).float().mean())


class DirectionProbe(TrainerCallback):
    """Logs the held-out teacher-forced direction accuracy every `every` steps."""

    def __init__(self, processor, every: int, num_clips: int = 48):
        self.processor, self.every, self.clips = processor, every, make_clips(num_clips, PROBE_SEED)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            model.eval()
            accuracy = teacher_forced_direction_accuracy(model, self.processor, self.clips)
            model.train()
            print(f"step {state.global_step}: held-out direction (teacher-forced) {accuracy:.2f}", flush=True)


def add_frame_embeddings(model) -> None:
    """Frame 0's embedding at zero: a single image is one frame (frame 0), so images see exactly the shipped model at
    the start; the other frames keep their random init (distinct from frame 0 and each other from step 0)."""
    with torch.no_grad():
        model.perceiver.frame_embs[0].zero_()


def clip_tower_features(model, processor, num_clips: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen vision tower's features of `num_clips` clips, (n, 1, frames, patches, dim) in fp16 (to fit in
    memory), and their direction indices (n,): the Perceiver's whole input, computed once, so that a stage-0 step
    costs the Perceiver alone."""
    features, directions = [], []
    with torch.no_grad():
        for start in range(0, num_clips, 100):
            clips = make_clips(min(100, num_clips - start), seed + start)
            batch = processor(videos=[[c.frames] for c in clips], text=["<video>"] * len(clips),
                              num_frames=CLIP_FRAMES, return_tensors="pt")
            features.append(model.get_vision_features(batch["pixel_values"]).half())
            directions += [list(DIRECTIONS).index(c.direction) for c in clips]
    return torch.cat(features), torch.tensor(directions)


def image_tower_features(model, processor, num_images: int, seed: int) -> torch.Tensor:
    """The frozen vision tower's features of `num_images` world images, (n, 1, 1, patches, dim) in fp16."""
    features = []
    with torch.no_grad():
        for start in range(0, num_images, 100):
            examples = make_examples(min(100, num_images - start), seed + start)
            batch = processor(images=[[e.image] for e in examples], text=["<image>"] * len(examples),
                              return_tensors="pt")
            features.append(model.get_vision_features(batch["pixel_values"]).half())
    return torch.cat(features)


def warm_up_perceiver(model, processor, args) -> None:
    """
    Stage 0: the Perceiver (and its frame embeddings) learn to put the direction into the latents, through a linear
    head on the latents' mean that is thrown away afterwards; a penalty keeps the latents of images where the shipped
    Perceiver put them, so the gated blocks and LM still read images as before.

    Why a head and not the LM: the direction's sign needs frame index times position, which this Perceiver gets only
    through softmax weights that both prefer a position and are read out by frame, a saddle from which it escapes
    after a few hundred steps at a rate of 3e-3 (at 1e-3 it stays at ~50% for 600+). On cached tower features a step
    is the Perceiver alone (~0.1 s); through the LM it is ~1 s and the direction token's gradient is one of many.
    """
    clips, directions = clip_tower_features(model, processor, args.warmup_clips, seed=args.seed + 600_000)
    images = image_tower_features(model, processor, args.warmup_images, seed=args.seed + 700_000)
    held_out_clips, held_out_directions = clip_tower_features(model, processor, 400, seed=PROBE_SEED)
    perceiver = model.perceiver
    with torch.no_grad():
        anchors = perceiver(images.float())  # where the shipped Perceiver puts images (frame 0's embedding is zero)
    head = torch.nn.Linear(perceiver.latents.shape[-1], len(DIRECTIONS))
    optimizer = torch.optim.AdamW([*perceiver.parameters(), *head.parameters()], lr=args.warmup_learning_rate,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.warmup_steps + 1):
        clip_rows = torch.randint(len(clips), (64,), generator=generator)
        image_rows = torch.randint(len(images), (32,), generator=generator)
        latents = perceiver(clips[clip_rows].float())[:, 0]
        loss = torch.nn.functional.cross_entropy(head(latents.mean(1)), directions[clip_rows])
        anchor = torch.nn.functional.mse_loss(perceiver(images[image_rows].float()), anchors[image_rows])
        (loss + args.anchor_weight * anchor).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == args.warmup_steps:
            with torch.no_grad():
                predicted = head(perceiver(held_out_clips.float())[:, 0].mean(1)).argmax(-1)
            accuracy = float((predicted == held_out_directions).float().mean())
            print(f"stage 0 step {step}: loss {loss.item():.3f}, anchor {anchor.item():.4f}, "
                  f"held-out direction from the latents {accuracy:.2f}", flush=True)


def build_optimizer(model, learning_rate: float, frame_lr_multiplier: float, lm_lr_multiplier: float,
                    perceiver_lr_multiplier: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one group per rate: frame embeddings (new, from nothing: faster), LM (keep it close: slower), the
    rest (Perceiver, gated blocks) at `learning_rate`; weight decay by the recipe's rule (`is_decayed_parameter`)."""
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rate = learning_rate
        if name.endswith("frame_embs"):
            rate *= frame_lr_multiplier * perceiver_lr_multiplier
        elif name.startswith("perceiver."):
            rate *= perceiver_lr_multiplier
        elif name.startswith("language_model."):
            rate *= lm_lr_multiplier
        decay = weight_decay if is_decayed_parameter(name) else 0.0
        groups.setdefault((rate, decay), []).append(parameter)
    return torch.optim.AdamW([{"params": p, "lr": r, "weight_decay": d} for (r, d), p in groups.items()])


def train_stage(model, processor, args, name: str, mix: dict[str, float], steps: int, learning_rate: float,
                schedule: str, seed: int) -> None:
    """One stage of training: `steps` batches of `mix` with `OpenFlamingoTrainer`, a fresh optimizer and schedule."""
    optimizer = build_optimizer(model, learning_rate, args.frame_lr_multiplier, args.lm_lr_multiplier,
                                args.perceiver_lr_multiplier or 1.0, 0.1)
    trainer = OpenFlamingoTrainer(
        model=model,
        args=TrainingArguments(
            os.path.join(args.output_dir, name), max_steps=steps, per_device_train_batch_size=args.batch_size,
            learning_rate=learning_rate, warmup_steps=min(50, steps // 10), lr_scheduler_type=schedule,
            logging_steps=25, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
            remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0,  # drawing a batch costs ~0.3 s, a step ~1 s: no worker to compete
        ),
        optimizers=(optimizer, None),
        train_dataset=WorldMix(processor, steps, args.batch_size, seed=seed, mix=mix),
        data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=[DirectionProbe(processor, args.probe_every)],
    )
    print(f"stage {name}: {steps} steps of {mix}", flush=True)
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="embedded-video-run")
    parser.add_argument("--warmup_steps", type=int, default=1000,
                        help="Stage 0: the Perceiver alone, a throw-away direction head on cached tower features.")
    parser.add_argument("--warmup_learning_rate", type=float, default=3e-3, help="Stage 0, constant.")
    parser.add_argument("--warmup_clips", type=int, default=4000, help="Stage 0's clips (tower features cached).")
    parser.add_argument("--warmup_images", type=int, default=1000, help="Stage 0's images for the anchor penalty.")
    parser.add_argument("--anchor_weight", type=float, default=10.0,
                        help="Stage 0: weight of the penalty keeping images' latents where the shipped model had them.")
    parser.add_argument("--direction_steps", type=int, default=0,
                        help="Stage 1: clips with the loss on the direction token alone (off: stage 0 does its job).")
    parser.add_argument("--steps", type=int, default=1000, help="Stage 2: the whole mix (MIX), full texts.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--direction_learning_rate", type=float, default=2e-3, help="Stage 1, constant.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Stage 2 (cosine): Perceiver, gated blocks.")
    parser.add_argument("--frame_lr_multiplier", type=float, default=10.0, help="Frame embeddings' rate over it.")
    parser.add_argument("--lm_lr_multiplier", type=float, default=0.1, help="The LM's rate over it.")
    parser.add_argument("--perceiver_lr_multiplier", type=float, default=0.0,
                        help="The Perceiver's rate over it in stages 1-2 (0: frozen as stage 0 left it).")
    parser.add_argument("--freeze_language_model", action="store_true", help="The first attempt's setting.")
    parser.add_argument("--probe_every", type=int, default=50, help="Held-out direction check every N steps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="Torch threads (1 was ~8x faster than 2 on a busy 2-core machine: no oversubscription).")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    start = time.time()

    model = AutoModelForImageTextToText.from_pretrained(
        EMBEDDED_MODEL_DIR, perceiver_max_num_frames=CLIP_FRAMES, strict=False, dtype=torch.float32
    )
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR, num_frames=CLIP_FRAMES)
    add_frame_embeddings(model)
    if args.warmup_steps:
        warm_up_perceiver(model, processor, args)
    freeze_for_recipe(model, train_language_model=not args.freeze_language_model)
    if not args.perceiver_lr_multiplier:
        model.perceiver.requires_grad_(False)
    if args.direction_steps:
        train_stage(model, processor, args, "direction", {"direction": 1.0}, args.direction_steps,
                    args.direction_learning_rate, "constant_with_warmup", seed=args.seed + 200_000)
    if args.steps:
        # Its own seeds, above stage 1's (which uses direction_steps * batch_size of them).
        train_stage(model, processor, args, "mix", MIX, args.steps, args.learning_rate, "cosine",
                    seed=args.seed + 400_000)
    model_dir = os.path.join(args.output_dir, "model")
    model.eval()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    train_seconds = round(time.time() - start)

    from openflamingo_hf.embedded import evaluate_embedded, evaluate_embedded_clips

    scores = evaluate_embedded_clips(model_dir, seed=CLIP_EVAL_SEED, num_examples=100)
    scores.update(evaluate_embedded(model_dir))
    report = {"scores": scores, "train_seconds": train_seconds, "seconds": round(time.time() - start)}
    print(json.dumps(report, indent=1))
    with open(os.path.join(args.output_dir, "report.json"), "w") as file:
        json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
