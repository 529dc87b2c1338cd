"""Greedy-generation benchmark: prefill latency, decode throughput and peak memory.

    python benchmarks/bench_generate.py                 # tiny config on CPU (+ OF-3B shape on a GPU if present)
    python benchmarks/bench_generate.py --shapes of3b --device cuda --batch-sizes 1 8

Shapes: `tiny` (the test-suite model, fp32) and `of3b` (CLIP ViT-L/14 + an MPT-1B-sized LM with a gated block
before every layer, random weights, bf16 on GPU). Each row is measured against two baselines run in the same process
on the same inputs:
  * `lm`: the bare language model generating from the same prompt (no images, no gated blocks): the ratio
    `of/lm` is OpenFlamingo's overhead over its own LM;
  * `nocache`: OpenFlamingo generating with `use_cache=False` (every step recomputes the whole sequence, the images
    and the cross-attention keys/values): `speedup` is how much the KV cache and the media cache buy.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import openflamingo_hf  # noqa: F401
from openflamingo_hf import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from openflamingo_hf.tiny_models import tiny_openflamingo_config


def build_model(shape: str, device: str, dtype: torch.dtype) -> OpenFlamingoForConditionalGeneration:
    torch.manual_seed(0)
    if shape == "tiny":
        config = tiny_openflamingo_config("llama")
    elif shape == "of3b":
        text_config = {"model_type": "mpt", "d_model": 2048, "n_heads": 16, "n_layers": 24, "expansion_ratio": 4,
                       "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True}
        try:  # the real MPT-1B architecture (q/k LayerNorm), when this package provides it
            from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig  # noqa: F401

            text_config = {"model_type": "mosaic_gpt", "d_model": 2048, "n_heads": 16, "n_layers": 24,
                           "max_seq_len": 2048, "vocab_size": 50432}
        except ImportError:
            pass
        config = OpenFlamingoConfig(text_config=text_config, cross_attn_every_n_layers=1, media_token_id=50278,
                                    eoc_token_id=50277)
    else:
        raise ValueError(f"Unknown shape {shape!r}: choose tiny or of3b.")
    with torch.device(device):
        model = OpenFlamingoForConditionalGeneration(config)
    model = model.to(dtype).eval()
    with torch.no_grad():  # non-zero gates so that the cross-attention path does real work
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def make_inputs(model, batch_size: int, prompt_len: int, num_images: int, device: str, dtype: torch.dtype):
    config = model.config
    vocab = config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 50000) - 3, (batch_size, prompt_len), generator=generator)
    ids[ids == config.media_token_id] = 3
    ids[ids == config.eoc_token_id] = 3
    # One <image> at the start of each demonstration, evenly spread over the prompt.
    for k in range(num_images):
        ids[:, k * prompt_len // num_images] = config.media_token_id
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, num_images, 1, 3, size, size, generator=generator)
    return ids.to(device), pixels.to(device=device, dtype=dtype)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, samples: list[float] | None = None) -> float:
    """Median wall time of `fn` in seconds, after one warm-up call; each timed call is appended to `samples`."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


def peak_memory_mib(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


@torch.no_grad()
def bench(shape, device, dtype, batch_size, prompt_len, num_images, new_tokens, repeats):
    model = build_model(shape, device, dtype)
    ids, px = make_inputs(model, batch_size, prompt_len, num_images, device, dtype)
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0)

    prefill = timed(lambda: model(input_ids=ids, pixel_values=px, use_cache=True), device, repeats)
    total = timed(lambda: model.generate(input_ids=ids, pixel_values=px, **common), device, repeats)
    memory = peak_memory_mib(lambda: model.generate(input_ids=ids, pixel_values=px, **common), device)
    decode_tps = batch_size * (new_tokens - 1) / max(total - prefill, 1e-9)

    text_ids = ids.clone()
    text_ids[text_ids == model.config.media_token_id] = 3
    lm = model.language_model
    lm_prefill = timed(lambda: lm(input_ids=text_ids, use_cache=True), device, repeats)
    lm_total = timed(lambda: lm.generate(input_ids=text_ids, **common), device, repeats)
    lm_decode_tps = batch_size * (new_tokens - 1) / max(lm_total - lm_prefill, 1e-9)

    nocache_total = timed(
        lambda: model.generate(input_ids=ids, pixel_values=px, use_cache=False, **common), device, max(1, repeats // 2)
    )
    return {
        "shape": shape,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch_size,
        "prefill_ms": prefill * 1e3,
        "decode_tok_s": decode_tps,
        "peak_mib": memory,
        "lm_prefill_ms": lm_prefill * 1e3,
        "lm_decode_tok_s": lm_decode_tps,
        "of/lm_decode": decode_tps / lm_decode_tps,
        "speedup_vs_nocache": nocache_total / total,
    }


def print_table(rows):
    columns = ["shape", "device", "dtype", "batch", "prefill_ms", "decode_tok_s", "peak_mib", "lm_prefill_ms",
               "lm_decode_tok_s", "of/lm_decode", "speedup_vs_nocache"]

    def fmt(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}" if value < 100 else f"{value:.0f}"
        return str(value)

    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, help="tiny and/or of3b (default: tiny, plus of3b on GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--num-images", type=int, default=3, help="images per row (few-shot demonstrations)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (["tiny", "of3b"] if device.startswith("cuda") else ["tiny"])
    rows = []
    for shape in shapes:
        dtype = torch.bfloat16 if (shape == "of3b" and device.startswith("cuda")) else torch.float32
        for batch_size in args.batch_sizes:
            rows.append(bench(shape, device, dtype, batch_size, args.prompt_len, args.num_images, args.new_tokens,
                              args.repeats))
            print(f"done: {shape} batch {batch_size}", flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
