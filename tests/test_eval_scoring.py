"""Class ranking (ImageNet, Hateful Memes): the cached prompt gives the scores of full recomputation."""

import pytest
import torch

from openflamingo_hf.eval.scoring import class_probabilities, rank_class_names
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image

CLASS_NAMES = ["cat", "a red car", "dog", "two birds on a mat"]  # different token counts


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mosaic_gpt"])
@pytest.mark.parametrize("normalize_length", [True, False])
def test_cached_prompt_gives_the_scores_of_full_recomputation(family, normalize_length):
    model, processor = build_tiny_model_and_processor(family)
    with torch.no_grad():  # non-zero gates: the images must matter for the scores
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.8)
    images = [[make_image(0), make_image(1)], [make_image(2)]]
    prompts = [processor.task_prompt([processor.task_text("classification", "cat")],
                                     processor.task_text("classification")),
               processor.task_prompt([], processor.task_text("classification"))]  # padded shorter row
    cached = rank_class_names(model, processor, images, prompts, CLASS_NAMES, normalize_length=normalize_length)
    full = rank_class_names(model, processor, images, prompts, CLASS_NAMES, normalize_length=normalize_length,
                            use_cache=False)
    assert cached.shape == (2, len(CLASS_NAMES))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # An independent reference for one (row, class): the bare sum of log-probabilities, computed here.
    ids = processor.tokenizer(CLASS_NAMES[1], add_special_tokens=False)["input_ids"]
    inputs = processor(images=[images[1]], text=[prompts[1] + CLASS_NAMES[1]], return_tensors="pt")
    with torch.no_grad():
        log_probs = torch.log_softmax(model(**inputs).logits[0, -len(ids) - 1 : -1], dim=-1)
    expected = log_probs[torch.arange(len(ids)), torch.tensor(ids)]
    expected = expected.mean() if normalize_length else expected.sum()
    assert float(cached[1, 1]) == pytest.approx(float(expected), abs=1e-4)
    # Changing the image changes the scores (the images are used).
    other = rank_class_names(model, processor, [[make_image(5), make_image(6)], [make_image(7)]], prompts, CLASS_NAMES)
    assert not torch.allclose(other, cached)


def test_probabilities_and_empty_class_name():
    probabilities = class_probabilities(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(probabilities[0], torch.tensor([0.5, 0.5]))
    assert float(probabilities[1, 0]) == pytest.approx(1 / (1 + torch.exp(torch.tensor(-2.0)).item()))
    model, processor = build_tiny_model_and_processor("llama")
    with pytest.raises(ValueError, match="has no tokens"):
        rank_class_names(model, processor, [[make_image(0)]], ["<image>Output:"], ["cat", ""])
