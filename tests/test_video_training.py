"""Training samples that hold videos: the collator pads frames and masks them, and the loss equals each sample's own."""

import torch

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator


def _sample(processor, videos=None, images=None, caption="a cat"):
    marker = "<video>" if videos else "<image>"
    text = processor.pair_text(caption).replace(processor.image_token, marker, 1)
    batch = processor(images=images, videos=videos, text=[text], num_frames=4, return_tensors="pt",
                      padding_side="right")
    sample = {key: value[0] for key, value in batch.items()}
    sample["labels"] = processor.pretraining_labels(batch["input_ids"], batch["attention_mask"])[0]
    return sample


def test_collator_pads_frames_and_the_loss_equals_the_samples_alone():
    model, processor = build_tiny_model_and_processor("llama")
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.8)
    samples = [
        _sample(processor, videos=[[[make_image(i) for i in range(3)]]], caption="a dog on a mat"),
        _sample(processor, images=[[make_image(7)]], caption="two birds"),
        _sample(processor, videos=[[[make_image(10 + i) for i in range(2)]]]),
    ]
    batch = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[:3] == (3, 1, 3)
    assert batch["frame_mask"].tolist() == [[[True, True, True]], [[True, False, False]], [[True, True, False]]]
    model.eval()
    with torch.no_grad():
        per_token = []
        for sample in samples:
            alone = {key: value[None] for key, value in sample.items()}
            out = model(**alone)
            labels = alone["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                    ignore_index=-100, reduction="sum")
            per_token.append((nll, int((labels != -100).sum())))
        expected = sum(n for n, _ in per_token) / sum(c for _, c in per_token)
        assert abs(float(model(**batch).loss) - float(expected)) < 1e-5
