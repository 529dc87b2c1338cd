"""In-context demonstration selection for the few-shot eval: random demonstrations, cosine nearest neighbours and
RICES with a tiny random CLIP model (no network, no weights downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from openflamingo_hf.eval.demonstrations import RICES, RandomDemonstrations, nearest_neighbours
from openflamingo_hf.eval.example import EvalExample

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}


def brute_force_neighbours(queries: torch.Tensor, pool: torch.Tensor, k: int, exclude=None) -> list[list[int]]:
    """Independent reference: a Python loop over cosine similarities, most similar last."""
    result = []
    for qi, query in enumerate(queries.double()):
        scores = []
        for pi, item in enumerate(pool.double()):
            if exclude is not None and exclude[qi] == pi:
                continue
            scores.append((float(query @ item / (query.norm() * item.norm())), pi))
        scores.sort(reverse=True)
        result.append([pi for _, pi in scores[:k]][::-1])
    return result


# -- nearest_neighbours ---------------------------------------------------------------------------------------


def test_nearest_neighbours_crafted():
    # Pool vectors at angles 0, 10, ..., 170 degrees in the plane, with different norms (cosine ignores them).
    angles = torch.arange(18, dtype=torch.float64) * 10.0
    norms = torch.linspace(0.5, 3.0, 18, dtype=torch.float64)
    pool = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1) * norms[:, None]
    queries = torch.tensor([[1.0, 0.02], [0.0, 5.0]], dtype=torch.float64)  # ~1 degree, 90 degrees
    out = nearest_neighbours(queries.float(), pool.float(), 3)
    assert out.dtype == torch.long and out.shape == (2, 3)
    # query 0 (at ~1.1 deg): nearest 0 deg, then 10, then 20 -> most similar last.
    assert out[0].tolist() == [2, 1, 0]
    # query 1 (at 90 deg): nearest 90 (index 9); then 80/100 (indices 8 and 10, tied) -- check as a set.
    assert out[1, -1].item() == 9 and set(out[1, :2].tolist()) == {8, 10}


def test_nearest_neighbours_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 16, generator=generator)
    pool = torch.randn(40, 16, generator=generator) * torch.rand(40, 1, generator=generator).add(0.1)
    for k in (0, 1, 5, 40):
        assert nearest_neighbours(queries, pool, k).tolist() == brute_force_neighbours(queries, pool, k)
    exclude = torch.tensor([3, -1, 0, 39, -1, 5, 5])
    got = nearest_neighbours(queries, pool, 6, exclude=exclude).tolist()
    assert got == brute_force_neighbours(queries, pool, 6, exclude=exclude.tolist())
    for row, excluded in zip(got, exclude.tolist()):
        assert excluded not in row


def test_nearest_neighbours_errors():
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(torch.randn(2, 4), torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(torch.randn(2, 4), torch.randn(3, 4), 3, exclude=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="sizes differ"):
        nearest_neighbours(torch.randn(2, 4), torch.randn(3, 5), 1)


# -- RandomDemonstrations ----------------------------------------------------------------------------------------


def _pool(n: int) -> list[EvalExample]:
    return [EvalExample(id=str(i), image=f"{i}.jpg", captions=[f"caption {i}"]) for i in range(n)]


def test_random_demonstrations_reproducible_and_distinct():
    pool = _pool(30)
    first = RandomDemonstrations(pool, seed=1)
    again = RandomDemonstrations(pool, seed=1)
    other = RandomDemonstrations(pool, seed=2)
    a = [first.sample(4, 5) for _ in range(3)]
    b = [again.sample(4, 5) for _ in range(3)]
    c = [other.sample(4, 5) for _ in range(3)]
    ids = lambda batches: [[[e.id for e in demos] for demos in batch] for batch in batches]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    for batch in a:
        assert len(batch) == 4
        for demos in batch:
            assert len(demos) == 5 and len({e.id for e in demos}) == 5
            assert all(e in pool for e in demos)
    # Successive draws of one object differ (independent draws, not one fixed set).
    assert ids(a)[0] != ids(a)[1]
    assert RandomDemonstrations(pool, seed=0).sample(2, 0) == [[], []]
    full = RandomDemonstrations(pool, seed=0).sample(1, 30)[0]
    assert sorted(e.id for e in full) == sorted(e.id for e in pool)


def test_random_demonstrations_errors():
    with pytest.raises(ValueError, match="cannot draw 4 distinct demonstrations from a pool of 3"):
        RandomDemonstrations(_pool(3), seed=0).sample(2, 4)
    with pytest.raises(ValueError):
        RandomDemonstrations(_pool(3), seed=0).sample(2, -1)


# -- RICES -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _independent_embeddings(folder, images: list[Image.Image]) -> torch.Tensor:
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixel_values = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        features = model.visual_projection(pooled)
    return features / features.norm(dim=-1, keepdim=True)


def _colour_pool(tmp_path) -> list[EvalExample]:
    pool = []
    for name, rgb in COLOURS.items():
        for i in range(3):
            path = tmp_path / f"{name}{i}.png"
            Image.new("RGB", (40, 36), rgb).save(path)
            pool.append(EvalExample(id=f"{name}{i}", image=str(path)))
    return pool


def _noise_images(seed: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_rices_colours_and_self_exclusion(clip_folder, tmp_path):
    pool = _colour_pool(tmp_path)
    rices = RICES(pool, model_name_or_path=str(clip_folder), batch_size=4)
    assert rices.features.shape == (9, 16)
    torch.testing.assert_close(rices.features.norm(dim=-1), torch.ones(9))
    reference = _independent_embeddings(clip_folder, [Image.open(e.image) for e in pool])
    torch.testing.assert_close(rices.features, reference, atol=1e-5, rtol=1e-5)

    # Queries (not in the pool; a PIL image and a path) retrieve the three pool images of their own colour.
    queries = [
        EvalExample(id="q-green", image=Image.new("RGB", (50, 50), COLOURS["green"])),
        EvalExample(id="q-blue", image=pool[6].image),
    ]
    found = rices.find(queries, 3)
    assert {e.id for e in found[0]} == {"green0", "green1", "green2"}
    assert {e.id for e in found[1]} == {"blue0", "blue1", "blue2"}
    # A query that is in the pool never retrieves itself.
    found = rices.find([pool[0], pool[4]], 2)
    assert {e.id for e in found[0]} == {"red1", "red2"}
    assert {e.id for e in found[1]} == {"green0", "green2"}
    assert [len(d) for d in rices.find([pool[0]], 8)] == [8]
    with pytest.raises(ValueError):
        rices.find([pool[0]], 9)  # only 8 others


def test_rices_matches_brute_force(clip_folder):
    pool_images = _noise_images(1, 12)
    query_images = _noise_images(2, 4)
    pool = [EvalExample(id=f"p{i}", image=im) for i, im in enumerate(pool_images)]
    queries = [EvalExample(id=f"q{i}", image=im) for i, im in enumerate(query_images)] + [pool[5]]
    model = CLIPModel.from_pretrained(clip_folder)
    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    rices = RICES(pool, model_name_or_path="tiny", model=model, image_processor=processor, batch_size=5)
    found = rices.find(queries, 4)

    pool_emb = _independent_embeddings(clip_folder, pool_images)
    query_emb = _independent_embeddings(clip_folder, query_images + [pool_images[5]])
    expected = brute_force_neighbours(query_emb, pool_emb, 4, exclude=[-1, -1, -1, -1, 5])
    assert [[int(e.id[1:]) for e in demos] for demos in found] == expected
    # Most similar last: similarities increase along each list.
    for qi, demos in enumerate(found):
        sims = [float(query_emb[qi] @ pool_emb[int(e.id[1:])]) for e in demos]
        assert sims == sorted(sims)


def test_rices_cache_written_reused_and_invalidated(clip_folder, tmp_path):
    pool = [EvalExample(id=f"p{i}", image=im) for i, im in enumerate(_noise_images(3, 6))]
    model = CLIPModel.from_pretrained(clip_folder)
    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    calls = []
    original = model.get_image_features

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.get_image_features = counting
    cache = tmp_path / "cache"
    kwargs = dict(model_name_or_path="org/tiny-clip", cache_dir=str(cache), model=model, image_processor=processor)

    first = RICES(pool, batch_size=4, **kwargs)
    assert len(calls) == 2  # 6 images in batches of 4
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1 and "org_tiny-clip" in files[0].name

    calls.clear()
    second = RICES(pool, batch_size=4, **kwargs)
    assert calls == []  # read from the cache, the model was not run
    torch.testing.assert_close(second.features, first.features)
    # Cache also read when loading by name: the model is not even loaded for construction.
    by_name = RICES(pool, model_name_or_path="org/tiny-clip", cache_dir=str(cache))
    assert by_name._model is None
    torch.testing.assert_close(by_name.features, first.features)

    # A changed pool (one example fewer, or another order) does not reuse the file.
    for changed in (pool[:-1], pool[::-1]):
        calls.clear()
        RICES(changed, batch_size=4, **kwargs)
        assert calls
    # Another model name neither.
    calls.clear()
    RICES(pool, batch_size=4, **{**kwargs, "model_name_or_path": "org/other-clip"})
    assert calls
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_rices_by_name_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = [EvalExample(id="a", image=Image.new("RGB", (8, 8)))]
    with pytest.raises(OSError, match="rices_vision_encoder_path"):
        RICES(pool, model_name_or_path="nobody-here/no-such-clip-model")
    with pytest.raises(OSError, match="rices_vision_encoder_path"):
        RICES(pool, model_name_or_path=str(tmp_path / "missing_folder"))


@pytest.mark.parametrize("with_projection", [False, True])
def test_rices_vision_only_models(tmp_path, with_projection):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16,
    )
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    cls(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    pool = [EvalExample(id=f"p{i}", image=im) for i, im in enumerate(_noise_images(4, 5))]
    rices = RICES(pool, model_name_or_path=str(tmp_path))
    assert type(rices.model) is cls
    assert rices.features.shape == (5, 16 if with_projection else 32)
    assert [[e.id for e in d] for d in rices.find([pool[2]], 4)][0].count("p2") == 0
