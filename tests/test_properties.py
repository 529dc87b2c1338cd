"""Properties that a realistic bug would break without any other test noticing (issue 22's mutation survivors).

Each test states a property of the model, the processor or the evaluation and checks it against something computed
independently of the code under test:

1. A gated block, with gates far from zero, computes `h = x + tanh(g_a) * attn(x)`, then `h + tanh(g_f) * ff(h)`
   (recomputed here with plain torch ops from the block's weights, inside a real forward and a real decode step).
2. Every demonstration of every few-shot trial comes from the train split and is never the query.
3. Any mismatch between the number of images and of `<image>` markers raises, in every input layout.
4. A row's decode-step logits never depend on the pixels of its padding image slots, even when it generates an
   `<image>` beyond its own images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openflamingo_hf.eval.evaluate import BenchmarkData, EvalSettings, evaluate_benchmark
from openflamingo_hf.eval.example import EvalExample
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image

IMAGE = "<image>"


def _pixels(processor, images: list[list]) -> torch.Tensor:
    return processor(images=images, text=[IMAGE * len(row) + "x" for row in images], return_tensors="pt")[
        "pixel_values"]


# ----------------------------------------------------------------------------------------------------------------------
# 1. The gated block: x + tanh(g_a) * attn(x), then h + tanh(g_f) * ff(h)
# ----------------------------------------------------------------------------------------------------------------------

ATTN_GATE, FF_GATE = 0.7, -1.3  # far from 0, where tanh(g) and g (or 0) differ: tanh 0.7 = 0.60, tanh -1.3 = -0.86


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _reference_block(block, x: torch.Tensor, latents: torch.Tensor, image_of_token: list[list[int]]) -> torch.Tensor:
    """
    The gated block in float64 from its weights, token by token: token t of row b attends the latents of image
    `image_of_token[b][t]` (0-based; -1: no image, the attention half is then zero), Flamingo's immediate media.
    """
    attn, ff = block.attn, block.ff
    heads, head_dim = attn.num_heads, attn.head_dim
    x = x.double()
    w_q, w_kv, w_out = attn.to_q.weight.double(), attn.to_kv.weight.double(), attn.to_out.weight.double()
    query = _layer_norm(x, attn.norm) @ w_q.T  # (batch, seq, heads * head_dim)
    attended = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            image = image_of_token[b][t]
            if image < 0:
                continue
            kv = latents[b, image].double() @ w_kv.T  # (latents, 2 * heads * head_dim)
            key, value = kv[:, : heads * head_dim], kv[:, heads * head_dim :]
            out = []
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                weights = torch.softmax(key[:, part] @ query[b, t, part] / math.sqrt(head_dim), dim=0)
                out.append(weights @ value[:, part])
            attended[b, t] = torch.cat(out) @ w_out.T
    h = x + math.tanh(block.attn_gate.item()) * attended
    hidden = _layer_norm(h, ff.norm) @ ff.fc1.weight.double().T
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return h + math.tanh(block.ff_gate.item()) * (hidden @ ff.fc2.weight.double().T)


def _immediate_images(ids: list[int], media_id: int, num_real: int) -> list[int]:
    """0-based image each token attends to: the last `<image>` at or before it; -1 before the first one and for
    `<image>`s beyond the row's `num_real` images."""
    seen, out = 0, []
    for token in ids:
        seen += token == media_id
        out.append(seen - 1 if 0 < seen <= num_real else -1)
    return out


def _record_blocks(model):
    calls = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((module, hidden.detach().clone(), output.detach().clone()))

    handles = [block.register_forward_hook(hook, with_kwargs=True) for block in model.gated_cross_attn_layers.values()]
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_gated_block_is_tanh_gated_attention_then_tanh_gated_feed_forward(family):
    """In a real prefill (a left-padded batch whose rows hold 2 and 1 images, text before the first image) and in the
    decode step that follows, every gated block's output equals the formula, computed from its input, the images'
    latents and its weights. The gates differ per block and are far from 0."""
    model, processor = build_tiny_model_and_processor(family, cross_attn_every_n_layers=1)
    blocks = list(model.gated_cross_attn_layers.values())
    assert len(blocks) >= 2
    with torch.no_grad():
        for k, block in enumerate(blocks):
            block.attn_gate.fill_(ATTN_GATE * (1 + 0.25 * k))
            block.ff_gate.fill_(FF_GATE * (1 - 0.2 * k))
    images = [[make_image(1), make_image(2)], [make_image(3)]]
    texts = [f"A{IMAGE}a cat{IMAGE}two birds", f"Output:{IMAGE}a dog on a mat"]
    inputs = processor(images=images, text=texts, return_tensors="pt")
    media_id = model.config.media_token_id
    calls, handles = _record_blocks(model)
    try:
        with torch.no_grad():
            prefill = model(**inputs, use_cache=True)
            latents = prefill.image_hidden_states
            assert len(calls) == len(blocks)
            ids = inputs["input_ids"].tolist()
            image_of_token = [_immediate_images(row, media_id, len(images[b])) for b, row in enumerate(ids)]
            for block, hidden, output in calls:
                expected = _reference_block(block, hidden, latents, image_of_token)
                torch.testing.assert_close(output.double(), expected, atol=2e-5, rtol=1e-4)
            assert any(i >= 0 for row in image_of_token for i in row)

            # One decode step: a text token for row 0 (attends its 2nd image), `<image>` for row 1 (beyond its one
            # image: attends nothing).
            calls.clear()
            step = torch.tensor([[processor.tokenizer.encode("a")[0]], [media_id]])
            full = torch.cat([inputs["input_ids"], step], dim=1)
            model(input_ids=step, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
                  cache=prefill.cache, media_cache=prefill.media_cache,
                  media_index=model.get_media_index(full)[:, -1:], use_cache=True)
            assert len(calls) == len(blocks)
            last = [[_immediate_images(row, media_id, len(images[b]))[-1]] for b, row in enumerate(full.tolist())]
            assert last == [[1], [-1]]
            for block, hidden, output in calls:
                torch.testing.assert_close(output.double(), _reference_block(block, hidden, latents, last),
                                           atol=2e-5, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------------------
# 2. Few-shot demonstrations: from the train split, never the query
# ----------------------------------------------------------------------------------------------------------------------


class _RecordingProcessor:
    """The processor, recording every batch the evaluation sends it (images and prompts per row)."""

    def __init__(self, processor):
        self._processor = processor
        self.calls: list[tuple[list, list[str]]] = []

    def __call__(self, images=None, text=None, **kwargs):
        self.calls.append((images, text))
        return self._processor(images=images, text=text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def _split(prefix: str, count: int, offset: int) -> list[EvalExample]:
    # "... 1 end" is no substring of "... 11 end": each text names one example.
    return [EvalExample(f"{prefix}{i}", make_image(offset + i), captions=[f"{prefix} caption {i} end"],
                        question=f"{prefix} question {i}?", answers=[f"{prefix} answer {i}"] * 3,
                        label="yes" if i % 2 else "no", ocr=f"{prefix} meme {i} end") for i in range(count)]


@pytest.mark.parametrize("benchmark", ["coco", "hateful_memes"])
def test_every_demonstration_comes_from_the_train_split_and_is_never_the_query(benchmark):
    """Every row of every batch of every (shots, seed) trial: its demonstrations, given as images (few-shot) or as
    text only (0-shot), are train examples, distinct, and none is the query; the query is a test example, and each
    trial answers each sampled test example once. The splits' images and texts are all distinct, so each one names
    its example."""
    model, processor = build_tiny_model_and_processor("llama")
    train, test = _split("train", 12, 0), _split("test", 7, 500)
    image_owner = {id(e.image): e for e in train + test}
    recording = _RecordingProcessor(processor)
    shots, seeds, num_samples = (0, 2, 4), (0, 1), 5
    settings = EvalSettings(shots=shots, trial_seeds=seeds, num_samples=num_samples, query_set_size=10, batch_size=3,
                            num_beams=1, show_progress=False)
    evaluate_benchmark(model, recording, benchmark, BenchmarkData(train=train, test=test), settings)

    train_ids, test_ids = {e.id for e in train}, {e.id for e in test}
    queries: list[str] = []
    for images, prompts in recording.calls:
        for row_images, prompt in zip(images, prompts):
            owners = [image_owner[id(image)] for image in row_images]
            query = owners[-1]
            assert query.id in test_ids
            queries.append(query.id)
            demonstrations = owners[:-1]
            chunks = prompt.split("<|endofchunk|>")[:-1]  # every demonstration is closed by <|endofchunk|>
            if demonstrations:  # few-shot: one image per demonstration, each chunk that demonstration's text
                assert len(chunks) == len(demonstrations) in (2, 4)
            else:  # 0-shot: two text-only demonstrations, named by their text
                assert len(chunks) == 2 and prompt.count(IMAGE) == 1
                demonstrations = [next(e for e in train + test if _text_names(chunk, e)) for chunk in chunks]
            for chunk, demonstration in zip(chunks, demonstrations):
                assert _text_names(chunk, demonstration), (chunk, demonstration.id)
            ids = [d.id for d in demonstrations]
            assert set(ids) <= train_ids, ids
            assert query.id not in ids and len(set(ids)) == len(ids)
    trials = len(shots) * len(seeds)
    assert len(queries) == trials * num_samples
    for k in range(trials):  # one trial's queries: distinct test examples
        assert len(set(queries[k * num_samples : (k + 1) * num_samples])) == num_samples


def _text_names(chunk: str, example: EvalExample) -> bool:
    """Whether a prompt chunk is `example`'s demonstration text (its caption, or the text on its meme)."""
    return example.captions[0] in chunk or f"'{example.ocr}'" in chunk


# ----------------------------------------------------------------------------------------------------------------------
# 3. Image / marker counts: any mismatch raises, in every layout
# ----------------------------------------------------------------------------------------------------------------------


def _img(k: int):
    return make_image(k)


# (case name, images, text, videos): the numbers of images (or videos) and of their markers differ somewhere.
MISMATCHES = [
    ("flat list, batch, one image too many", lambda: [_img(0), _img(1), _img(2)], [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("flat list, batch, one image too few", lambda: [_img(0), _img(1)], [f"{IMAGE}a", f"{IMAGE}{IMAGE}b"], None),
    ("flat list, batch, markers only in one text", lambda: [_img(0), _img(1), _img(2)], [f"{IMAGE}a", "b"], None),
    ("flat list, batch, no markers, more images than texts", lambda: [_img(0), _img(1), _img(2)], ["a", "b"], None),
    ("nested, extra image in a row", lambda: [[_img(0), _img(1)], [_img(2)]], [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("nested, missing image in a row", lambda: [[_img(0)], []], [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("nested, rows swapped", lambda: [[_img(0)], [_img(1), _img(2)]], [f"{IMAGE}{IMAGE}a", f"{IMAGE}b"], None),
    ("nested, more rows than texts", lambda: [[_img(0)], [_img(1)], [_img(2)]], [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("nested, fewer rows than texts", lambda: [[_img(0)]], [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("one text, list, one image too many", lambda: [_img(0), _img(1)], f"{IMAGE}a", None),
    ("one text, list, one image too few", lambda: [_img(0)], f"{IMAGE}{IMAGE}a", None),
    ("one text, one image, two markers", lambda: _img(0), f"{IMAGE}a{IMAGE}", None),
    ("one text in a list, flat list too long", lambda: [_img(0), _img(1), _img(2)], [f"{IMAGE}{IMAGE}a"], None),
    ("stacked array, one image too many", lambda: np.stack([np.asarray(_img(k)) for k in range(3)]),
     [f"{IMAGE}a", f"{IMAGE}b"], None),
    ("markers but no images", lambda: None, [f"{IMAGE}a", "b"], None),
    ("videos, one too many", lambda: None, ["<video>a", "<video>b"], lambda: [_video(0), _video(1), _video(2)]),
    ("videos, nested, missing one", lambda: None, ["<video>a", "<video><video>b"], lambda: [[_video(0)], [_video(1)]]),
    ("images and videos, one image too many", lambda: [_img(0), _img(1)], f"{IMAGE}a<video>b", lambda: [_video(0)]),
    ("images and videos, one image too few", lambda: [_img(0)], f"{IMAGE}a<video>{IMAGE}b", lambda: [_video(0)]),
]


def _video(k: int) -> np.ndarray:
    return np.stack([np.asarray(make_image(100 * k + f)) for f in range(3)])


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


@pytest.mark.parametrize("case", MISMATCHES, ids=[case[0] for case in MISMATCHES])
def test_any_image_marker_count_mismatch_raises(processor, case):
    _, images, text, videos = case
    kwargs = {"num_frames": 2} if videos is not None else {}
    with pytest.raises(ValueError):
        processor(images=images(), text=text, videos=videos() if videos else None, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("layout", ["flat", "nested", "stacked"])
def test_matching_counts_keep_every_image_in_its_row(processor, layout):
    """The counterpart: with as many images as markers, each row's pixel slots hold exactly its images, in order."""
    rows = [[_img(0)], [_img(1), _img(2)], []]
    texts = [f"{IMAGE}a", f"b{IMAGE}c{IMAGE}", "d"]
    flat = [image for row in rows for image in row]
    images = {"flat": flat, "nested": rows, "stacked": np.stack([np.asarray(i) for i in flat])}[layout]
    if layout != "nested":
        texts = texts[:2]
        rows = rows[:2]
    pixel_values = processor(images=images, text=texts, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[:3] == (len(rows), 2, 1)
    for b, row in enumerate(rows):
        for j in range(2):
            if j < len(row):
                expected = _pixels(processor, [[row[j]]])[0, 0]
                torch.testing.assert_close(pixel_values[b, j], expected)
            else:
                assert not pixel_values[b, j].any()


# ----------------------------------------------------------------------------------------------------------------------
# 4. Padding image slots are never read, not even by an <image> generated beyond a row's images
# ----------------------------------------------------------------------------------------------------------------------


class _ForceFirstToken:
    """A logits processor that makes `token` every row's first new token (then lets the model choose)."""

    def __init__(self, token: int, prompt_length: int):
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.token] = 0.0
            return forced
        return scores


@pytest.mark.parametrize("family", ["llama", "mpt"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate_media", "all_previous_media"])
def test_decode_logits_do_not_depend_on_padding_slot_pixels(family, cache_implementation, only_immediate):
    """A batch whose rows hold 3, 1 and 2 images (so rows 1 and 2 have padding slots); every row's first new token is
    forced to `<image>` (for rows 1 and 2 that is beyond their images, at the number of a padding slot). Each step's
    logits of every row are the same whether the padding slots hold zeros (as the processor makes them) or noise.
    Both attention modes: each token its latest image (the releases), or every image up to it."""
    from transformers import LogitsProcessorList

    model, processor = build_tiny_model_and_processor(family, gate=1.0, cross_attn_every_n_layers=1,
                                                      only_attend_immediate_media=only_immediate)
    images = [[_img(0), _img(1), _img(2)], [_img(3)], [_img(4), _img(5)]]
    texts = [f"{IMAGE}a{IMAGE}b{IMAGE}c", f"{IMAGE}a dog on a mat", f"Output:{IMAGE}two{IMAGE}"]
    inputs = processor(images=images, text=texts, return_tensors="pt")
    noisy = inputs["pixel_values"].clone()
    generator = torch.Generator().manual_seed(0)
    for b, row in enumerate(images):
        noisy[b, len(row):] = torch.randn(noisy[b, len(row):].shape, generator=generator) * 3
    assert not torch.equal(noisy, inputs["pixel_values"])

    def scores(pixel_values):
        force = _ForceFirstToken(model.config.media_token_id, inputs["input_ids"].shape[1])
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        out = model.generate(**{**inputs, "pixel_values": pixel_values}, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, logits_processor=LogitsProcessorList([force]), output_logits=True,
                             return_dict_in_generate=True, **extra)
        return out.sequences, torch.stack(out.logits, dim=1)

    with torch.no_grad():
        zero_sequences, zero_logits = scores(inputs["pixel_values"])
        noise_sequences, noise_logits = scores(noisy)
    prompt_length = inputs["input_ids"].shape[1]
    assert (zero_sequences[:, prompt_length] == model.config.media_token_id).all()
    torch.testing.assert_close(noise_logits, zero_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(noise_sequences, zero_sequences)
    # The slots that are real do matter (the test would be vacuous otherwise).
    real_noise = inputs["pixel_values"].clone()
    real_noise[0, 2] = torch.randn(real_noise[0, 2].shape, generator=generator) * 3
    with torch.no_grad():
        _, moved = scores(real_noise)
    assert (moved[0, 1:] - zero_logits[0, 1:]).abs().amax() > 1e-4
