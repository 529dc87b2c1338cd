"""The original OpenFlamingo (open-flamingo 2.0.1, transformers 4.36.2) as a long-lived benchmark worker.

Run by `benchmarks/bench_vs_original.py` with `.venv-original/bin/python` (made by `scripts/setup_original_env.sh`);
not meant to be run by hand, except `--check`, which imports the original and exits 0 when it can run.

Protocol: one JSON request per line on stdin, one JSON reply per line on the stdout it was started with. Everything
else that the original, transformers or open_clip print goes to stderr (the worker points fd 1 there), so that a stray
`print` can never break the protocol. A failed request replies `{"error": "<first line>", "traceback": ...}` and the
worker stays up.

Requests (`cmd`): `build` (the original model from tiny or release-sized random backbones, saved for the converter),
`load_inputs`, `generate` (one timed `Flamingo.generate`), `train_setup` / `train_step` (the original's own
`train_one_epoch` on one LAION + one MMC4 batch), `memory_reset` / `memory_peak`, `cast`, `quit`.

The module also holds the helpers both sides use the same way (`StepStamps`, `PeakMemory`, `recipe_labels`); it
imports only the standard library at the top, so the benchmark (transformers 5) can import it too.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import itertools
import json
import os
import re
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers (imported by bench_vs_original.py as well)
# ----------------------------------------------------------------------------------------------------------------------


def sync(device: Any) -> None:
    """Waits for queued GPU work, so that wall-clock times cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_step_stamps(device: Any):
    """
    A `LogitsProcessor` that records the time of each generation step (it is called once per new token, right after
    that step's forward). The first stamp closes the prefill; the gaps between stamps are decode steps. The same
    class works on transformers 4.36 and 5, so both sides are timed by the same mechanism.
    """
    from transformers import LogitsProcessor

    class StepStamps(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    return StepStamps()


def generation_timing(start: float, stamps: list[float], end: float) -> dict[str, float]:
    """Seconds: `total`, `prefill` (start to the first step's logits) and `decode_step` (median gap after that)."""
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return {
        "total": end - start,
        "prefill": (stamps[0] - start) if stamps else end - start,
        "decode_step": gaps[len(gaps) // 2] if gaps else float("nan"),
        "steps": len(stamps),
    }


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


class PeakMemory:
    """
    Peak memory of this process over a stretch of work, above what it held when `reset` was called. CUDA: torch's
    `max_memory_allocated`. CPU: the kernel's resident-set high-water mark (VmHWM), reset through
    `/proc/self/clear_refs` after `malloc_trim` has handed freed heap back, so that memory freed by earlier cases
    does not hide the new peak. Both processes (ours, the original's) measure themselves the same way.
    """

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.baseline = 0

    def reset(self) -> int:
        """Starts a measurement; returns the baseline in bytes."""
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self.baseline
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the high-water mark may then include freed heap
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.baseline = _status_kib("VmRSS") * 1024
        return self.baseline

    def peak(self) -> int:
        """Bytes above the baseline at the highest point since `reset`."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return max(_status_kib("VmHWM") * 1024 - self.baseline, 0)


def recipe_labels(input_ids, media_token_id: int, eoc_token_id: int, pad_token_id: int | None, stream: str):
    """
    The labels the original's `train_one_epoch` builds in its loop, vectorised: pad and `<image>` masked; for MMC4
    also every token before the first `<image>` and every token after an `<|endofchunk|>` up to the next `<image>`.
    Our side gets these labels from its data pipeline; giving it the same ones makes the two losses comparable.
    """
    import torch

    labels = input_ids.clone()
    if pad_token_id is not None:
        labels[input_ids == pad_token_id] = -100
    if stream == "mmc4":
        is_media = input_ids == media_token_id
        is_eoc = input_ids == eoc_token_id
        # A token is masked when no <image> comes at or before it, or when the last <|endofchunk|> strictly before
        # it comes after the last <image> at or before it (an <|endofchunk|> itself stays, unless an earlier one's
        # run covers it, as in the loop).
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        none = torch.full_like(positions, -1)
        last_media = torch.where(is_media, positions, none).cummax(dim=1).values
        last_eoc = torch.where(is_eoc, positions, none).cummax(dim=1).values
        last_eoc_before = torch.cat([none[:, :1], last_eoc[:, :-1]], dim=1)
        after_eoc = last_eoc_before > last_media
        labels[(last_media < 0) | after_eoc] = -100
    labels[input_ids == media_token_id] = -100
    return labels


def cast_state_dict(state_dict: dict, dtype) -> dict:
    """
    Floating-point entries in `dtype`, entries that share a tensor still sharing one: the original's state dict holds
    every decoder layer twice (`old_decoder_blocks`), and casting each key on its own would double its size.
    """
    cast: dict[tuple, Any] = {}
    out = {}
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[key] = tensor.detach()
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in cast:
            cast[identity] = tensor.detach().to(dtype)
        out[key] = cast[identity]
    return out


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# ----------------------------------------------------------------------------------------------------------------------
# Importing the original
# ----------------------------------------------------------------------------------------------------------------------


def import_original() -> dict[str, Any]:
    """
    Imports open_clip and open_flamingo as they are, with two environment workarounds (no change to their code):

    - torchvision: PyPI's Linux wheels are CUDA builds; next to the CPU torch their C++ ops cannot load, and
      torchvision >= 0.18 then fails at import registering fake kernels for ops that do not exist. open_clip only
      needs torchvision's Python transforms, so when that happens its `_meta_registrations` module is replaced by an
      empty one and torchvision is imported again.
    - wandb: `open_flamingo.train.train_utils` imports it at the top but uses it only with `--report_to_wandb`; an
      empty module stands in while that module is imported, and leaves `sys.modules` afterwards, so that libraries
      which probe for wandb (accelerate does, with `importlib.util.find_spec`, when transformers imports it, which
      happens wherever accelerate is installed: a GPU machine's image) find none.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    import open_clip
    import open_flamingo
    from open_flamingo.src import factory

    stub = None
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec on a spec-less module raises
        sys.modules["wandb"] = stub
    try:
        from open_flamingo.train.train_utils import train_one_epoch
    finally:
        if stub is not None and sys.modules.get("wandb") is stub:
            del sys.modules["wandb"]

    return {"open_clip": open_clip, "open_flamingo": open_flamingo, "factory": factory,
            "train_one_epoch": train_one_epoch}


# ----------------------------------------------------------------------------------------------------------------------
# Building the original model
# ----------------------------------------------------------------------------------------------------------------------


def build_tokenizer(base_vocab: int, directory: Path):
    """
    A word-level tokenizer of `base_vocab` entries (`w0` ... ; `w0` is unk, `w1` eos/bos), no pad token, saved to
    `directory`: the original then adds `<|endofchunk|>`, `<image>` and `<PAD>` in that order, as for GPT-NeoX.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(base_vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1", bos_token="w1")
    tokenizer.save_pretrained(directory)
    return tokenizer


def _random_init_from_config(factory_module) -> None:
    """
    Release-sized language models are not written to disk (MPT-7B in fp32 is 28 GB): the factory's
    `AutoModelForCausalLM.from_pretrained(folder)` then builds the model from the folder's config with random weights
    instead. The rest of `create_model_and_transforms` runs unchanged.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    class RandomInit:
        @staticmethod
        def from_pretrained(path, **kwargs):
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            return AutoModelForCausalLM.from_config(config)

    factory_module.AutoModelForCausalLM = RandomInit


class Worker:
    """The state behind the requests: the model, its tokenizer, the inputs and the training objects."""

    def __init__(self):
        self.original = None
        self.model = None
        self.tokenizer = None
        self.inputs: dict[str, Any] = {}
        self.device = "cpu"
        self.train_state: dict[str, Any] | None = None
        self.memory: PeakMemory | None = None

    # ---------------------------------------------------------------- build
    def build(self, request: dict) -> dict:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if request.get("threads"):
            torch.set_num_threads(request["threads"])
        self.original = self.original or import_original()
        shape, workdir = request["shape"], Path(request["workdir"])
        self.device = request.get("device", "cpu")
        workdir.mkdir(parents=True, exist_ok=True)
        open_clip, factory = self.original["open_clip"], self.original["factory"]

        clip_name = shape["open_clip_name"]
        clip_file = workdir / f"{clip_name}.json"
        clip_file.write_text(json.dumps(shape["open_clip_config"], indent=1))
        open_clip.add_model_config(clip_file)

        lm_dir = workdir / "language_model"
        lm_dir.mkdir(exist_ok=True)
        text = shape["text"]
        config = AutoConfig.for_model(text["model_type"], **text["kwargs"], vocab_size=shape["base_vocab"])
        config.save_pretrained(lm_dir)
        build_tokenizer(shape["base_vocab"], lm_dir)
        torch.manual_seed(request.get("seed", 0))
        if shape.get("save_lm_weights", True):
            AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
        else:
            _random_init_from_config(factory)

        torch.manual_seed(request.get("seed", 0) + 1)
        model, _, tokenizer = factory.create_model_and_transforms(
            clip_vision_encoder_path=clip_name,
            clip_vision_encoder_pretrained=None,  # random weights: nothing is downloaded
            lang_encoder_path=str(lm_dir),
            tokenizer_path=str(lm_dir),
            cross_attn_every_n_layers=shape["cross_attn_every_n_layers"],
            use_local_files=True,
        )
        # The gates start at 0 (tanh(0) = 0: the images would change nothing); open them so that the vision path
        # does real work and the token check covers it.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(("attn_gate", "ff_gate")):
                    parameter.fill_(shape.get("gate", 0.5))
        model.eval()
        save_dtype = getattr(torch, request.get("save_dtype", "float32"))
        if save_dtype != torch.float32:
            # Saved in a smaller dtype (of9b in fp32 is 33 GB): round this side's weights the same way, so that both
            # sides still hold identical fp32 weights.
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(save_dtype))
        state_path = workdir / "original_state_dict.pt"
        torch.save(cast_state_dict(model.state_dict(), save_dtype), state_path)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        import transformers

        return {
            "state_dict": str(state_path),
            "eoc_token_id": model.eoc_token_id,
            "media_token_id": model.media_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "vocab_size": len(tokenizer),
            "decoder_layers_attr_name": model.lang_encoder.decoder_layers_attr_name,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "open_flamingo": _version("open_flamingo"), "open_clip_torch": _version("open_clip_torch")},
        }

    def load_inputs(self, request: dict) -> dict:
        import torch

        self.inputs = torch.load(request["path"], weights_only=True)
        return {"keys": sorted(self.inputs)}

    def cast(self, request: dict) -> dict:
        """Moves the model to a dtype (bf16 for generation on GPU, back to fp32 for the training step)."""
        import torch

        self.model.to(getattr(torch, request["dtype"]))
        return {"dtype": request["dtype"]}

    # ---------------------------------------------------------------- generation
    def generate(self, request: dict) -> dict:
        """One `Flamingo.generate` as its users call it, timed step by step; the new tokens come back on request."""
        import torch
        from transformers import LogitsProcessorList

        batch = request["batch"]
        ids = self.inputs[request["input"] + "_ids"][:batch].to(self.device)
        dtype = next(self.model.parameters()).dtype
        pixels = self.inputs[request["input"] + "_pixels"][:batch].to(self.device, dtype)
        stamps = make_step_stamps(self.device)
        with torch.inference_mode():
            sync(self.device)
            start = time.perf_counter()
            out = self.model.generate(
                vision_x=pixels, lang_x=ids, attention_mask=torch.ones_like(ids),
                pad_token_id=self.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([stamps]),
                **request["generate_kwargs"],
            )
            sync(self.device)
            end = time.perf_counter()
        reply: dict[str, Any] = generation_timing(start, stamps.stamps, end)
        if request.get("return_tokens"):
            reply["tokens"] = out[:, ids.shape[1]:].tolist()
        return reply

    # ---------------------------------------------------------------- training
    def train_setup(self, request: dict) -> dict:
        """The original train.py's optimizer (AdamW, weight decay on gated cross-attention only) and scheduler."""
        import torch
        from torch import nn
        from transformers import get_constant_schedule_with_warmup

        class DDPLike(nn.Module):
            """What `train_one_epoch` expects without FSDP: the model under `.module` (it masks embedding grads there)."""

            def __init__(self, module):
                super().__init__()
                self.module = module
                self.losses: list[Any] = []

            def forward(self, **kwargs):
                output = self.module(**kwargs)
                self.losses.append(output[0].detach())
                return output

        wrapper = DDPLike(self.model)
        params = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if "gated_cross_attn" in n], "weight_decay": 0.1},
            {"params": [p for n, p in params if "gated_cross_attn" not in n], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=1e-4)
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=0)
        args = types.SimpleNamespace(
            precision="amp_bf16" if request.get("bf16") else "fp32", fsdp=False, fsdp_use_orig_params=False,
            gradient_accumulation_steps=1, loss_multiplier_laion=0.2, loss_multiplier_mmc4=1.0,
            freeze_lm_embeddings=False, num_epochs=1, rank=1,  # rank != 0: no tqdm bar, no logging
            report_to_wandb=False, logging_steps=10**9,
        )
        self.train_state = {"wrapper": wrapper, "optimizer": optimizer, "scheduler": scheduler, "args": args,
                            "batches": self._original_batches()}
        return {"trainable_parameters": sum(p.numel() for _, p in params)}

    def _original_batches(self):
        """The LAION and MMC4 batches in the shapes the original's data pipeline yields them."""
        laion_ids, laion_pixels = self.inputs["laion_ids"], self.inputs["laion_pixels"]
        mmc4_ids, mmc4_pixels = self.inputs["mmc4_ids"], self.inputs["mmc4_pixels"]
        laion = (laion_pixels.flatten(0, 2), (laion_ids, laion_ids.new_ones(laion_ids.shape)))
        mmc4 = (mmc4_pixels.flatten(1, 2), [(row[None], row.new_ones(row.shape)[None]) for row in mmc4_ids])
        return laion, mmc4

    def train_step(self, request: dict) -> dict:
        """One optimisation step: the original's `train_one_epoch` over a one-batch epoch of each stream."""
        import torch

        state = self.train_state

        class OneBatch:
            num_batches = 1

            def __init__(self, batch):
                self.batch = batch

            def __iter__(self):
                yield self.batch

        laion, mmc4 = state["batches"]
        wrapper = state["wrapper"]
        wrapper.losses.clear()
        sync(self.device)
        start = time.perf_counter()
        self.original["train_one_epoch"](
            state["args"], wrapper, 0, OneBatch(laion), OneBatch(mmc4), self.tokenizer, state["optimizer"],
            state["scheduler"], torch.device(self.device), None,
        )
        sync(self.device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "losses": [float(loss) for loss in wrapper.losses]}

    def memory_reset(self, request: dict) -> dict:
        self.memory = PeakMemory(self.device)
        return {"baseline": self.memory.reset()}

    def memory_peak(self, request: dict) -> dict:
        return {"peak": self.memory.peak()}


COMMANDS = {"build", "load_inputs", "cast", "generate", "train_setup", "train_step", "memory_reset", "memory_peak"}


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def serve(requests, replies) -> None:
    """Answers requests until `quit` or the end of input."""
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        command = request.get("cmd")
        if command == "quit":
            replies.write(json.dumps({"ok": True}) + "\n")
            replies.flush()
            return
        try:
            if command not in COMMANDS:
                raise ValueError(f"unknown command {command!r}; expected one of {sorted(COMMANDS)}")
            reply = getattr(worker, command)(request)
        except Exception as error:  # noqa: BLE001 (any failure is reported to the benchmark, which decides)
            reply = {"error": first_line(error), "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> int:
    if "--check" in sys.argv[1:]:
        import_original()
        # What `build` and `generate` import lazily (transformers' modeling and generation code pull in accelerate
        # where it is installed), so that a broken combination fails here rather than in the benchmark.
        from transformers import GPTNeoXForCausalLM, LlamaForCausalLM, MptForCausalLM  # noqa: F401
        from transformers.generation import utils  # noqa: F401
        return 0
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else is printed (the original's own prints, C++ warnings) goes to stderr
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
