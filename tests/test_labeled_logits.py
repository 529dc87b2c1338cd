"""`loss_logits_only`: the LM head runs only where a label is, with the loss and gradients of the full head."""

from __future__ import annotations

import pytest
import torch

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.tiny_models import TEXT_FAMILIES
from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator


def _recipe_batch(processor):
    """A pair and an interleaved document, right-padded as the recipe's batches are, with the recipe's labels."""
    rows = []
    for interleaved in (False, True):
        if interleaved:
            text = processor.interleaved_text(["Intro.", "a red cat.", "a dog."], [1, 2])
            images = [make_image(1), make_image(2)]
        else:
            text, images = processor.pair_text("two blue squares"), [make_image(3)]
        batch = processor(images=[images], text=[text], return_tensors="pt", padding="max_length", max_length=32,
                          padding_side="right", truncation=True)
        labels = processor.pretraining_labels(batch["input_ids"], batch["attention_mask"], interleaved=interleaved)
        rows.append({key: value[0] for key, value in batch.items()} | {"labels": labels[0]})
    return OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)(rows)


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    outputs = model(**batch, **kwargs)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_loss_logits_only_has_the_loss_and_gradients_of_the_full_head(family):
    model, processor = build_tiny_model_and_processor(family)
    batch = _recipe_batch(processor)
    num_items = torch.tensor(11)  # what Trainer passes with gradient accumulation: the loss is a sum over this
    for extra in ({}, {"num_items_in_batch": num_items}):
        reference, reference_grads = _loss_and_grads(model, batch, **extra)

        head_rows = []
        head = model._separate_output_head()
        handle = head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1])) if head else None
        outputs, grads = _loss_and_grads(model, batch, loss_logits_only=True, **extra)
        if handle:
            handle.remove()

        torch.testing.assert_close(outputs.loss, reference.loss, atol=1e-6, rtol=1e-6)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5, msg=name)
        num_labeled = int((batch["labels"][:, 1:] != -100).sum())
        if head is not None:  # the head saw the labelled positions only
            assert head_rows == [torch.Size([1, num_labeled])]
            assert outputs.logits.shape == (1, num_labeled, reference.logits.shape[-1])
        else:  # an LM whose head is its input embedding (MosaicGPT) keeps the full head
            assert family == "mosaic_gpt" and outputs.logits.shape == reference.logits.shape


def test_without_labels_or_outside_training_the_logits_are_whole(tmp_path):
    """The flag changes nothing without labels; and the Trainer sets it only for training steps, so evaluate()
    and predict() still see every position's logits."""
    from transformers import TrainingArguments

    from openflamingo_hf.trainer.trainer import OpenFlamingoTrainer

    model, processor = build_tiny_model_and_processor("llama")
    batch = _recipe_batch(processor)
    no_labels = {key: value for key, value in batch.items() if key != "labels"}
    assert model(**no_labels, loss_logits_only=True).logits.shape == (*batch["input_ids"].shape, model.get_input_embeddings().num_embeddings)

    trainer = OpenFlamingoTrainer(
        model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), processing_class=processor
    )
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("loss_logits_only", False)), with_kwargs=True
    )
    model.train()
    trainer.compute_loss(model, dict(batch))
    model.eval()
    trainer.compute_loss(model, dict(batch))
    handle.remove()
    assert seen == [True, False]
