"""OpenFlamingoTrainer: the recipe's two streams, what trains, weight decay, non-finite steps, resumption, DDP."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainingArguments

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, recipe_sample
from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator
from openflamingo_hf.trainer.trainer import OpenFlamingoTrainer, freeze_for_recipe, is_decayed_parameter


def _streams(processor, n=8, no_loss_at=()):
    laion = [recipe_sample(processor, i, False) for i in range(n)]
    mmc4 = [recipe_sample(processor, i, True, no_loss=(i in no_loss_at)) for i in range(n)]
    to_dataset = lambda rows: datasets.Dataset.from_list(rows).with_format("torch")  # noqa: E731
    return {"laion": to_dataset(laion), "mmc4": to_dataset(mmc4)}


def _trainer(model, processor, output_dir, streams, **args):
    defaults = dict(max_steps=4, logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-3,
                    remove_unused_columns=False, save_strategy="no", seed=0, disable_tqdm=True)
    defaults.update(args)
    return OpenFlamingoTrainer(
        model=model, args=TrainingArguments(str(output_dir), **defaults), streams=streams,
        stream_batch_sizes={"laion": 4, "mmc4": 2}, loss_multipliers={"laion": 0.2, "mmc4": 1.0},
        data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id), processing_class=processor,
    )


def test_frozen_recipe_trains_only_its_parameters_and_two_embedding_rows(tmp_path):
    model, processor = build_tiny_model_and_processor("llama", gate=None)
    counts = freeze_for_recipe(model)
    assert 0 < counts["trainable"] < counts["total"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = _trainer(model, processor, tmp_path, _streams(processor))
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    embedding = "language_model.model.embed_tokens.weight"
    assert changed - {embedding} and all(
        name.startswith(("perceiver.", "gated_cross_attn_layers.")) for name in changed - {embedding}
    )
    rows = (model.get_input_embeddings().weight != before[embedding]).any(-1).nonzero().flatten().tolist()
    assert sorted(rows) == sorted([processor.image_token_id, processor.eoc_token_id])
    # Both stream losses are logged next to the weighted total.
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.2 * entry["loss_laion"] + entry["loss_mmc4"], abs=1e-3)


def test_stream_losses_equal_the_models_own_losses_on_the_same_batches(tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    freeze_for_recipe(model)
    streams = _streams(processor)
    collate = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = {
            "laion": float(model(**collate([streams["laion"][i] for i in range(4)])).loss),
            "mmc4": float(model(**collate([streams["mmc4"][i] for i in range(2)])).loss),
        }
    trainer = _trainer(model, processor, tmp_path, streams, max_steps=1, learning_rate=0.0)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss_laion"] == pytest.approx(expected["laion"], abs=1e-4)
    assert first["loss_mmc4"] == pytest.approx(expected["mmc4"], abs=1e-4)


def test_weight_decay_only_on_gated_cross_attention_weights(tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    freeze_for_recipe(model)
    trainer = _trainer(model, processor, tmp_path, _streams(processor), weight_decay=0.1)
    trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    names[id(trainer._embedding_rows.param)] = "embedding rows"  # the <image> / <|endofchunk|> rows: no decay
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            assert (group["weight_decay"] == 0.1) == is_decayed_parameter(name), name
    # As the original's get_grouped_params: every name containing "gated_cross_attn", gates and norms included.
    assert is_decayed_parameter("gated_cross_attn_layers.1.attn.to_q.weight")
    assert is_decayed_parameter("gated_cross_attn_layers.1.attn_gate")
    assert is_decayed_parameter("gated_cross_attn_layers.1.ff.norm.weight")
    assert not is_decayed_parameter("perceiver.layers.0.attn.to_q.weight")


def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    freeze_for_recipe(model)
    # The first mmc4 batch (samples 0, 1) has no label at all: its loss is NaN.
    streams = _streams(processor, no_loss_at=(0, 1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = _trainer(model, processor, tmp_path, streams, max_steps=1)
    trainer.train()
    assert trainer.nonfinite_steps == 1 and trainer.state.log_history[-1]["nonfinite_steps"] == 1
    # Not even AdamW's weight decay moved anything (the laion half of the step was dropped too).
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    trainer = _trainer(model, processor, tmp_path, streams, max_steps=2)
    trainer.train()  # the next step trains again
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_resuming_from_a_checkpoint_gives_the_same_losses(tmp_path):
    def run(output_dir, resume=None):
        model, processor = build_tiny_model_and_processor("llama", seed=0)
        freeze_for_recipe(model)
        trainer = _trainer(model, processor, output_dir, _streams(processor, n=12), max_steps=6, save_strategy="steps",
                           save_steps=3, dataloader_num_workers=0)
        trainer.train(resume_from_checkpoint=resume)
        return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    full = run(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    # A fresh model and trainer, resumed from the mid-run checkpoint of the first run.
    again = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-3"))
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], abs=1e-6)


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import datasets, torch
    from transformers import TrainingArguments
    sys.path.insert(0, {tests!r})
    from test_trainer import _streams
    from openflamingo_hf.testing_utils import build_tiny_model_and_processor
    from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator
    from openflamingo_hf.trainer.trainer import OpenFlamingoTrainer, freeze_for_recipe

    model, processor = build_tiny_model_and_processor("llama", seed=0)
    freeze_for_recipe(model)
    seen = []
    collate = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)
    def recording_collator(samples):
        seen.extend(int(s["input_ids"][:12].sum()) * 1000 + int(s["pixel_values"].sum() * 1000) for s in samples)
        return collate(samples)
    args = TrainingArguments({out!r}, max_steps=2, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0,
                             remove_unused_columns=False, save_strategy="no", disable_tqdm=True, ddp_backend="gloo")
    trainer = OpenFlamingoTrainer(model=model, args=args, streams=_streams(processor, n=8),
                                  stream_batch_sizes={{"laion": 2, "mmc4": 1}}, data_collator=recording_collator)
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    rank = int(os.environ["RANK"])
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"digest": digest, "seen": seen}}, f)
    """
)


def test_two_processes_train_on_disjoint_data_and_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["seen"] and ranks[1]["seen"] and not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
