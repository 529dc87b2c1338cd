"""OpenFlamingoDataCollator: a padded batch trains as its rows alone (padding carries no loss and is not attended)."""

import pytest
import torch

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator


def _sample(processor, text: str, num_images: int, seed: int) -> dict:
    """An unpadded training sample: every token after the first carries loss except `<image>`."""
    images = [make_image(seed + k) for k in range(num_images)]
    inputs = processor(images=[images], text=[text], return_tensors="pt")
    labels = inputs["input_ids"][0].clone()
    labels[labels == processor.image_token_id] = -100
    return {"input_ids": inputs["input_ids"][0], "attention_mask": inputs["attention_mask"][0],
            "pixel_values": inputs["pixel_values"][0], "labels": labels}


def test_a_padded_batch_gives_each_rows_loss_and_logits_alone():
    model, processor = build_tiny_model_and_processor("llama", gate=0.5)
    model.eval()
    samples = [
        _sample(processor, "<image>a short caption.", 1, 0),
        _sample(processor, "<image>a much longer caption with many more words in it.<|endofchunk|><image>two.", 2, 10),
        _sample(processor, "<image>mid length text here.", 1, 20),
    ]
    batch = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)(samples)
    lengths = [len(sample["input_ids"]) for sample in samples]
    for row, n in enumerate(lengths):  # the padding contract itself
        assert batch["labels"][row, n:].eq(-100).all() and batch["attention_mask"][row, n:].eq(0).all()
        assert batch["input_ids"][row, n:].eq(processor.tokenizer.pad_token_id).all()
    with torch.no_grad():
        together = model(**batch)
        # The batch loss is the mean over all labelled tokens: the rows' summed token losses over their token count.
        summed, tokens = 0.0, 0
        for row, sample in enumerate(samples):
            alone = model(**{key: value[None] for key, value in sample.items()})
            count = int(sample["labels"][1:].ne(-100).sum())
            summed, tokens = summed + float(alone.loss) * count, tokens + count
            n = lengths[row]
            torch.testing.assert_close(together.logits[row, :n], alone.logits[0], rtol=1e-4, atol=1e-4)
    assert float(together.loss) == pytest.approx(summed / tokens, abs=1e-4)
