"""How the pretraining streams are drawn, epoch by epoch, as the original recipe draws them: shard order shuffled per
epoch (or shards resampled), every shard reached, reproducible for a seed, disjoint over processes and workers,
skips of late shards reported, and a resumed run continuing the same epoch's order."""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from openflamingo_hf.cli.train import main
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, save_tiny_backbones
from openflamingo_hf.trainer import shard_reading
from openflamingo_hf.trainer.collator import SKIPPED_KEY, OpenFlamingoDataCollator
from openflamingo_hf.trainer.data import build_interleaved_dataset, build_pair_dataset
from openflamingo_hf.trainer.shard_writing import encode_image_base64, write_interleaved_shard, write_pair_shard
from openflamingo_hf.trainer.trainer import OpenFlamingoTrainer, freeze_for_recipe

NUM_SHARDS = 6
PER_SHARD = 4  # N / 2: an epoch of N samples is two shards' worth
EPOCH_SAMPLES = 2 * PER_SHARD


def _image(value: int) -> Image.Image:
    # Noise keeps interleaved images above the recipe's 10 KB minimum.
    rng = np.random.default_rng(value)
    return Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def _write_pair_shards(folder: Path, num_shards: int = NUM_SHARDS) -> list[str]:
    paths = []
    for shard in range(num_shards):
        path = folder / f"pairs-{shard}.tar"
        write_pair_shard(path, [{"image": _image(10 * shard + k), "caption": f"s{shard} n{k}"}
                                for k in range(PER_SHARD)])
        paths.append(str(path))
    return paths


def _write_document_shards(folder: Path, num_shards: int = NUM_SHARDS) -> list[str]:
    paths = []
    for shard in range(num_shards):
        documents = [{
            "text_list": [f"d{shard} n{k} one.", f"d{shard} n{k} two."],
            "image_info": [{"image_base64": encode_image_base64(_image(1000 + 10 * shard + k + i))} for i in (0, 1)],
            "similarity_matrix": [[0.9, 0.1], [0.1, 0.9]],
        } for k in range(PER_SHARD)]
        path = folder / f"docs-{shard}.tar"
        write_interleaved_shard(path, documents)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory):
    return _write_pair_shards(tmp_path_factory.mktemp("streams"))


def _names(input_ids: torch.Tensor, processor) -> list[str]:
    """The "s<shard> n<k>" / "d<shard> n<k>" name at the start of each row's text."""
    texts = processor.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return [" ".join(text.split()[:2]) for text in texts]


def _epochs(dataset, processor, epochs: int, samples: int | None) -> list[list[str]]:
    orders = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        rows = list(dataset if samples is None else itertools.islice(dataset, samples))
        orders.append(_names(torch.stack([row["input_ids"] for row in rows]), processor))
    return orders


def _shard(name: str) -> str:
    return name.split()[0]


# ---------------------------------------------------------------------------------------------------------------------
# The builders
# ---------------------------------------------------------------------------------------------------------------------


def test_every_epoch_reads_the_shards_in_a_new_order_that_the_seed_reproduces(processor, pair_shards):
    def shard_orders(seed):
        # Shards only (no sample buffer), one whole pass per epoch: the order in which each epoch reads the shards.
        dataset = build_pair_dataset(pair_shards, processor, seed=seed, shuffle_buffer_size=0)
        return [list(dict.fromkeys(map(_shard, order))) for order in _epochs(dataset, processor, 4, None)]

    orders = shard_orders(0)
    assert all(sorted(order) == [f"s{k}" for k in range(NUM_SHARDS)] for order in orders)
    assert len({tuple(order) for order in orders}) >= 3, orders  # a new order every epoch
    assert shard_orders(0) == orders and shard_orders(1) != orders


@pytest.mark.parametrize("resampled", [False, True], ids=["shuffled", "resampled"])
def test_epochs_of_two_shards_worth_reach_every_shard(processor, pair_shards, resampled):
    """The bug this replaces: each epoch was the same first N samples, and shards after them were never read."""
    def run(seed, epochs):
        dataset = build_pair_dataset(pair_shards, processor, seed=seed, shuffle_buffer_size=PER_SHARD, repeat=True,
                                     resampled=resampled)
        return _epochs(dataset, processor, epochs, EPOCH_SAMPLES)

    # Drawn with replacement, 4 epochs of ~3 draws miss some shard for about half the seeds: read 12 epochs.
    epochs = run(0, 12 if resampled else 4)
    assert {_shard(name) for epoch in epochs for name in epoch} == {f"s{k}" for k in range(NUM_SHARDS)}
    assert len({tuple(epoch) for epoch in epochs}) == len(epochs)  # every epoch's samples come in a new order
    assert run(0, 4) == epochs[:4] and run(1, 4) != epochs[:4]


def test_resampled_streams_draw_other_shards_in_every_process_and_worker(processor, pair_shards):
    from datasets.distributed import split_dataset_by_node

    dataset = build_pair_dataset(pair_shards, processor, resampled=True, shuffle_buffer_size=0)
    per_rank = []
    for rank in range(2):
        node = split_dataset_by_node(dataset, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(node, batch_size=None, num_workers=2)
        per_rank.append(_names(torch.stack([row["input_ids"] for row in itertools.islice(loader, 16)]), processor))
    assert per_rank[0] != per_rank[1]
    # The two workers of a rank alternate in the loader's output: their draws differ too.
    assert per_rank[0][0::2] != per_rank[0][1::2]


def test_interleaved_streams_are_drawn_the_same_way(processor, tmp_path):
    shards = _write_document_shards(tmp_path)
    dataset = build_interleaved_dataset(shards, processor, max_length=48, shuffle_buffer_size=0)
    orders = [list(dict.fromkeys(map(_shard, order))) for order in _epochs(dataset, processor, 3, None)]
    assert all(sorted(order) == [f"d{k}" for k in range(NUM_SHARDS)] for order in orders)
    assert len({tuple(order) for order in orders}) >= 2


def test_skip_counts_of_a_late_shard_leave_with_the_next_sample_despite_the_buffer(processor, pair_shards, tmp_path):
    bad = tmp_path / "pairs-bad.tar"
    write_pair_shard(bad, [{"image": b"not an image", "caption": "broken", "image_ext": "jpg"}] * 3)
    # The default buffer (5,000 samples) holds every sample: the first one to leave carries every shard's skips.
    dataset = build_pair_dataset([*pair_shards, str(bad)], processor)
    first = next(iter(dataset))
    assert first[SKIPPED_KEY] == {shard_reading.UNDECODABLE_IMAGE: 3}


# ---------------------------------------------------------------------------------------------------------------------
# openflamingo-train
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streams_cli")
    _write_pair_shards(folder)
    _write_document_shards(folder)
    save_tiny_backbones(folder)
    return folder


def _train(folder: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--vision_model", str(folder / "vision"), "--language_model", str(folder / "lm"),
        "--config_overrides", json.dumps(dict(perceiver_depth=1, perceiver_num_latents=4, perceiver_num_heads=2,
                                              perceiver_head_dim=16, cross_attn_num_heads=2, cross_attn_head_dim=16)),
        "--laion_shards", str(folder / "pairs-{0..5}.tar"), "--mmc4_shards", str(folder / "docs-{0..5}.tar"),
        "--batch_size_laion", "2", "--batch_size_mmc4", "2", "--laion_max_length", "12", "--mmc4_max_length", "48",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--output_dir", str(output_dir),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra,
    ]


def _recorded_run(monkeypatch, argv: list[str]) -> dict[str, list[list[str]]]:
    """Runs `openflamingo-train` in this process; returns each stream's names per step."""
    seen = {"laion": [], "mmc4": []}
    original = OpenFlamingoTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        for stream, batch in inputs.items():
            seen[stream].append(_names(batch["input_ids"], self.processing_class))
        return original(self, model, inputs, num_items_in_batch)

    with monkeypatch.context() as patch:
        patch.setattr(OpenFlamingoTrainer, "training_step", recording_step)
        main(argv)
    return seen


@pytest.mark.parametrize("resampled", [False, True], ids=["shuffled", "resampled"])
def test_openflamingo_train_reads_every_shard_in_new_orders_reproducibly(cli_data, tmp_path, monkeypatch, resampled):
    epochs = 8 if resampled else 4
    argv = _train(cli_data, tmp_path / "run", "--train_num_samples_laion", str(EPOCH_SAMPLES),
                  "--train_num_samples_mmc4", str(EPOCH_SAMPLES), "--num_train_epochs", str(epochs),
                  "--shuffle_buffer_size", str(PER_SHARD), "--seed", "0",
                  *(["--dataset_resampled"] if resampled else []))
    first = _recorded_run(monkeypatch, argv)
    steps_per_epoch = EPOCH_SAMPLES // 2
    for stream, prefix in (("laion", "s"), ("mmc4", "d")):
        steps = first[stream]
        assert len(steps) == epochs * steps_per_epoch
        per_epoch = [sum(steps[e * steps_per_epoch:(e + 1) * steps_per_epoch], []) for e in range(epochs)]
        assert {_shard(name) for epoch in per_epoch for name in epoch} == {f"{prefix}{k}" for k in range(NUM_SHARDS)}
        assert len({tuple(epoch) for epoch in per_epoch}) == epochs
    assert _recorded_run(monkeypatch, argv) == first


def test_a_corrupt_shard_placed_last_is_read_in_a_short_run_and_reported(cli_data, tmp_path, monkeypatch):
    for path in cli_data.glob("pairs-*.tar"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    write_pair_shard(tmp_path / "pairs-6.tar", [{"image": b"not an image", "caption": "x", "image_ext": "jpg"}] * 2)
    argv = _train(cli_data, tmp_path / "run", "--max_steps", "2")
    argv[argv.index("--laion_shards") + 1] = str(tmp_path / "pairs-{0..6}.tar")
    main(argv)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert history[0]["skipped_undecodable_image"] == 2, history[0]  # with the first step's batch


# ---------------------------------------------------------------------------------------------------------------------
# OpenFlamingoTrainer: set_epoch, resumption, processes and workers
# ---------------------------------------------------------------------------------------------------------------------


class RecordingTrainer(OpenFlamingoTrainer):
    """Records each step's names (per stream) in `seen`."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({stream: _names(batch["input_ids"], self.processing_class) for stream, batch in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def _recording_trainer(output_dir, shards, **args) -> RecordingTrainer:
    model, processor = build_tiny_model_and_processor("llama", seed=0)
    freeze_for_recipe(model)
    defaults = dict(logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-3, remove_unused_columns=False,
                    save_strategy="no", seed=0, disable_tqdm=True)
    stream = build_pair_dataset(shards, processor, max_length=12, shuffle_buffer_size=PER_SHARD, repeat=True)
    trainer = RecordingTrainer(
        model=model, args=TrainingArguments(str(output_dir), **{**defaults, **args}), streams={"laion": stream},
        stream_batch_sizes={"laion": 2}, samples_per_epoch={"laion": EPOCH_SAMPLES},
        data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id), processing_class=processor,
    )
    trainer.seen = []
    return trainer


def test_the_trainer_sets_the_epoch_and_a_resumed_run_continues_the_same_order(pair_shards, tmp_path):
    full = _recording_trainer(tmp_path / "full", pair_shards, num_train_epochs=3, save_strategy="steps",
                              save_steps=6)
    full.train()
    steps_per_epoch = EPOCH_SAMPLES // 2
    assert len(full.seen) == 3 * steps_per_epoch and full.state.global_step == 12
    epochs = [full.seen[e * steps_per_epoch:(e + 1) * steps_per_epoch] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # set_epoch reached the stream

    # Resumed from step 6, in the middle of epoch 1: steps 7-12 read what the uninterrupted run read.
    resumed = _recording_trainer(tmp_path / "resumed", pair_shards, num_train_epochs=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.seen == full.seen[6:]


def test_samples_per_epoch_must_name_every_stream(pair_shards, tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    stream = build_pair_dataset(pair_shards, processor, max_length=12)
    with pytest.raises(ValueError, match="samples_per_epoch must give every stream"):
        OpenFlamingoTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                            streams={"laion": stream, "mmc4": stream}, samples_per_epoch={"laion": 8})


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from transformers import TrainingArguments
    from test_streams import RecordingTrainer, PER_SHARD, _names
    from openflamingo_hf.testing_utils import build_tiny_model_and_processor
    from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator
    from openflamingo_hf.trainer.data import build_pair_dataset
    from openflamingo_hf.trainer.trainer import freeze_for_recipe

    model, processor = build_tiny_model_and_processor("llama", seed=0)
    freeze_for_recipe(model)
    shards = json.loads({shards!r})
    # One pass per epoch (no repeat): a worker with fewer shards than the other stops early instead of starting over.
    stream = build_pair_dataset(shards, processor, max_length=12, shuffle_buffer_size=PER_SHARD)
    args = TrainingArguments({out!r}, num_train_epochs=2, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0,
                             remove_unused_columns=False, save_strategy="no", disable_tqdm=True, ddp_backend="gloo",
                             dataloader_num_workers=2)
    # One pass per epoch: 24 samples / (2 per batch x 2 processes) = 6 steps; each process reads 3 shards.
    trainer = RecordingTrainer(model=model, args=args, streams={{"laion": stream}}, stream_batch_sizes={{"laion": 2}},
                               samples_per_epoch={{"laion": len(shards) * PER_SHARD}},
                               data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id),
                               processing_class=processor)
    trainer.seen = []
    trainer.train()
    with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
        json.dump([step["laion"] for step in trainer.seen], f)
    """
)


def test_two_processes_with_two_workers_read_disjoint_shards_every_epoch(pair_shards, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), shards=json.dumps(pair_shards),
                                        out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    everything = sorted(f"s{shard} n{k}" for shard in range(NUM_SHARDS) for k in range(PER_SHARD))
    shard_sets = []
    for epoch in range(2):
        names = [sum(steps[epoch * 6:(epoch + 1) * 6], []) for steps in ranks]
        # Each sample once in the epoch (so the two workers of a process read different shards) ...
        assert sorted(names[0] + names[1]) == everything, names
        # ... and each process its own whole shards.
        shards = [{_shard(name) for name in rank_names} for rank_names in names]
        assert len(shards[0]) == len(shards[1]) == 3 and not shards[0] & shards[1]
        shard_sets.append(shards)
    assert shard_sets[0] != shard_sets[1] or ranks[0][:6] != ranks[0][6:]  # epoch 1 is drawn anew
