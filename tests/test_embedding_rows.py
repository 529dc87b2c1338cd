"""The recipe's embedding-row rule without vocabulary-sized gradients (`EmbeddingRows`): the same losses, row gradients
and training as the original's masked dense gradient (computed here independently), checkpoints that load with plain
`from_pretrained`, resumption, and the fallback for an output projection tied without a module of its own."""

import datasets
import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from openflamingo_hf import OpenFlamingoForConditionalGeneration
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, recipe_sample
from openflamingo_hf.trainer import OpenFlamingoDataCollator, OpenFlamingoTrainer, freeze_for_recipe
from openflamingo_hf.trainer.trainer import embedding_rows_for

BATCH_SIZES = {"laion": 4, "mmc4": 2}
MULTIPLIERS = {"laion": 0.2, "mmc4": 1.0}
LEARNING_RATE = 1e-2  # large, so that a step moves the rows well beyond the tolerances


def _model(family: str, tied: bool = False, seed: int = 0):
    """A tiny model and processor; `tied`: a Llama whose output projection is its input embedding (a module of its
    own sharing the weight, as the embedded model's)."""
    tie = {"tie_word_embeddings": True} if tied else {}
    model, processor = build_tiny_model_and_processor(family, seed=seed, text_config_overrides=tie, **tie)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    freeze_for_recipe(model)
    return model, processor


def _rows(processor, n: int = 8) -> dict[str, list[dict]]:
    return {"laion": [recipe_sample(processor, i, False) for i in range(n)],
            "mmc4": [recipe_sample(processor, i, True) for i in range(n)]}


def _streams(rows: dict[str, list[dict]]) -> dict:
    return {name: datasets.Dataset.from_list(samples).with_format("torch") for name, samples in rows.items()}


def _trainer(model, processor, output_dir, rows, **overrides) -> OpenFlamingoTrainer:
    arguments = {"max_steps": 3, "logging_steps": 1, "report_to": [], "use_cpu": True, "learning_rate": LEARNING_RATE,
                 "lr_scheduler_type": "constant", "remove_unused_columns": False, "save_strategy": "no", "seed": 0,
                 "disable_tqdm": True, "dataloader_num_workers": 0}
    arguments.update(overrides)
    return OpenFlamingoTrainer(
        model=model, args=TrainingArguments(str(output_dir), **arguments), streams=_streams(rows),
        stream_batch_sizes=BATCH_SIZES, loss_multipliers=MULTIPLIERS,
        data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id), processing_class=processor,
    )


def _special_ids(model) -> list[int]:
    return [model.config.media_token_id, model.config.eoc_token_id]


# ----------------------------------------------------------------------------------------------------------------------
# The reference: the original's dense gradient with every other row zeroed
# ----------------------------------------------------------------------------------------------------------------------


def _masked_dense_gradient(weight: torch.nn.Parameter, ids: list[int]) -> None:
    keep = torch.zeros(weight.shape[0], 1)
    keep[ids] = 1
    weight.grad.mul_(keep)


def _reference_training(model, processor, rows, steps: int) -> list[dict[str, float]]:
    """open_flamingo's train_one_epoch as the trainer's arguments configure it: forward/backward per stream, the
    embedding gradient masked to the two rows, clipping at 1.0, fused AdamW (no weight decay), constant rate."""
    collate = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)
    weight = model.get_input_embeddings().weight
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    model.train()
    losses = []
    for step in range(steps):
        logged = {}
        for name, size in BATCH_SIZES.items():
            batch = collate(rows[name][step * size:(step + 1) * size])
            loss = model(**batch).loss
            (loss * MULTIPLIERS[name]).backward()
            logged[name] = float(loss.detach())
        _masked_dense_gradient(weight, _special_ids(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(logged)
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# One forward and backward
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("gpt_neox", False), ("mpt", True),
                                          ("gpt2", True), ("opt", True)])
def test_loss_and_gradients_equal_the_masked_dense_gradient(family, tied):
    model, processor = _model(family, tied=family == "llama" and tied)
    ids = _special_ids(model)
    collate = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)
    batch = collate([recipe_sample(processor, i, True) for i in range(3)])
    assert all(int((batch["input_ids"] == i).sum()) >= 3 for i in ids)
    weight = model.get_input_embeddings().weight
    output_is_tied = model.get_output_embeddings().weight is weight
    assert output_is_tied == tied

    model.train()  # dropout (GPT-2, OPT) draws the same masks after the same seed
    torch.manual_seed(0)
    dense_loss = model(**batch, loss_logits_only=True).loss
    dense_loss.backward()
    _masked_dense_gradient(weight, ids)
    dense = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    rows = embedding_rows_for(model, ids)
    assert rows is not None and (rows.head is not None) == tied
    rows.activate()
    torch.manual_seed(0)
    with rows.hooks():
        loss = model(**batch, loss_logits_only=True).loss
    loss.backward()
    rows.release()

    assert torch.equal(loss, dense_loss)  # the forward is the frozen model's, value for value
    assert weight.grad is None  # no vocabulary-sized gradient
    embedding_name = next(name for name, p in model.named_parameters() if p is weight)
    torch.testing.assert_close(rows.param.grad, dense.pop(embedding_name)[ids], atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        if name in dense:
            torch.testing.assert_close(p.grad, dense[name], atol=1e-6, rtol=0, msg=name)
    assert not model.get_input_embeddings()._forward_hooks and not model.get_output_embeddings()._forward_hooks


def test_no_rows_parameter_where_the_output_is_tied_without_a_module():
    model, _ = _model("mosaic_gpt")  # logits = hidden @ wte.weight.T: no module to route the output side through
    assert model.get_output_embeddings() is None
    assert embedding_rows_for(model, _special_ids(model)) is None


# ----------------------------------------------------------------------------------------------------------------------
# Training through OpenFlamingoTrainer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("mosaic_gpt", True)])
def test_training_equals_the_masked_dense_loop(family, tied, tmp_path):
    """Three recipe steps: the same losses and weights as the masked dense loop; the other rows bit-identical."""
    steps = 3
    reference, processor = _model(family, tied=family == "llama" and tied)
    rows = _rows(processor, n=12)
    initial = reference.get_input_embeddings().weight.detach().clone()
    reference_losses = _reference_training(reference, processor, rows, steps)

    model, _ = _model(family, tied=family == "llama" and tied)
    trainer = _trainer(model, processor, tmp_path, rows, max_steps=steps)
    trainer.train()
    uses_rows = family != "mosaic_gpt"
    assert (trainer._embedding_rows is not None) == uses_rows
    if uses_rows:
        state = trainer.optimizer.state
        assert all(p.numel() < initial.numel() for p in state)  # no vocabulary-sized AdamW moments
    logs = [entry for entry in trainer.state.log_history if "loss_laion" in entry]
    for entry, expected in zip(logs, reference_losses, strict=True):
        assert entry["loss_laion"] == pytest.approx(expected["laion"], abs=1e-4)  # logged rounded to 4 places
        assert entry["loss_mmc4"] == pytest.approx(expected["mmc4"], abs=1e-4)

    ids = _special_ids(model)
    weight = model.get_input_embeddings().weight
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(weight[others], initial[others])  # bit-identical
    assert not torch.allclose(weight[ids], initial[ids], atol=1e-3)  # the two rows trained
    expected_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name], atol=1e-6, rtol=0, msg=name)
    # After train() the model is as freeze_for_recipe left it: another trainer applies the rule again.
    assert weight.requires_grad and not model.get_input_embeddings()._forward_hooks


def test_the_losses_of_every_step_equal_the_reference(tmp_path):
    """Losses to 1e-6 (the trainer's unrounded per-stream losses of every step, not the rounded log)."""
    steps = 3
    reference, processor = _model("llama")
    rows = _rows(processor, n=12)
    reference_losses = _reference_training(reference, processor, rows, steps)
    model, _ = _model("llama")
    trainer = _trainer(model, processor, tmp_path, rows, max_steps=steps, logging_steps=10**6)
    trainer.train()  # no log in between: `_stream_losses` keeps every step's losses
    for name in BATCH_SIZES:
        ours = [float(loss) for loss in trainer._stream_losses[name]]
        assert ours == pytest.approx([step[name] for step in reference_losses], abs=1e-6, rel=0)


class _Snapshot(TrainerCallback):
    """The model's state dict after a given step (what that step's checkpoint must hold)."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_checkpoints_load_with_from_pretrained_and_resume_as_if_uninterrupted(tmp_path):
    model, processor = _model("llama")
    rows = _rows(processor, n=12)
    initial = model.get_input_embeddings().weight.detach().clone()
    snapshot = _Snapshot(3)
    trainer = _trainer(model, processor, tmp_path / "full", rows, max_steps=6, save_strategy="steps", save_steps=3)
    trainer.add_callback(snapshot)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    # A checkpoint is the trained model at its step, loadable as it is (strict from_pretrained).
    checkpoint = OpenFlamingoForConditionalGeneration.from_pretrained(str(tmp_path / "full" / "checkpoint-3"))
    for name, tensor in checkpoint.state_dict().items():
        assert torch.equal(tensor, snapshot.state[name]), name
    weight = checkpoint.get_input_embeddings().weight
    ids = _special_ids(model)
    assert not torch.allclose(weight[ids], initial[ids], atol=1e-3)
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(weight[others], initial[others])
    final = OpenFlamingoForConditionalGeneration.from_pretrained(str(tmp_path / "final"))
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

    # A fresh model resumed from step 3 (weights, and the rows' AdamW moments from the optimizer state) ends as the
    # uninterrupted run did.
    resumed, _ = _model("llama")
    again = _trainer(resumed, processor, tmp_path / "again", rows, max_steps=6, save_strategy="steps", save_steps=3)
    again.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], atol=1e-6, rtol=0, msg=name)
    for step in (4, 5, 6):
        assert _step_loss(again, step) == pytest.approx(_step_loss(trainer, step), abs=1e-6)


def _step_loss(trainer, step: int) -> float:
    return next(entry["loss"] for entry in trainer.state.log_history if entry.get("step") == step and "loss" in entry)


def test_a_user_optimizer_keeps_the_masked_dense_gradient(tmp_path):
    """An optimizer passed in cannot hold the rows' parameter: the rows then train through the masked gradient."""
    model, processor = _model("llama")
    initial = model.get_input_embeddings().weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    trainer = OpenFlamingoTrainer(
        model=model, args=TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                            remove_unused_columns=False, save_strategy="no", disable_tqdm=True),
        streams=_streams(_rows(processor)), stream_batch_sizes=BATCH_SIZES, optimizers=(optimizer, None),
        data_collator=OpenFlamingoDataCollator(processor.tokenizer.pad_token_id),
    )
    trainer.train()
    assert trainer._embedding_rows is None
    weight = model.get_input_embeddings().weight
    changed = (weight != initial).any(-1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(_special_ids(model))
