"""This package against the original OpenFlamingo: same weights, interleaved runs, medians, a table with ratios.

    bash scripts/setup_original_env.sh                                 # once: .venv-original (open-flamingo 2.0.1)
    .venv/bin/python benchmarks/bench_vs_original.py                   # small shapes on CPU (see below for time)
    .venv/bin/python benchmarks/bench_vs_original.py --shape of3b --bf16   # a release's shapes, on a GPU

The original runs in `.venv-original` (open-flamingo 2.0.1 on transformers 4.36.2: its `generate` fails on
transformers 5), in a long-lived worker process (`benchmarks/_original_worker.py`, JSON lines over a pipe); this
package runs in this process. Nothing is downloaded. Elsewhere (a GPU machine with its own torch, where
`benchmarks/device_suite.sh` installs the original into a `pip --target` folder) `--original-python` names the
worker's interpreter and `--original-path` its PYTHONPATH (or the environment variables OPENFLAMINGO_ORIGINAL_PYTHON
and OPENFLAMINGO_ORIGINAL_PATH); the worker never inherits this process's PYTHONPATH, so the sides never mix.

1. Same weights. The worker builds the original model with the original's own `create_model_and_transforms` from
   random backbones (an open_clip ViT config registered with `open_clip.add_model_config`, a language model folder
   with a config and tokenizer), opens the gated blocks' gates (0 at init, which would hide the images), and saves
   its full state dict; `openflamingo_hf.convert.convert_original_state_dict` turns it into our model.
2. Same tokens. Greedy generation (B=1 and B=8) must give identical tokens on both sides, else the run stops.
3. Timing, interleaved rep by rep (original, ours, ours compiled, original, ...) so that machine noise hits every
   system alike; medians are reported. Each generation is timed step by step by a logits processor (the same one
   on both sides): the first step closes the prefill, the gaps after it are decode steps. The original's `generate`
   runs under `torch.inference_mode()`, as its evaluation code calls it; ours as `generate` is (its own no_grad).
   - greedy B=1 and B=8: 3 images + 64 prompt tokens, 32 new tokens; decode ms per step and tokens/s;
   - 16-shot prefill: 16 demonstrations + the query (17 images, 408 tokens), time to the first token;
   - beam search, 3 beams (the evaluation setting): B=4, 3 images + 64 tokens, 20 new tokens, whole `generate`;
   - the recipe's training step: one LAION batch (32 x 1 image x 32 tokens) and one MMC4 batch (8 x 5 images x 256
     tokens), forward + backward per stream, embedding-row rule, clipping, AdamW. The original runs its own
     `open_flamingo.train.train_utils.train_one_epoch` (label masking in the loop included, as it does it); ours is
     `OpenFlamingoTrainer` on pre-tokenized samples with the same labels (made by the data pipeline, as ours does
     it). Samples/s and peak memory above the loaded model (CPU: resident-set high-water mark; CUDA:
     max_memory_allocated). The first step's losses are compared.
   Ours is timed twice where it applies: with the default `generate`, and with `cache_implementation="static"` plus
   transformers' automatic compilation of the decode step (`compile_config`); a configuration that fails is
   reported as failed with the error's first line, and the run goes on.

Shapes: `small` (default): ViT 128 wide, 4 layers, 56 px; Llama 256 wide, 4 layers, vocabulary 4096; gated block
before every layer; the original's fixed Perceiver and cross-attention sizes (6 layers, 8 heads of 64, 64 latents).
`small_mpt`: the same with a 4-layer MPT (gated block every 2 layers) built from its config, the releases' MPT path
at CPU size.
`of3b`, `of4b`, `of9b`: CLIP ViT-L/14 and the release's language model with random weights (of3b with transformers'
MPT at MPT-1B's sizes: the release's MosaicGPT is remote code that the original loads from the Hub). On our side the
MPT shapes run this package's fast MPT, `MosaicGPTForCausalLM` (`MosaicGPTConfig.from_mpt_config`: SDPA, static cache,
compilable), onto which the converter maps the original's transformers-MPT weights, as the 9B release converts.

Threads: one torch thread per side on CPU by default (`--threads N` to change). On a small shared machine, two
threads per op mostly measure the scheduler: in one run on 2 busy cores a B=1 decode step took 30x longer than
with one thread, B=8 steps were faster than B=1 steps, and the training ratio flipped.

Time: the default run takes about 4 minutes on a quiet 2-core machine once torch's inductor cache is warm; the first
run also compiles the decode step once per batch shape (a few minutes more on a small CPU); `--no-compile` skips that
configuration. On a machine shared with other work everything takes longer and the timings are noisier: read the
ratios, and rerun when they matter.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _original_worker import (  # the worker module sits beside this file
    PeakMemory,
    cast_state_dict,
    first_line,
    generation_timing,
    make_step_stamps,
    recipe_labels,
    sync,
)

REPO = Path(__file__).resolve().parent.parent
ORIGINAL_PYTHON = REPO / ".venv-original" / "bin" / "python"
# Where the original runs instead of .venv-original (the device suite: that machine's python + a --target folder).
ORIGINAL_PYTHON_ENV, ORIGINAL_PATH_ENV = "OPENFLAMINGO_ORIGINAL_PYTHON", "OPENFLAMINGO_ORIGINAL_PATH"
WORKER = Path(__file__).resolve().parent / "_original_worker.py"
SETUP_HINT = "bash scripts/setup_original_env.sh"

# ----------------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------------

VIT_L_14 = {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}
OPEN_CLIP_TEXT_TOWER = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
GPT_NEOX_VOCAB = 50277  # the releases' tokenizer; the original adds three tokens (50280 rows)


@dataclass(frozen=True)
class Shape:
    """One model shape, described once for both sides (the worker gets it as JSON)."""

    name: str
    open_clip_config: dict
    text_model_type: str
    text_kwargs: dict
    base_vocab: int
    cross_attn_every_n_layers: int
    # Small language models go to disk and through the original's from_pretrained; release-sized ones are built
    # from their config with random weights (MPT-7B in fp32 is 28 GB).
    save_lm_weights: bool = True
    note: str = ""

    @property
    def open_clip_name(self) -> str:
        return f"bench-{self.name}-vit"

    @property
    def image_size(self) -> int:
        return self.open_clip_config["vision_cfg"]["image_size"]

    def to_worker(self) -> dict:
        return {"open_clip_name": self.open_clip_name, "open_clip_config": self.open_clip_config,
                "text": {"model_type": self.text_model_type, "kwargs": self.text_kwargs},
                "base_vocab": self.base_vocab, "cross_attn_every_n_layers": self.cross_attn_every_n_layers,
                "save_lm_weights": self.save_lm_weights}


def _mpt_kwargs(d_model: int, n_heads: int, n_layers: int) -> dict:
    return {"d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "expansion_ratio": 4, "max_seq_len": 2048,
            "no_bias": True, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "clip_qkv": None}}


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            name="small",
            open_clip_config={"embed_dim": 64, "quick_gelu": True,
                              "vision_cfg": {"image_size": 56, "layers": 4, "width": 128, "patch_size": 14,
                                             "mlp_ratio": 2.0},
                              "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1,
                                           "layers": 1}},
            text_model_type="llama",
            text_kwargs={"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
                         "tie_word_embeddings": False},
            base_vocab=4093,
            cross_attn_every_n_layers=1,
        ),
        Shape(
            # The small shape on the releases' MPT path (transformers' MPT built from its config in the original, our
            # MosaicGPTForCausalLM): what benchmarks/device_suite.sh's CPU dry run runs for its of3b and of9b parts.
            name="small_mpt",
            open_clip_config={"embed_dim": 64, "quick_gelu": True,
                              "vision_cfg": {"image_size": 56, "layers": 4, "width": 128, "patch_size": 14,
                                             "mlp_ratio": 2.0},
                              "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1,
                                           "layers": 1}},
            text_model_type="mpt",
            text_kwargs={**_mpt_kwargs(256, 4, 4), "max_seq_len": 1024},
            base_vocab=4093,
            cross_attn_every_n_layers=2,
            save_lm_weights=False,
            note="the small shape with an MPT language model built from its config, as of3b and of9b are",
        ),
        Shape(
            name="of3b",
            open_clip_config={"embed_dim": 768, "quick_gelu": True, "vision_cfg": VIT_L_14,
                              "text_cfg": OPEN_CLIP_TEXT_TOWER},
            text_model_type="mpt",
            text_kwargs=_mpt_kwargs(2048, 16, 24),
            base_vocab=GPT_NEOX_VOCAB,
            cross_attn_every_n_layers=1,
            save_lm_weights=False,
            note="MPT-1B's sizes, transformers' MPT in the original, our MosaicGPTForCausalLM (the release's MosaicGPT "
                 "adds q/k LayerNorm)",
        ),
        Shape(
            name="of4b",
            open_clip_config={"embed_dim": 768, "quick_gelu": True, "vision_cfg": VIT_L_14,
                              "text_cfg": OPEN_CLIP_TEXT_TOWER},
            text_model_type="gpt_neox",
            text_kwargs={"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
                         "intermediate_size": 10240, "hidden_act": "gelu", "rotary_pct": 1.0,
                         "rotary_emb_base": 10000, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
                         "use_parallel_residual": False, "tie_word_embeddings": False},
            base_vocab=GPT_NEOX_VOCAB,
            cross_attn_every_n_layers=2,
            save_lm_weights=False,
        ),
        Shape(
            name="of9b",
            open_clip_config={"embed_dim": 768, "quick_gelu": True, "vision_cfg": VIT_L_14,
                              "text_cfg": OPEN_CLIP_TEXT_TOWER},
            text_model_type="mpt",
            text_kwargs=_mpt_kwargs(4096, 32, 32),
            base_vocab=GPT_NEOX_VOCAB,
            cross_attn_every_n_layers=4,
            save_lm_weights=False,
        ),
    )
}

# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCase:
    """One generation workload: which prompt set, batch size and `generate` arguments; what the table reports."""

    name: str
    label: str
    input: str  # "gen" (3 images + 64 tokens) or "shots" (16-shot prompt)
    batch: int
    generate_kwargs: dict
    metric: str  # "decode" (ms per step, tok/s), "prefill" (ms to the first token) or "total" (ms per generate)
    target: float | None = None


GENERATION_CASES: dict[str, GenerationCase] = {
    case.name: case
    for case in (
        GenerationCase("greedy_b1", "greedy B=1 decode", "gen", 1,
                       {"max_new_tokens": 32, "min_new_tokens": 32, "num_beams": 1, "do_sample": False}, "decode",
                       target=1.5),
        GenerationCase("greedy_b8", "greedy B=8 decode", "gen", 8,
                       {"max_new_tokens": 32, "min_new_tokens": 32, "num_beams": 1, "do_sample": False}, "decode",
                       target=2.0),
        GenerationCase("prefill_16shot", "16-shot prefill (B=1)", "shots", 1,
                       {"max_new_tokens": 1, "min_new_tokens": 1, "num_beams": 1, "do_sample": False}, "prefill"),
        GenerationCase("beam3", "beam search, 3 beams (B=4, 20 tokens)", "gen", 4,
                       {"max_new_tokens": 20, "min_new_tokens": 20, "num_beams": 3, "length_penalty": 0.0,
                        "do_sample": False}, "total", target=2.0),
    )
}
TRAIN_CASE = "train"
ALL_CASES = [*GENERATION_CASES, TRAIN_CASE]
TRAIN_TARGET = 1.2  # samples/s, at no more peak memory
GEN_PROMPT_TOKENS, GEN_IMAGES = 64, 3
SHOTS, SHOT_TOKENS = 16, 24
LAION = {"batch": 32, "images": 1, "tokens": 32}
MMC4 = {"batch": 8, "images": 5, "tokens": 256}

ORIGINAL, OURS, OURS_COMPILED = "original", "ours", "ours_compiled"
SYSTEM_LABELS = {ORIGINAL: "original", OURS: "ours", OURS_COMPILED: "ours, static cache + compile"}

# ----------------------------------------------------------------------------------------------------------------------
# Inputs (made here, sent to the worker as one file)
# ----------------------------------------------------------------------------------------------------------------------


def chunked_ids(generator, rows: int, tokens: int, images: int, vocab: int, media: int, eoc: int,
                close_last: bool = True):
    """Random text ids in `images` chunks, each `<image> words ... <|endofchunk|>` (the last one open if asked)."""
    import torch

    ids = torch.randint(2, vocab, (rows, tokens), generator=generator)  # 0 / 1: the tokenizer's unk / eos
    chunk = tokens // images
    for k in range(images):
        ids[:, k * chunk] = media
        if close_last or k < images - 1:
            ids[:, (k + 1) * chunk - 1] = eoc
    return ids


def make_inputs(shape: Shape, meta: dict, seed: int = 0) -> dict:
    """Prompts, images and training batches, the same tensors for both sides."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size, vocab = shape.image_size, shape.base_vocab
    media, eoc = meta["media_token_id"], meta["eoc_token_id"]

    def pixels(rows: int, images: int):
        return torch.randn(rows, images, 1, 3, size, size, generator=g)

    max_batch = max(c.batch for c in GENERATION_CASES.values())
    return {
        "gen_ids": chunked_ids(g, max_batch, GEN_PROMPT_TOKENS, GEN_IMAGES, vocab, media, eoc, close_last=False),
        "gen_pixels": pixels(max_batch, GEN_IMAGES),
        "shots_ids": chunked_ids(g, 1, (SHOTS + 1) * SHOT_TOKENS, SHOTS + 1, vocab, media, eoc, close_last=False),
        "shots_pixels": pixels(1, SHOTS + 1),
        "laion_ids": chunked_ids(g, LAION["batch"], LAION["tokens"], 1, vocab, media, eoc),
        "laion_pixels": pixels(LAION["batch"], 1),
        "mmc4_ids": chunked_ids(g, MMC4["batch"], MMC4["tokens"], MMC4["images"], vocab, media, eoc),
        "mmc4_pixels": pixels(MMC4["batch"], MMC4["images"]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# The original's side: the worker process
# ----------------------------------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A failure the run cannot go on from; its message is one line for the user."""


class OriginalWorker:
    """The original model in `.venv-original`, behind a JSON-lines pipe (see `_original_worker.py`)."""

    def __init__(self, python: Path = ORIGINAL_PYTHON, log_path: Path | None = None, path: str | None = None):
        """`python`: the worker's interpreter; `path`: its whole PYTHONPATH (None: none, as in `.venv-original`)."""
        if not python.exists():
            raise BenchError(f"{python.relative_to(REPO) if python.is_relative_to(REPO) else python} is missing: "
                             f"run `{SETUP_HINT}` first (it installs open-flamingo 2.0.1 on transformers 4.36.2).")
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="original_worker_", suffix=".log")[1])
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open for the worker's lifetime; closed in close())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # this package's path must not leak into the other environment
        if path:  # the original's own folders (a --target install beside another interpreter's torch)
            env["PYTHONPATH"] = path
        self.process = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True, cwd=REPO, env=env)

    def request(self, cmd: str, **fields) -> dict:
        """Sends one request and waits for its reply; a failed request raises `BenchError` with its first line."""
        try:
            self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise BenchError(f"the original's worker exited during '{cmd}' (status {self.process.poll()}); "
                             f"see {self.log_path}: {self._log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            self._log.write(reply.get("traceback", "") + "\n")
            self._log.flush()
            raise BenchError(f"original, {cmd}: {reply['error']} (traceback in {self.log_path})")
        return reply

    def _log_tail(self) -> str:
        self._log.flush()
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "(no output)"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.request("quit")
            except BenchError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


# ----------------------------------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------------------------------


def our_config(shape: Shape, meta: dict):
    """Our `OpenFlamingoConfig` for the original's model: the same backbone sizes and the ids its tokenizer gave."""
    from transformers import AutoConfig, CLIPVisionConfig

    from openflamingo_hf import OpenFlamingoConfig
    from openflamingo_hf.modeling.configuration_mosaic_gpt import MosaicGPTConfig

    clip = shape.open_clip_config
    vision = clip["vision_cfg"]
    width = vision["width"]
    vision_config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"], num_attention_heads=width // vision.get("head_width", 64),
        patch_size=vision["patch_size"], image_size=vision["image_size"], projection_dim=clip["embed_dim"],
        hidden_act="quick_gelu" if clip.get("quick_gelu") else "gelu", layer_norm_eps=1e-5,
    )
    text_config = AutoConfig.for_model(shape.text_model_type, **shape.text_kwargs, vocab_size=meta["vocab_size"],
                                       pad_token_id=meta["pad_token_id"])
    if shape.text_model_type == "mpt":  # our fast MPT: the original's MptForCausalLM weights convert onto it
        text_config = MosaicGPTConfig.from_mpt_config(text_config)
    return OpenFlamingoConfig(
        vision_config=vision_config, text_config=text_config,
        cross_attn_every_n_layers=shape.cross_attn_every_n_layers, media_token_id=meta["media_token_id"],
        eoc_token_id=meta["eoc_token_id"], only_attend_immediate_media=True,
        decoder_layers_attr_name=meta.get("decoder_layers_attr_name"),
    )


def convert_to_ours(state_dict: dict, shape: Shape, meta: dict):
    """The original's state dict through `openflamingo_hf.convert` into our model (strict: every key accounted for)."""
    from openflamingo_hf import OpenFlamingoForConditionalGeneration
    from openflamingo_hf.convert import convert_original_state_dict
    from openflamingo_hf.modeling.modeling_openflamingo import openflamingo_generation_config

    config = our_config(shape, meta)
    converted, report = convert_original_state_dict(state_dict, config, return_report=True)
    model = OpenFlamingoForConditionalGeneration.from_pretrained(None, config=config, state_dict=converted)
    model.generation_config = openflamingo_generation_config(model.config, model.generation_config)
    return model.eval(), report


def compile_settings(device: str) -> dict:
    """`generate` arguments of our best decode configuration: a static cache, whose decode step transformers compiles
    by itself with the package's `decode_compile_config` (CUDA graphs on a GPU, inductor's C++ wrapper on CPU)."""
    from openflamingo_hf import decode_compile_config

    return {"cache_implementation": "static", "compile_config": decode_compile_config(device)}


class OursGenerator:
    """Our model's `generate`, timed exactly as the worker times the original's."""

    def __init__(self, model, inputs: dict, device: str, compiled: bool):
        self.model, self.inputs, self.device = model, inputs, device
        self.extra = compile_settings(device) if compiled else {}
        self.compiled = compiled

    def generate(self, case: GenerationCase, return_tokens: bool = False) -> dict:
        import torch
        from transformers import LogitsProcessorList

        ids = self.inputs[case.input + "_ids"][: case.batch].to(self.device)
        pixels = self.inputs[case.input + "_pixels"][: case.batch].to(self.device, self.model.dtype)
        stamps = make_step_stamps(self.device)
        sync(self.device)
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                  logits_processor=LogitsProcessorList([stamps]), **case.generate_kwargs,
                                  **self.extra)
        sync(self.device)
        end = time.perf_counter()
        reply: dict[str, Any] = generation_timing(start, stamps.stamps, end)
        if return_tokens:
            reply["tokens"] = out[:, ids.shape[1]:].tolist()
        if self.compiled:
            reply["compiled"] = hasattr(self.model, "_compiled_call")
        return reply


class SteppedTrainer:
    """
    `OpenFlamingoTrainer.train()` in a thread that waits before each step until `step()` lets it go, so that our
    steps can alternate with the original's one by one. A step is timed from its release (before its batch is
    fetched and collated) to `on_step_end`.
    """

    def __init__(self, trainer, device: str):
        from transformers import TrainerCallback

        self.trainer, self.device = trainer, device
        self._go = threading.Semaphore(0)
        self._events: queue.Queue = queue.Queue()
        self._closing = False
        gate = self

        class Gate(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                gate._events.put(("ready", None))
                gate._go.acquire()

            def on_step_end(self, args, state, control, **kwargs):
                sync(gate.device)
                gate._events.put(("step", time.perf_counter()))
                if not gate._closing:
                    gate._go.acquire()
                if gate._closing:  # closed early (the other side failed): no more steps
                    control.should_training_stop = True
                return control

        trainer.add_callback(Gate())
        self._thread = threading.Thread(target=self._run, name="ours-trainer", daemon=True)
        self._thread.start()
        self._expect("ready")

    def _run(self) -> None:
        try:
            self.trainer.train()
        except BaseException as error:  # noqa: BLE001 (handed to the main thread, which raises it)
            self._events.put(("error", error))
        else:
            self._events.put(("done", None))

    def _expect(self, kind: str, timeout: float = 3600.0):
        event, value = self._events.get(timeout=timeout)
        if event == "error":
            raise value
        if event != kind:
            raise RuntimeError(f"trainer thread: expected {kind}, got {event}")
        return value

    def step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self._go.release()
        return self._expect("step") - start

    def close(self) -> None:
        """Lets the thread finish (stopping training early if steps are left) and waits for it."""
        self._closing = True
        self._go.release()
        try:
            while True:
                event, value = self._events.get(timeout=600)
                if event == "error":
                    raise value
                if event == "done":
                    break
        finally:
            self._thread.join(timeout=60)


def make_our_trainer(model, inputs: dict, steps: int, device: str, bf16: bool, workdir: Path):
    """`OpenFlamingoTrainer` on the recipe's two streams, one batch of each per step, as the recipe trains."""
    import torch
    from torch.utils.data import Dataset
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from openflamingo_hf.trainer import OpenFlamingoDataCollator, OpenFlamingoTrainer, freeze_for_recipe

    config = model.config
    pad = config.get_text_config().pad_token_id

    class Repeat(Dataset):
        def __init__(self, stream: str):
            ids, pixels = inputs[stream + "_ids"], inputs[stream + "_pixels"]
            labels = recipe_labels(ids, config.media_token_id, config.eoc_token_id, pad, stream)
            self.rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i],
                          "pixel_values": pixels[i]} for i in range(ids.shape[0])]

        def __len__(self) -> int:
            return len(self.rows) * (steps + 2)

        def __getitem__(self, index: int) -> dict:
            return self.rows[index % len(self.rows)]

    freeze_for_recipe(model)
    arguments = TrainingArguments(
        str(workdir / "trainer"), max_steps=steps, learning_rate=1e-4, weight_decay=0.1, report_to=[],
        use_cpu=device == "cpu", bf16=bf16, save_strategy="no", disable_tqdm=True, logging_steps=10**9,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=device != "cpu",
    )
    trainer = OpenFlamingoTrainer(
        model=model, args=arguments, data_collator=OpenFlamingoDataCollator(pad_token_id=pad),
        streams={"laion": Repeat("laion"), "mmc4": Repeat("mmc4")},
        stream_batch_sizes={"laion": LAION["batch"], "mmc4": MMC4["batch"]},
        loss_multipliers={"laion": 0.2, "mmc4": 1.0},
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training line would land in the middle of the report
    return trainer


# ----------------------------------------------------------------------------------------------------------------------
# Results and the table (pure: no torch)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SystemResult:
    """One system on one case: its samples (seconds, or bytes for memory), or why it has none."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None


@dataclass
class CaseResult:
    """One table row: `kind` says how to read the samples ("time" in seconds, lower is better; "memory" in bytes)."""

    name: str
    label: str
    kind: str  # "time" | "memory"
    unit_items: float  # tokens (decode), samples (train) per timed unit; 0 for plain latencies
    item_name: str  # "tok/s", "samples/s" or ""
    systems: dict[str, SystemResult] = field(default_factory=dict)
    target: float | None = None
    note: str = ""


def ratio(case: CaseResult, system: str) -> float | None:
    """Ours relative to the original: original time / ours time (> 1: ours faster); for memory ours / original."""
    original, ours = case.systems.get(ORIGINAL), case.systems.get(system)
    if original is None or ours is None or original.median is None or ours.median is None:
        return None
    if case.kind == "memory":
        return ours.median / original.median if original.median else None
    return original.median / ours.median if ours.median else None


def format_value(case: CaseResult, result: SystemResult | None) -> str:
    """One cell: `failed: ...`, `n/a`, or the median with its unit (and throughput where it applies)."""
    if result is None:
        return "n/a"
    if result.error:
        return f"failed: {result.error}"
    value = result.median
    if value is None:
        return "n/a"
    if case.kind == "memory":
        text = f"{value / 2**20:.0f} MiB"
    elif value >= 1:
        text = f"{value:.2f} s"
    else:
        text = f"{value * 1e3:.1f} ms"
    if case.unit_items and case.kind == "time":
        text += f" ({case.unit_items / value:.1f} {case.item_name})"
    if result.note:
        text += f" [{result.note}]"
    return text


def format_ratio(case: CaseResult, system: str) -> str:
    value = ratio(case, system)
    return "n/a" if value is None else f"{value:.2f}×"


def format_target(case: CaseResult) -> str:
    """The issue's goal for the row, and whether the best of our configurations meets it now."""
    if case.target is None:
        return ""
    values = [v for v in (ratio(case, OURS), ratio(case, OURS_COMPILED)) if v is not None]
    if case.kind == "memory":
        met = bool(values) and min(values) <= case.target
        return f"≤ {case.target:g}× ({'met' if met else 'not met'})"
    met = bool(values) and max(values) >= case.target
    return f"≥ {case.target:g}× ({'met' if met else 'not met'})"


def markdown_table(cases: list[CaseResult]) -> str:
    """The results as a Markdown table, one row per case, ours relative to the original."""
    header = ["case", "original", "ours", "ours vs original", SYSTEM_LABELS[OURS_COMPILED], "vs original",
              "target", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for case in cases:
        cells = [case.label, format_value(case, case.systems.get(ORIGINAL)), format_value(case, case.systems.get(OURS)),
                 format_ratio(case, OURS), format_value(case, case.systems.get(OURS_COMPILED)),
                 format_ratio(case, OURS_COMPILED), format_target(case), case.note]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def results_json(cases: list[CaseResult], header: dict) -> dict:
    return {"header": header, "cases": [
        {**dataclasses.asdict(case), "ratios": {s: ratio(case, s) for s in (OURS, OURS_COMPILED)}} for case in cases
    ]}


def interleaved_order(systems: list[str], rep: int) -> list[str]:
    """The systems in a rotated order for repetition `rep`, so that none always runs right after another."""
    k = rep % len(systems) if systems else 0
    return systems[k:] + systems[:k]


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    shape: Shape
    device: str
    bf16: bool
    reps: int
    warmup: int
    train_reps: int
    train_warmup: int
    cases: list[str]
    compiled: bool
    workdir: Path
    threads: int | None = None
    original_python: Path = ORIGINAL_PYTHON
    original_path: str | None = None


GREEDY_CHECK_CASES = ("greedy_b1", "greedy_b8")


def compare_tokens(case: GenerationCase, original: list[list[int]], ours: list[list[int]]) -> str:
    """Raises `BenchError` naming the first difference; returns the summary of an identical pair."""
    if original != ours:
        row = next((i for i, (a, b) in enumerate(zip(original, ours)) if a != b), 0)
        position = next((j for j, (a, b) in enumerate(zip(original[row], ours[row])) if a != b), 0)
        raise BenchError(
            f"greedy tokens differ ({case.label}, row {row}, new token {position}: original "
            f"{original[row][position:position + 3]}..., ours {ours[row][position:position + 3]}...); the "
            "conversion or the model is not equivalent, so no timing is reported."
        )
    return f"B={case.batch}: {len(ours)} x {len(ours[0])} new tokens identical"


def check_tokens(worker: OriginalWorker, ours: OursGenerator, case: GenerationCase) -> str:
    """One greedy generation per side (for a check case that is not timed, whose first rep would do it)."""
    request = {"input": case.input, "batch": case.batch, "generate_kwargs": case.generate_kwargs}
    original = worker.request("generate", **request, return_tokens=True)["tokens"]
    return compare_tokens(case, original, ours.generate(case, return_tokens=True)["tokens"])


def run_generation_case(case: GenerationCase, worker: OriginalWorker, generators: dict[str, OursGenerator],
                        settings: Settings, reference_tokens: dict, log, checks: list[str] | None = None) -> CaseResult:
    """
    Warm-up reps, then timed reps, the systems alternating; a configuration of ours that fails keeps its error and
    drops out. With `checks`, the first rep is the token check: ours (default `generate`) must reproduce the
    original's tokens, else `BenchError`; the summary is appended to `checks`.
    """
    metric = {"decode": "decode_step", "prefill": "prefill", "total": "total"}[case.metric]
    items = case.batch if case.metric == "decode" else 0
    result = CaseResult(case.name, case.label, "time", items, "tok/s" if items else "", target=case.target)
    if case.metric == "decode":
        result.label += " (per step)"
    systems = [ORIGINAL, *generators]
    for system in systems:
        result.systems[system] = SystemResult()
    request = {"input": case.input, "batch": case.batch, "generate_kwargs": case.generate_kwargs}
    for rep in range(settings.warmup + settings.reps):
        warm = rep < settings.warmup
        for system in interleaved_order(systems, rep):
            entry = result.systems[system]
            if entry.error:
                continue
            first = rep == 0
            try:
                start = time.perf_counter()
                if system == ORIGINAL:
                    reply = worker.request("generate", **request, return_tokens=first)
                else:
                    reply = generators[system].generate(case, return_tokens=first)
                elapsed = time.perf_counter() - start
            except BenchError:
                raise
            except Exception as error:  # our configuration failed: report it in its cell, go on with the others
                if checks is not None and system == OURS:
                    raise BenchError(f"ours, {case.label}: {first_line(error)}") from error
                entry.error = first_line(error)[:160]
                log(f"{case.name} / {system}: failed: {entry.error}")
                continue
            if first:
                reference_tokens.setdefault(case.name, {})[system] = reply.get("tokens")
                if system == OURS_COMPILED:
                    entry.note = ("compiled" if reply.get("compiled") else "static cache, not compiled") + (
                        f", 1st call {elapsed:.0f} s" if elapsed >= 1 else "")
            if not warm:
                entry.samples.append(reply[metric])
        if rep == 0 and checks is not None:
            tokens = reference_tokens[case.name]
            checks.append(compare_tokens(case, tokens[ORIGINAL], tokens[OURS]))
            log(f"greedy tokens identical: {checks[-1]}")
    tokens = reference_tokens.get(case.name, {})
    differing = [SYSTEM_LABELS[s] for s in generators if tokens.get(s) is not None
                 and tokens.get(ORIGINAL) is not None and tokens[s] != tokens[ORIGINAL]]
    result.note = f"tokens differ: {', '.join(differing)}" if differing else "same tokens"
    return result


def run_training(model, worker: OriginalWorker, inputs: dict, settings: Settings, log) -> list[CaseResult]:
    """The recipe's step on both sides, interleaved; step time and peak memory rows."""
    import torch

    samples_per_step = LAION["batch"] + MMC4["batch"]
    step = CaseResult(TRAIN_CASE, "training step (LAION 32 + MMC4 8)", "time", samples_per_step, "samples/s",
                      target=TRAIN_TARGET)
    memory = CaseResult("train_memory", "training peak memory above the model", "memory", 0, "", target=1.0)
    for row in (step, memory):
        row.systems = {ORIGINAL: SystemResult(), OURS: SystemResult()}
    if settings.bf16:  # training keeps fp32 weights under bf16 autocast, as the recipe does
        model.to(torch.float32)
        worker.request("cast", dtype="float32")
    worker.request("train_setup", bf16=settings.bf16)
    steps = settings.train_warmup + settings.train_reps
    trainer = make_our_trainer(model, inputs, steps, settings.device, settings.bf16, settings.workdir)
    stepped = SteppedTrainer(trainer, settings.device)
    meter = PeakMemory(settings.device)
    meter.reset()
    worker.request("memory_reset")
    original_losses = None
    try:
        for rep in range(steps):
            for system in interleaved_order([ORIGINAL, OURS], rep):
                if system == ORIGINAL:
                    reply = worker.request("train_step")
                    seconds = reply["seconds"]
                    original_losses = original_losses or reply["losses"]
                else:
                    seconds = stepped.step()
                if rep >= settings.train_warmup:
                    step.systems[system].samples.append(seconds)
            log(f"training step {rep + 1}/{steps}")
    finally:
        stepped.close()
    memory.systems[OURS].samples.append(float(meter.peak()))
    memory.systems[ORIGINAL].samples.append(float(worker.request("memory_peak")["peak"]))
    ours_losses = [float(trainer._stream_losses[name][0]) for name in ("laion", "mmc4")]
    step.note = loss_note(original_losses, ours_losses, settings.bf16)
    memory.note = "CUDA max_memory_allocated" if settings.device.startswith("cuda") else "RSS high-water mark"
    return [step, memory]


def loss_note(original: list[float] | None, ours: list[float], bf16: bool) -> str:
    """Whether the first step's LAION and MMC4 losses agree (same weights, same batches, same labels)."""
    if not original or len(original) < 2:
        return "original losses unavailable"
    tolerance = 2e-2 if bf16 else 1e-3
    agree = all(abs(a - b) <= tolerance * max(1.0, abs(a)) for a, b in zip(original, ours))
    shown = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(original, ours))
    return f"1st-step losses {'agree' if agree else 'DIFFER'} (orig/ours laion, mmc4: {shown})"


def machine_header(settings: Settings, versions: dict) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if settings.device.startswith("cuda") else f"{cpu}, {os.cpu_count()} cores"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "shape": settings.shape.name,
        "device": device,
        "dtype": "bf16" if settings.bf16 else "fp32",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "reps": settings.reps,
        "train_reps": settings.train_reps,
        "threads": torch.get_num_threads(),
        "ours": {"torch": torch.__version__, "transformers": transformers.__version__},
        "original": versions,
    }


def header_lines(header: dict, tokens_summary: str, shape: Shape) -> str:
    original = header["original"]
    lines = [
        (f"{header['date']} | shape {header['shape']} | {header['device']} | {header['dtype']} | "
         f"{header['threads']} torch thread{'' if header['threads'] == 1 else 's'} per side | load average {header['load_average'] or float('nan'):.1f} at start | medians of {header['reps']} generation reps and "
         f"{header['train_reps']} training steps, interleaved"),
        (f"ours: torch {header['ours']['torch']}, transformers {header['ours']['transformers']} | original: "
         f"open-flamingo {original.get('open_flamingo')}, open_clip {original.get('open_clip_torch')}, "
         f"transformers {original.get('transformers')}, torch {original.get('torch')}"),
        f"same random weights through openflamingo_hf.convert; greedy check: {tokens_summary}",
        "ratios: original time / ours time (> 1: ours faster); memory: ours / original (< 1: ours smaller)",
    ]
    if shape.note:
        lines.append(f"shape note: {shape.note}")
    return "\n".join(lines)


def run(settings: Settings, log, progress=None) -> tuple[str, dict]:
    """
    The whole benchmark; returns the printed report and its JSON form. `progress(text, data)`, when given, is called
    after each finished case with the report and JSON so far (marked `"partial": true`), so that a run stopped later
    (a time limit, a failing case) still leaves the rows it finished.
    """
    import torch

    shape = settings.shape
    if settings.threads:
        torch.set_num_threads(settings.threads)
    worker = OriginalWorker(python=settings.original_python, path=settings.original_path,
                            log_path=settings.workdir / "original_worker.log")
    checks: list[str] = []
    cases: list[CaseResult] = []

    def report_progress() -> None:
        if progress is not None:
            header = machine_header(settings, meta["versions"])
            summary = "; ".join(checks)
            text = header_lines(header, summary, shape) + "\n\n" + markdown_table(cases)
            progress(text, {**results_json(cases, {**header, "greedy_check": summary}), "partial": True})

    try:
        log("building the original model (its own create_model_and_transforms, random weights)")
        meta = worker.request("build", shape=shape.to_worker(), workdir=str(settings.workdir), device=settings.device,
                              save_dtype="bfloat16" if settings.bf16 else "float32", threads=settings.threads)
        log("converting its state dict with openflamingo_hf.convert")
        state_dict = cast_state_dict(torch.load(meta["state_dict"], weights_only=True), torch.float32)
        model, report = convert_to_ours(state_dict, shape, meta)
        del state_dict
        model.to(settings.device)
        inputs = make_inputs(shape, meta)
        inputs_path = settings.workdir / "inputs.pt"
        torch.save(inputs, inputs_path)
        worker.request("load_inputs", path=str(inputs_path))
        generators = {OURS: OursGenerator(model, inputs, settings.device, compiled=False)}
        if settings.compiled:
            generators[OURS_COMPILED] = OursGenerator(model, inputs, settings.device, compiled=True)

        # The token check comes first. In fp32 the greedy cases run first and their first rep is the check; a check
        # case that is not timed (and, with --bf16, every check, done in fp32 before the cast) runs once on its own.
        for name in GREEDY_CHECK_CASES:
            if settings.bf16 or name not in settings.cases:
                checks.append(check_tokens(worker, generators[OURS], GENERATION_CASES[name]))
                log(f"greedy tokens identical: {checks[-1]}")
        if settings.bf16:
            model.to(torch.bfloat16)
            worker.request("cast", dtype="bfloat16")
        report_progress()  # the token check's outcome, before any timing
        reference_tokens: dict = {}
        order = [n for n in GREEDY_CHECK_CASES if n in settings.cases]
        order += [n for n in settings.cases if n in GENERATION_CASES and n not in order]
        for name in order:
            log(f"timing {name}")
            case = GENERATION_CASES[name]
            # The compiled configuration only changes the decode steps; a 1-token prefill has none.
            case_generators = {k: g for k, g in generators.items() if k == OURS or case.metric != "prefill"}
            verify = name in GREEDY_CHECK_CASES and not settings.bf16
            cases.append(run_generation_case(case, worker, case_generators, settings, reference_tokens, log,
                                             checks=checks if verify else None))
            report_progress()
        if TRAIN_CASE in settings.cases:
            log("timing the training step")
            try:
                cases.extend(run_training(model, worker, inputs, settings, log))
            except BenchError as error:  # the original's step failed: keep the generation rows, say why
                if worker.process.poll() is not None:
                    raise
                failed = CaseResult(TRAIN_CASE, "training step (LAION 32 + MMC4 8)", "time", 0, "")
                failed.systems = {ORIGINAL: SystemResult(error=str(error)[:200]), OURS: SystemResult()}
                cases.append(failed)
                log(f"training step failed: {error}")
    finally:
        worker.close()
    header = machine_header(settings, meta["versions"])
    summary = "; ".join(checks)
    text = header_lines(header, summary, shape) + "\n\n" + markdown_table(cases)
    return text, results_json(cases, {**header, "greedy_check": summary, "conversion": report.summary()})


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser():
    import argparse

    from openflamingo_hf.cli.parsing import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="bench_vs_original.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="small",
                        help="model shape: small (CPU default) or a release's (of3b, of4b, of9b: use a GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true",
                        help="generation in bf16 weights, training under bf16 autocast (the token check stays fp32)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per system and generation case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (compilation happens here)")
    parser.add_argument("--train-reps", type=int, default=5, help="timed training steps per system")
    parser.add_argument("--train-warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--cases", default=",".join(ALL_CASES),
                        help=f"comma-separated subset of {', '.join(ALL_CASES)} (the token check always runs)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the 'ours, static cache + compile' configuration (its first call compiles, "
                             "which takes minutes on a small CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on both sides (default: 1 on CPU, where two processes alternate "
                             "on a small machine and multi-threaded ops mostly measure the scheduler; torch's own "
                             "choice on GPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the results (every sample) as JSON here")
    parser.add_argument("--workdir", metavar="DIR", help="keep the state dict, inputs and worker log here "
                                                         "(default: a temporary folder, removed at the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--original-python", metavar="PYTHON", default=os.environ.get(ORIGINAL_PYTHON_ENV),
                        help=f"the interpreter that runs the original (default: ${ORIGINAL_PYTHON_ENV}, else "
                             ".venv-original/bin/python)")
    parser.add_argument("--original-path", metavar="DIRS", default=os.environ.get(ORIGINAL_PATH_ENV),
                        help=f"the original's PYTHONPATH, e.g. a `pip install --target` folder beside that "
                             f"interpreter's torch (default: ${ORIGINAL_PATH_ENV}, else none)")
    return parser


def parse_settings(argv: list[str] | None, parser=None) -> tuple[Settings, Any]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if min(args.reps, args.train_reps) < 1 or min(args.warmup, args.train_warmup) < 0:
        parser.error("--reps and --train-reps must be at least 1, the warm-ups at least 0")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    if args.bf16 and device == "cpu":
        parser.error("--bf16 is for GPU runs (the original's amp_bf16 autocast is CUDA-only); drop it on CPU")
    settings = Settings(shape=SHAPES[args.shape], device=device, bf16=args.bf16, reps=args.reps, warmup=args.warmup,
                        train_reps=args.train_reps, train_warmup=args.train_warmup, cases=cases,
                        compiled=not args.no_compile, workdir=Path(args.workdir) if args.workdir else Path(),
                        threads=threads,
                        original_python=Path(args.original_python) if args.original_python else ORIGINAL_PYTHON,
                        original_path=args.original_path or None)
    return settings, args


def write_json(path: Path, data: dict) -> None:
    """Writes through a temporary file and a rename, so that a run killed mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


def partial_writer(path: Path):
    """The `progress` callback of `run` for `--json`: the rows so far, with their table, until the final write."""

    def write(text: str, data: dict) -> None:
        write_json(path, {**data, "table": text})

    return write


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    settings, args = parse_settings(argv, parser)
    if not settings.original_python.exists():
        if settings.original_python == ORIGINAL_PYTHON:
            parser.error(f".venv-original is missing: run `{SETUP_HINT}` first (open-flamingo 2.0.1 on transformers "
                         "4.36.2)")
        parser.error(f"--original-python {settings.original_python} does not exist")

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bench_vs_original] {message}", file=sys.stderr, flush=True)

    import openflamingo_hf  # noqa: F401  (registers the Auto classes)

    with tempfile.TemporaryDirectory(prefix="bench_vs_original_") as temporary:
        settings.workdir = Path(args.workdir) if args.workdir else Path(temporary)
        settings.workdir.mkdir(parents=True, exist_ok=True)
        try:
            text, data = run(settings, log, progress=partial_writer(Path(args.json)) if args.json else None)
        except BenchError as error:
            parser.exit(1, f"bench_vs_original.py: error: {error}\n")
    print(text)
    if args.json:
        write_json(Path(args.json), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
