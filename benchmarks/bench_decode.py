"""Decode-step benchmark: eager vs static cache vs compiled static cache, and 1-shot vs many-shot decoding.

    python benchmarks/bench_decode.py                  # tiny model on CPU (overhead-bound: what compile removes)
    python benchmarks/bench_decode.py --device cuda    # the same on a GPU
    python benchmarks/bench_decode.py --no-compile --json rows.json   # eager rows only; every timing kept as JSON

Decode cost is measured as (generate N tokens - generate 1 token) / (N - 1): the prefill and the image encoding
cancel out, leaving the per-token step. Rows, all on the same random model and inputs, in one run:
  * `eager dynamic`: plain `generate()` (DynamicCache), the baseline of every ratio;
  * `eager static`: `cache_implementation="static"`;
  * `compiled static`: static cache with the decode step compiled by `generate()` itself
    (`CompileConfig(fullgraph=True)`: one graph, no breaks, or the row fails);
  * `compiled static, C++ wrapper` (CPU only): the same with inductor's `cpp_wrapper` option, which removes the
    Python wrapper's per-call overhead (on a GPU, "reduce-overhead" CUDA graphs do that);
  every row's greedy tokens are compared with eager dynamic's (the note says whether they are equal);
  * `K-shot`: the same decode after a prompt of K demonstrations (K images + their text). With immediate media a
    decoding token reads only its own image's latents, so the step should not grow with K.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_generate import timed  # this folder is on sys.path when a benchmark runs as a script
from transformers import CompileConfig

from openflamingo_hf import OpenFlamingoForConditionalGeneration, decode_compile_config
from openflamingo_hf.tiny_models import tiny_openflamingo_config


def build_model(family: str, device: str) -> OpenFlamingoForConditionalGeneration:
    torch.manual_seed(0)
    model = OpenFlamingoForConditionalGeneration(tiny_openflamingo_config(family)).to(device).eval()
    with torch.no_grad():  # non-zero gates so that the cross-attention path does real work
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def few_shot_inputs(model, shots: int, batch_size: int, device: str, tokens_per_shot: int = 6):
    """`shots` demonstrations (an <image> and text each) and a query image: shots + 1 images per row."""
    config = model.config
    generator = torch.Generator().manual_seed(shots)
    length = (shots + 1) * tokens_per_shot
    ids = torch.randint(3, config.media_token_id - 1, (batch_size, length), generator=generator)
    ids[:, ::tokens_per_shot] = config.media_token_id
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, shots + 1, 1, 3, size, size, generator=generator)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device)}


def decode_ms_per_token(model, inputs, device: str, new_tokens: int, repeats: int, samples: dict | None = None,
                        **generate_kwargs) -> float:
    """Per-token decode time: the difference between generating `new_tokens` and 1 token, per extra token. `samples`,
    when given, receives every timed call in seconds under "long_s" (`new_tokens`) and "short_s" (1 token)."""

    def generate(n):
        return lambda: model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, **generate_kwargs
        )

    # `timed` warms each up first (which compiles, for the compiled row).
    samples = samples if samples is not None else {}
    long = timed(generate(new_tokens), device, repeats, samples.setdefault("long_s", []))
    short = timed(generate(1), device, repeats, samples.setdefault("short_s", []))
    return max(long - short, 1e-9) / (new_tokens - 1) * 1e3


def compile_config(device: str, cpp_wrapper: bool = True) -> CompileConfig:
    """The package's decode compile config (`decode_compile_config`: CUDA graphs on a GPU, inductor's C++ wrapper
    on CPU); with `cpp_wrapper=False` on CPU, plain inductor (its Python wrapper), to show what the wrapper costs."""
    config = decode_compile_config(device)
    if not cpp_wrapper and not device.startswith("cuda"):
        config.options = None
    return config


def greedy_tokens(model, inputs, new_tokens: int, **generate_kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, **generate_kwargs)


@torch.no_grad()
def run(family: str, device: str, batch_size: int, new_tokens: int, repeats: int, shots: list[int],
        compiled: bool = True) -> list[dict]:
    model = build_model(family, device)
    rows = []
    inputs = few_shot_inputs(model, 2, batch_size, device)
    cases = {
        "eager dynamic": {},
        "eager static": {"cache_implementation": "static"},
    }
    if compiled:
        cases["compiled static"] = {"cache_implementation": "static", "compile_config": compile_config(device, False)}
    if compiled and not device.startswith("cuda"):
        cases["compiled static, C++ wrapper"] = {
            "cache_implementation": "static", "compile_config": compile_config(device)
        }
    reference = greedy_tokens(model, inputs, new_tokens)
    for name, kwargs in cases.items():
        samples: dict = {}
        try:
            ms = decode_ms_per_token(model, inputs, device, new_tokens, repeats, samples, **kwargs)
            same = torch.equal(greedy_tokens(model, inputs, new_tokens, **kwargs), reference)
        except Exception as error:  # a row that cannot run says why, the others still run
            rows.append({"case": name, "ms_per_token": None, "note": f"failed: {str(error).splitlines()[0][:80]}",
                         "samples": samples})
            continue
        note = "2-shot prompt, tokens " + ("= eager dynamic" if same else "DIFFER from eager dynamic")
        rows.append({"case": name, "ms_per_token": ms, "note": note, "samples": samples})
    for k in shots:
        samples = {}
        ms = decode_ms_per_token(model, few_shot_inputs(model, k, batch_size, device), device, new_tokens, repeats,
                                 samples)
        rows.append({"case": f"{k}-shot", "ms_per_token": ms, "note": f"eager dynamic, {k + 1} images",
                     "samples": samples})
    return rows


def print_table(rows: list[dict], family: str, device: str, batch_size: int) -> None:
    baseline = rows[0]["ms_per_token"]
    one_shot = next((row["ms_per_token"] for row in rows if row["case"] == "1-shot"), None)
    print(f"\ndecode step, tiny {family} OpenFlamingo, {device}, batch {batch_size}\n")
    print("| case | ms/token | speed-up vs eager dynamic | vs 1-shot | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        ms = row["ms_per_token"]
        speedup = f"{baseline / ms:.2f}x" if ms and baseline else "-"
        versus = f"{ms / one_shot:.2f}x" if ms and one_shot and row["case"].endswith("-shot") else "-"
        print(f"| {row['case']} | {ms:.3f} | {speedup} | {versus} | {row['note']} |" if ms else
              f"| {row['case']} | - | - | - | {row['note']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama", help="tiny LM family: llama, gpt_neox or mosaic_gpt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the long run of each pair")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 8, 32], help="demonstration counts to compare")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (their first call compiles)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows, every timed call included, as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.family, args.device, args.batch_size, args.new_tokens, args.repeats, args.shots,
               compiled=not args.no_compile)
    print_table(rows, args.family, args.device, args.batch_size)
    if args.json:
        settings = {k: getattr(args, k) for k in ("family", "device", "batch_size", "new_tokens", "repeats", "shots")}
        Path(args.json).write_text(json.dumps({"settings": {**settings, "torch": torch.__version__}, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
