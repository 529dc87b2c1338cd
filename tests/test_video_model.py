"""Multi-frame media in the model: padding frames are never attended; frame embeddings make frame order matter."""

import pytest
import torch

from openflamingo_hf import OpenFlamingoForConditionalGeneration
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image


def _model(frame_embeddings: bool):
    model, processor = build_tiny_model_and_processor("llama")
    if frame_embeddings:
        config = model.config
        config.perceiver_max_num_frames = 4
        torch.manual_seed(0)
        model = OpenFlamingoForConditionalGeneration(config)
        with torch.no_grad():  # as distinct as trained ones (the initialisation is tiny)
            model.perceiver.frame_embs.normal_()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.8)
            block.ff_gate.fill_(0.8)
    return model.eval(), processor


def _clip(processor, num_frames: int, seed: int = 0) -> torch.Tensor:
    """(1, 1, num_frames, 3, H, W): one media slot of `num_frames` different frames."""
    frames = [processor(images=[make_image(seed + i)], text=["<image>"], return_tensors="pt")["pixel_values"][0, 0, 0]
              for i in range(num_frames)]
    return torch.stack(frames)[None, None]


def _logits(model, processor, pixel_values, frame_mask=None):
    inputs = processor(images=[make_image(0)], text=["<image>Output: a cat"], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=pixel_values, frame_mask=frame_mask).logits


@pytest.mark.parametrize("frame_embeddings", [False, True])
def test_padding_frames_never_change_logits(frame_embeddings):
    model, processor = _model(frame_embeddings)
    clip = _clip(processor, 3)
    alone = _logits(model, processor, clip[:, :, :2])  # the two real frames
    padded = torch.cat([clip[:, :, :2], torch.randn_like(clip[:, :, :1])], dim=2)  # + a padding frame of noise
    mask = torch.tensor([[[True, True, False]]])
    torch.testing.assert_close(_logits(model, processor, padded, mask), alone, atol=1e-5, rtol=1e-5)
    # The mask matters: the same padded clip without it gives other logits.
    assert not torch.allclose(_logits(model, processor, padded), alone, atol=1e-4)


def test_reversing_frames_changes_the_output_only_with_frame_embeddings():
    plain, processor = _model(frame_embeddings=False)
    clip = _clip(processor, 3)
    reversed_clip = clip.flip(2)
    # Without frame embeddings the Perceiver sees one flattened set of patches: order cannot matter.
    torch.testing.assert_close(_logits(plain, processor, reversed_clip), _logits(plain, processor, clip),
                               atol=1e-5, rtol=1e-5)
    timed, processor = _model(frame_embeddings=True)
    assert not torch.allclose(_logits(timed, processor, reversed_clip), _logits(timed, processor, clip), atol=1e-4)


def test_generate_with_frame_mask_equals_the_unpadded_clip():
    model, processor = _model(frame_embeddings=True)
    clip = _clip(processor, 3)
    inputs = processor(images=[make_image(0)], text=["<image>Output:"], return_tensors="pt")
    common = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5,
                  do_sample=False)
    alone = model.generate(pixel_values=clip[:, :, :2], **common)
    padded = torch.cat([clip[:, :, :2], torch.zeros_like(clip[:, :, :1])], dim=2)
    assert torch.equal(model.generate(pixel_values=padded, frame_mask=torch.tensor([[[1, 1, 0]]]), **common), alone)


def test_frame_errors():
    model, processor = _model(frame_embeddings=True)
    with pytest.raises(ValueError, match=r"5 frames .* at most 4 .*perceiver_max_num_frames"):
        _logits(model, processor, _clip(processor, 5))
    with pytest.raises(ValueError, match=r"frame_mask must have shape \(batch, num_images, num_frames\) = \(1, 1, 2\)"):
        _logits(model, processor, _clip(processor, 2), torch.ones(1, 2, dtype=torch.bool))
    inputs = processor(images=[make_image(0)], text=["<image>Output:"], return_tensors="pt")
    with pytest.raises(ValueError, match="pass it with pixel_values only"):
        model(input_ids=inputs["input_ids"], frame_mask=torch.ones(1, 1, 1, dtype=torch.bool))


def test_a_batch_of_videos_of_different_lengths_equals_each_video_alone():
    model, processor = _model(frame_embeddings=True)
    short, long = [make_image(i) for i in range(2)], [make_image(10 + i) for i in range(3)]
    texts = ["<video>Output: a", "<image>Output: b<|endofchunk|><video>Output: a cat"]
    batch = processor(images=[[], [make_image(5)]], videos=[[short], [long]], text=texts, num_frames=4,
                      return_tensors="pt")
    assert batch["frame_mask"].shape == (2, 2, 3)
    with torch.no_grad():
        together = model(**batch).logits
        for row, (images, video, text) in enumerate(zip([[], [make_image(5)]], [short, long], texts)):
            alone = processor(images=[images], videos=[[video]], text=[text], num_frames=4, return_tensors="pt")
            logits = model(**alone).logits[0]
            torch.testing.assert_close(together[row, -logits.shape[0]:], logits, atol=1e-5, rtol=1e-5)


def test_the_vision_tower_encodes_only_real_frames():
    """Padding frames are not encoded (a clip next to a 4-image document would cost the tower 16 frames a sample);
    their features are zeros and every real frame's features are exactly the tower's on that frame alone."""
    model, processor = _model(frame_embeddings=True)
    clip = torch.cat([_clip(processor, 2), _clip(processor, 2, seed=5)], dim=1)  # 2 media x 2 frames
    padded = torch.cat([clip, torch.randn_like(clip[:, :, :1])], dim=2)  # + a padding frame each
    mask = torch.tensor([[[True, True, False], [True, False, False]]])
    seen = []
    hook = model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            features = model.get_vision_features(padded, mask)
    finally:
        hook.remove()
    assert seen == [3]  # the three real frames, not 2 x 3
    with torch.no_grad():
        alone = model.vision_model(pixel_values=padded[mask]).last_hidden_state[:, 1:]
    assert features.shape == (1, 2, 3, alone.shape[1], alone.shape[2])
    torch.testing.assert_close(features[mask], alone)
    assert not features[~mask].any()
