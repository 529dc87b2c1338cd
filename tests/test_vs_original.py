"""This package against the original OpenFlamingo's own code (open-flamingo 2.0.1 on transformers 4.36.2), per
language-model family: the same random weights (built by the original's `create_model_and_transforms`, converted by
`openflamingo_hf.convert`) must give the same logits, the same greedy tokens and, over two steps of the recipe (the
original's `train_one_epoch` against `OpenFlamingoTrainer`), the same per-stream losses.

Needs `.venv-original` (`bash scripts/setup_original_env.sh`; `make test` builds it, so CI runs these). Without it
the tests skip, saying so, except where OPENFLAMINGO_REQUIRE_ORIGINAL is set (CI), where they fail. The original's
side runs in one subprocess for all families (tests/_original_reference.py), ~30 s; the whole file takes ~1 minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
ORIGINAL_PYTHON = REPO / ".venv-original" / "bin" / "python"

# CI (.ci/run) sets OPENFLAMINGO_REQUIRE_ORIGINAL: there a missing environment is a failure, not a skip.
REQUIRED = os.environ.get("OPENFLAMINGO_REQUIRE_ORIGINAL", "") not in ("", "0")
pytestmark = pytest.mark.skipif(not ORIGINAL_PYTHON.exists() and not REQUIRED,
                                reason=".venv-original missing: bash scripts/setup_original_env.sh")


def _load_bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        if "bench_vs_original" in sys.modules:
            return sys.modules["bench_vs_original"]
        spec = importlib.util.spec_from_file_location("bench_vs_original", BENCHMARKS / "bench_vs_original.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_vs_original"] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


bench = _load_bench()

BASE_VOCAB = 500  # the original's tokenizer then adds <|endofchunk|> (500), <image> (501) and <PAD> (502)
CLIP = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}}
FAMILIES = {
    # family: (transformers model type, its config, cross_attn_every_n_layers)
    "llama": ("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}, 1),
    "gpt_neox": ("gpt_neox", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                              "num_attention_heads": 4, "hidden_act": "gelu", "rotary_pct": 0.5,
                              "max_position_embeddings": 256, "use_parallel_residual": True,
                              "tie_word_embeddings": False}, 2),
    # transformers' MptForCausalLM always uses expansion ratio 4 (as MPT-1B and MPT-7B do); ours reads the field.
    # transformers' MptForCausalLM always uses expansion ratio 4 (MPT-1B's and MPT-7B's); ours reads the field.
    "mpt": ("mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 256,
                    "no_bias": True, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                    "attn_config": {"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "clip_qkv": None}}, 1),
}
SHAPES = {name: bench.Shape(name=f"test-{name}", open_clip_config=CLIP, text_model_type=model_type,
                            text_kwargs=kwargs, base_vocab=BASE_VOCAB, cross_attn_every_n_layers=every)
          for name, (model_type, kwargs, every) in FAMILIES.items()}
GENERATE = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 1, "do_sample": False}
LAION = {"batch": 4, "images": 1, "tokens": 16}
MMC4 = {"batch": 2, "images": 3, "tokens": 48}
TRAIN_STEPS = 2


def _inputs() -> dict:
    """Prompts (2 rows x 3 images, the last chunk open) and the two streams' training batches."""
    g = torch.Generator().manual_seed(0)
    media, eoc, size = BASE_VOCAB + 1, BASE_VOCAB, CLIP["vision_cfg"]["image_size"]

    def pixels(rows, images):
        return torch.randn(rows, images, 1, 3, size, size, generator=g)

    return {
        "gen_ids": bench.chunked_ids(g, 2, 30, 3, BASE_VOCAB, media, eoc, close_last=False),
        "gen_pixels": pixels(2, 3),
        "laion_ids": bench.chunked_ids(g, LAION["batch"], LAION["tokens"], 1, BASE_VOCAB, media, eoc),
        "laion_pixels": pixels(LAION["batch"], 1),
        "mmc4_ids": bench.chunked_ids(g, MMC4["batch"], MMC4["tokens"], MMC4["images"], BASE_VOCAB, media, eoc),
        "mmc4_pixels": pixels(MMC4["batch"], MMC4["images"]),
    }


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original's results for every family (one subprocess in .venv-original), and the inputs they came from."""
    assert ORIGINAL_PYTHON.exists(), ".venv-original missing (required here): bash scripts/setup_original_env.sh"
    folder = tmp_path_factory.mktemp("original")
    inputs = _inputs()
    torch.save(inputs, folder / "inputs.pt")
    request = {"families": {name: shape.to_worker() for name, shape in SHAPES.items()}, "workdir": str(folder),
               "inputs": str(folder / "inputs.pt"), "out": str(folder / "results.pt"), "generate_kwargs": GENERATE,
               "train_steps": TRAIN_STEPS}
    (folder / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # this package's path must not leak into the other environment
    done = subprocess.run([str(ORIGINAL_PYTHON), str(REPO / "tests" / "_original_reference.py"),
                           str(folder / "request.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280)  # under pytest's per-test limit, so that its stderr is shown
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "results.pt", weights_only=False), inputs, folder


def _ours(original, family):
    results, inputs, _ = original
    result = results[family]
    state_dict = torch.load(result["meta"]["state_dict"], weights_only=True)
    model, report = bench.convert_to_ours(state_dict, SHAPES[family], result["meta"])
    return model, result, inputs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_equal_the_originals(original, family):
    model, result, inputs = _ours(original, family)
    ids, pixels = inputs["gen_ids"], inputs["gen_pixels"]
    gates = [block.attn_gate.item() for block in model.gated_cross_attn_layers.values()]
    assert gates and all(abs(g - 0.5) < 1e-6 for g in gates)  # open gates: the images (and tanh) matter
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
        tokens = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), **GENERATE)
    expected = result["logits"]
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert tokens[:, ids.shape[1]:].tolist() == result["tokens"]
    # The images change the logits, so agreeing means agreeing on the vision path too.
    with torch.no_grad():
        blind = model(input_ids=ids, pixel_values=torch.zeros_like(pixels), attention_mask=torch.ones_like(ids)).logits
    assert (blind - expected).abs().amax() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_training_steps_give_the_originals_losses(original, family, monkeypatch, tmp_path):
    """Step 1's LAION and MMC4 losses (the loss and its labels) and step 2's (the update of step 1: gradients,
    embedding rows, clipping, AdamW) equal those of the original's `train_one_epoch` on the same batches."""
    monkeypatch.setattr(bench, "LAION", LAION)
    monkeypatch.setattr(bench, "MMC4", MMC4)
    model, result, inputs = _ours(original, family)
    trainer = bench.make_our_trainer(model, inputs, steps=TRAIN_STEPS, device="cpu", bf16=False, workdir=tmp_path)
    trainer.train()
    ours = [[float(trainer._stream_losses[name][step]) for name in ("laion", "mmc4")] for step in range(TRAIN_STEPS)]
    assert len(result["losses"]) == TRAIN_STEPS
    for step, (theirs, mine) in enumerate(zip(result["losses"], ours)):
        # fp32 on both sides agrees to ~2e-7; a step moves the losses by 1e-2 or more.
        assert mine == pytest.approx(theirs, rel=1e-5), f"step {step + 1}: original {theirs}, ours {mine}"
    assert all(abs(a - b) > 1e-3 for a, b in zip(ours[0], ours[1]))  # the first step changed the model
