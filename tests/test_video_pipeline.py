"""Videos through pipeline("image-text-to-text") chat messages: the same answer as model.generate on the video."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from openflamingo_hf.testing_utils import build_tiny_model_and_processor

av = pytest.importorskip("av")


def _write_clip(path, seed):
    """A clip of 4 random-noise frames (codec-friendly size)."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for pixels in frames:
            frame = Image.fromarray(pixels)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_chat_message_with_a_video_file(tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    processor.num_frames = 3
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    answers = []
    for seed in range(2):
        path = _write_clip(tmp_path / f"clip{seed}.mp4", seed)
        messages = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "Output:"}]}]
        result = pipe(text=messages, generate_kwargs=greedy, return_full_text=False)
        inputs = processor(videos=[path], text="<video>Output:", return_tensors="pt")
        expected = processor.post_process_generation(model.generate(**inputs, **greedy), inputs["input_ids"])[0]
        assert result[0]["generated_text"] == expected
        with torch.no_grad():
            answers.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(answers[0], answers[1], atol=1e-5)  # the video's frames reach the model
