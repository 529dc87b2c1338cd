"""The recipe's training step: `OpenFlamingoTrainer` beside the original's hand-written loop, side by side.

    python benchmarks/bench_train_step.py                       # small shapes, CPU
    python benchmarks/bench_train_step.py --shape of3b --bf16   # OF-3B (ViT-L/14 + MPT-1B, xattn every layer), GPU
    python benchmarks/bench_train_step.py --json runs.json      # also every run's step times as JSON

The step is the pretraining recipe's (open_flamingo 2.0.1's `train_one_epoch`): one LAION batch (32 x 1 image x 32
tokens) and one MMC4 batch (8 x 5 images x 256 tokens), forward and backward per stream, the embedding-row rule,
clipping at 1.0, AdamW. The baseline is the original
`train_one_epoch` step written out on the same model (same weights, same batches): what a user of the original ran.
Both run in fresh subprocesses, interleaved (A B A B ...), so that peak memory is each one's own; the table reports
medians. Random weights, no download.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (vision, text family / release, laion batch, mmc4 batch, images per document, tokens)
    "small": dict(release=None, laion_batch=32, laion_tokens=32, mmc4_batch=8, mmc4_images=5, mmc4_tokens=256),
    "of3b": dict(release="OpenFlamingo-3B-vitl-mpt1b", laion_batch=32, laion_tokens=32, mmc4_batch=8,
                 mmc4_images=5, mmc4_tokens=256),
    "of4b": dict(release="OpenFlamingo-4B-vitl-rpj3b", laion_batch=32, laion_tokens=32, mmc4_batch=8,
                 mmc4_images=5, mmc4_tokens=256),
    "of9b": dict(release="OpenFlamingo-9B-vitl-mpt7b", laion_batch=32, laion_tokens=32, mmc4_batch=8,
                 mmc4_images=5, mmc4_tokens=256),
}


# ----------------------------------------------------------------------------------------------------------------------
# One measurement (runs in a subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def build_model(shape: dict):
    import torch

    from openflamingo_hf import OpenFlamingoForConditionalGeneration
    from openflamingo_hf.releases import get_release_config
    from openflamingo_hf.tiny_models import tiny_openflamingo_config, tiny_text_config, tiny_vision_config

    if shape["release"]:
        config = get_release_config(shape["release"])
    else:
        config = tiny_openflamingo_config(
            "llama", cross_attn_every_n_layers=1,
            vision_config=tiny_vision_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                             image_size=56, patch_size=14),
            text_config=tiny_text_config("llama", vocab_size=4096, hidden_size=256, intermediate_size=512,
                                         num_layers=4, max_position_embeddings=512),
            perceiver_depth=2, perceiver_num_latents=16, perceiver_num_heads=4, perceiver_head_dim=32,
            cross_attn_num_heads=4, cross_attn_head_dim=32, media_token_id=4000, eoc_token_id=4001,
        )
    torch.manual_seed(0)
    model = OpenFlamingoForConditionalGeneration(config)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.1)
            block.ff_gate.fill_(0.1)
    return model


def make_batch(model, batch_size: int, num_images: int, num_tokens: int, generator):
    """Random ids with one `<image>` ... `<|endofchunk|>` chunk per image; labels as the recipe masks them."""
    import torch

    config = model.config
    image_size = config.vision_config.image_size
    vocab = min(config.media_token_id, config.eoc_token_id)
    ids = torch.randint(0, vocab, (batch_size, num_tokens), generator=generator)
    chunk = num_tokens // num_images
    for k in range(num_images):
        ids[:, k * chunk] = config.media_token_id
        ids[:, (k + 1) * chunk - 1] = config.eoc_token_id
    labels = ids.masked_fill(ids == config.media_token_id, -100)
    pixel_values = torch.randn(batch_size, num_images, 1, 3, image_size, image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixel_values}


def run_original_loop(model, batches, args, steps: int) -> list[float]:
    """The original train_one_epoch step: forward/backward per stream, mask embedding grads, clip, AdamW."""
    import torch

    from openflamingo_hf.trainer.trainer import is_decayed_parameter

    device = next(model.parameters()).device
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if is_decayed_parameter(n)], "weight_decay": 0.1},
         {"params": [p for n, p in params if not is_decayed_parameter(n)], "weight_decay": 0.0}], lr=1e-4,
    )
    embedding = model.get_input_embeddings().weight
    keep = torch.zeros(embedding.shape[0], 1, device=device)
    keep[[model.config.media_token_id, model.config.eoc_token_id]] = 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    for _ in range(steps):
        start = _sync_time(device)
        for name, multiplier in (("laion", 0.2), ("mmc4", 1.0)):
            batch = {k: v.to(device, non_blocking=True) for k, v in batches[name].items()}
            with autocast:
                loss = model(**batch).loss * multiplier
            loss.backward()
        embedding.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(_sync_time(device) - start)
    return times


def run_trainer(model, batches, args, steps: int) -> list[float]:
    import torch
    from torch.utils.data import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from openflamingo_hf.trainer import OpenFlamingoDataCollator, OpenFlamingoTrainer

    class Repeat(Dataset):
        def __init__(self, batch):
            self.rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

        def __len__(self):
            return len(self.rows) * (steps + 2)

        def __getitem__(self, index):
            return self.rows[index % len(self.rows)]

    times, device = [], torch.device(args.device)

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            times.append(-_sync_time(device))

        def on_step_end(self, *_, **__):
            times[-1] += _sync_time(device)

    training_args = TrainingArguments(
        "/tmp/bench_train_step", max_steps=steps, learning_rate=1e-4, weight_decay=0.1, report_to=[],
        use_cpu=args.device == "cpu", bf16=args.bf16, save_strategy="no", disable_tqdm=True, logging_steps=10**9,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=args.device != "cpu",
    )
    pad = 0
    trainer = OpenFlamingoTrainer(
        model=model, args=training_args, data_collator=OpenFlamingoDataCollator(pad_token_id=pad),
        streams={name: Repeat(batch) for name, batch in batches.items()},
        stream_batch_sizes={name: batch["input_ids"].shape[0] for name, batch in batches.items()},
        loss_multipliers={"laion": 0.2, "mmc4": 1.0}, callbacks=[Timer()],
    )
    trainer.train()
    return times


def _sync_time(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(args) -> dict:
    """One system, one process: warmup steps, then timed steps; peak memory of this process."""
    import torch

    from openflamingo_hf.trainer import freeze_for_recipe

    shape = SHAPES[args.shape]
    model = build_model(shape).to(args.device)
    freeze_for_recipe(model)
    generator = torch.Generator().manual_seed(0)
    batches = {
        "laion": make_batch(model, shape["laion_batch"], 1, shape["laion_tokens"], generator),
        "mmc4": make_batch(model, shape["mmc4_batch"], shape["mmc4_images"], shape["mmc4_tokens"], generator),
    }
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = run_trainer if args.system == "trainer" else run_original_loop
    times = run(model, batches, args, args.warmup + args.steps)[args.warmup:]
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak,
            "samples": shape["laion_batch"] + shape["mmc4_batch"], "step_times": times}


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as the original's amp_bf16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per system, interleaved")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every run (its step times included) as JSON here; rewritten after each run, "
                             "so a stopped benchmark keeps its runs")
    parser.add_argument("--system", choices=["trainer", "original"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.system:  # child process
        print(json.dumps(measure(args)))
        return

    results = {"original": [], "trainer": []}
    settings = {k: getattr(args, k) for k in ("shape", "device", "bf16", "steps", "warmup", "repeats")}

    def write_json(extra: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": settings, "runs": results, **extra}, indent=1))

    for _ in range(args.repeats):
        for system in ("original", "trainer"):
            command = [sys.executable, __file__, "--system", system, "--shape", args.shape, "--device", args.device,
                       "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--bf16"] if args.bf16 else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:  # show why before failing: the child's output is captured
                sys.stderr.write(done.stderr[-4000:])
                done.check_returncode()
            results[system].append(json.loads(done.stdout.strip().splitlines()[-1]))
            write_json({"partial": True})
    summary = {}
    for system, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        summary[system] = (step, runs[0]["samples"] / step, max(r["peak_bytes"] for r in runs) / 2**30)
    write_json({"summary": {system: {"step_s": step, "samples_per_s": rate, "peak_gib": peak}
                            for system, (step, rate, peak) in summary.items()}})
    print(f"\nshape {args.shape}, device {args.device}, bf16 {args.bf16}, {args.steps} timed steps x {args.repeats} runs")
    print(f"{'system':<22}{'s/step':>10}{'samples/s':>12}{'peak GiB':>10}")
    for system, (step, rate, peak) in summary.items():
        label = "original loop" if system == "original" else "OpenFlamingoTrainer"
        print(f"{label:<22}{step:>10.3f}{rate:>12.1f}{peak:>10.2f}")
    (o_step, o_rate, o_peak), (t_step, t_rate, t_peak) = summary["original"], summary["trainer"]
    print(f"{'ratio (trainer/orig)':<22}{t_step / o_step:>10.2f}{t_rate / o_rate:>12.2f}"
          f"{(t_peak / o_peak if o_peak else float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
