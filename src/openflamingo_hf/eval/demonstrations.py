"""How the few-shot evaluation picks its in-context demonstrations, as the original open_flamingo eval does.

Two strategies:

- `RandomDemonstrations`: for every query of a batch, `num_shots` distinct demonstrations drawn at random from the
  pool (the original's `sample_batch_demos_from_query_set`: independent of the query, one draw per query).
- `RICES` (Retrieval-based In-Context Example Selection): for every query, the `num_shots` pool examples whose CLIP
  image embeddings are closest (cosine similarity) to the query's, ordered so that the most similar one comes LAST,
  i.e. right before the query in the prompt (the original reverses its top-k).

The pool is what the original calls the query set: a random subset of the benchmark's train split; the queries are
test examples. transformers and PIL are imported only when an embedding is computed.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .example import EvalExample

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["RICES", "RandomDemonstrations", "nearest_neighbours"]


class RandomDemonstrations:
    """
    Random demonstrations, drawn independently of the query.

    The object owns a `random.Random` seeded with `seed`, so one trial (one seed) is reproducible: the same pool, seed
    and sequence of `sample` calls give the same demonstrations.

    Args:
        pool: the examples to draw demonstrations from (the original's "query set").
        seed: seed of the object's random number generator.
    """

    def __init__(self, pool: list[EvalExample], seed: int) -> None:
        self.pool = list(pool)
        self.seed = seed
        self._rng = random.Random(seed)

    def sample(self, batch_size: int, num_shots: int) -> list[list[EvalExample]]:
        """
        Returns `batch_size` lists of `num_shots` distinct pool examples (distinct within a list, drawn without
        replacement; lists are drawn independently of each other and of the queries).

        Raises:
            ValueError: if `num_shots` is negative or larger than the pool, or `batch_size` is negative.
        """
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if num_shots < 0:
            raise ValueError(f"num_shots must be >= 0, got {num_shots}")
        if num_shots > len(self.pool):
            raise ValueError(
                f"cannot draw {num_shots} distinct demonstrations from a pool of {len(self.pool)} examples; "
                "use a larger pool (query set) or fewer shots"
            )
        return [self._rng.sample(self.pool, num_shots) for _ in range(batch_size)]


def nearest_neighbours(
    query_embeddings: torch.Tensor,
    pool_embeddings: torch.Tensor,
    k: int,
    *,
    exclude: torch.Tensor | None = None,
) -> torch.LongTensor:
    """
    The `k` pool embeddings most similar (cosine similarity) to each query embedding.

    Args:
        query_embeddings: (num_queries, dim); need not be normalised.
        pool_embeddings: (pool_size, dim); need not be normalised.
        k: neighbours per query, 0 <= k <= pool_size (pool_size - 1 where a query excludes one).
        exclude: optional (num_queries,) pool index that each query may not retrieve (e.g. itself), -1 for none.

    Returns:
        (num_queries, k) int64 indices into the pool, ordered by increasing similarity: the MOST similar is LAST
        (`[:, -1]`), so that the closest demonstration sits right before the query in the prompt.
    """
    if query_embeddings.ndim != 2 or pool_embeddings.ndim != 2:
        raise ValueError(
            f"expected 2-D embeddings, got query {tuple(query_embeddings.shape)}, pool {tuple(pool_embeddings.shape)}"
        )
    if query_embeddings.shape[1] != pool_embeddings.shape[1]:
        raise ValueError(
            f"embedding sizes differ: query {query_embeddings.shape[1]}, pool {pool_embeddings.shape[1]}"
        )
    pool_size = pool_embeddings.shape[0]
    limit = pool_size - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)
    if k < 0 or k > limit:
        raise ValueError(f"k must be in [0, {limit}] for a pool of {pool_size} examples, got {k}")
    queries = torch.nn.functional.normalize(query_embeddings.float(), dim=-1)
    pool = torch.nn.functional.normalize(pool_embeddings.float().to(queries.device), dim=-1)
    similarity = queries @ pool.T  # (num_queries, pool_size)
    if exclude is not None:
        exclude = exclude.to(similarity.device).long()
        rows = torch.nonzero(exclude >= 0).flatten()
        similarity[rows, exclude[rows]] = float("-inf")
    top = similarity.topk(k, dim=-1, largest=True, sorted=True).indices  # most similar first
    return top.flip(dims=[1]).long()


def _safe_name(name: str) -> str:
    """A file-name-safe form of a model name or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-80:] or "model"


def _load_image(image: Any) -> PILImage:
    """An `EvalExample.image` (a path or a PIL image) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _not_found(what: str, name: str, error: Exception) -> OSError:
    return OSError(
        f"RICES could not load the {what} of {name!r}: it is neither a local folder nor in the local Hugging Face "
        f"cache (and could not be downloaded). Pass --rices_vision_encoder_path a local folder holding a "
        f"transformers CLIP model and its image processor. ({type(error).__name__}: {error})"
    )


def _from_pretrained(loader: Any, name: str, what: str) -> Any:
    """`loader(name, local_files_only=True)`, then (unless offline) a download, else a clear error."""
    try:
        return loader(name, local_files_only=True)
    except (OSError, ValueError) as local_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        if offline or Path(name).exists():
            raise _not_found(what, name, local_error) from local_error
        try:
            return loader(name)
        except Exception as error:  # network, missing repository, ...
            raise _not_found(what, name, error) from error


def _load_clip(name: str) -> torch.nn.Module:
    """The CLIP model (or vision tower) of a folder or repository id."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

    config = _from_pretrained(AutoConfig.from_pretrained, name, "model config")
    if "CLIPVisionModelWithProjection" in (getattr(config, "architectures", None) or []):
        return _from_pretrained(CLIPVisionModelWithProjection.from_pretrained, name, "model")
    return _from_pretrained(AutoModel.from_pretrained, name, "model")


def _image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """
    (batch, dim) image embeddings: `CLIPModel.get_image_features` (the projected pooled output),
    `CLIPVisionModelWithProjection`'s `image_embeds`, or a bare vision model's `pooler_output`.
    """
    if hasattr(model, "get_image_features"):
        output = model.get_image_features(pixel_values=pixel_values)
    else:
        output = model(pixel_values=pixel_values)
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "pooler_output"):  # newer transformers return an output object here
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read image embeddings from {type(model).__name__}'s output {type(output).__name__}")


class RICES:
    """
    Retrieval-based In-Context Example Selection: the demonstrations of a query are the pool examples whose CLIP image
    embeddings are closest to the query image's (cosine similarity), most similar last.

    The pool's embeddings are computed once, at construction (L2-normalised, in batches of `batch_size`, under
    `torch.no_grad`), or read from the cache: with `cache_dir`, they are saved there as a safetensors file whose name
    holds the model name and a hash of the model name and the pool's ids in order, so that another pool or model
    never reuses a stale file; a later construction with the same model name and pool reads it back without
    running (or even loading) the model.

    A query that is itself in the pool (same `id`) never retrieves itself: that pool entry is excluded for it. In the
    original the pool is the train split and the queries are test examples, so this matters only for overlapping
    data.

    Args:
        pool: examples to retrieve demonstrations from; `.image` a file path or a PIL image, `.id` unique.
        model_name_or_path: a local folder or Hugging Face repository id of a transformers CLIP model (`CLIPModel`,
            `CLIPVisionModelWithProjection` or `CLIPVisionModel`) with its image processor. It is loaded from the
            folder or the local cache first (works offline). When `model` is given, it only names the cache.
        cache_dir: folder of the cached pool embeddings; None: no cache.
        batch_size: images per forward pass.
        device: where the model runs.
        model: an already-loaded CLIP model, used instead of loading `model_name_or_path`.
        image_processor: the image processor to use; default: `AutoImageProcessor` of `model_name_or_path`.
    """

    def __init__(
        self,
        pool: list[EvalExample],
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        cache_dir: str | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        model: torch.nn.Module | None = None,
        image_processor: Any = None,
    ) -> None:
        if not pool:
            raise ValueError("RICES needs a non-empty pool of examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pool = list(pool)
        self.model_name_or_path = str(model_name_or_path)
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._model = model
        self._image_processor = image_processor
        self._index_of_id: dict[str, int] = {}
        for index, example in enumerate(self.pool):
            if example.id in self._index_of_id:
                raise ValueError(f"duplicate example id {example.id!r} in the RICES pool")
            self._index_of_id[example.id] = index

        self.cache_path: Path | None = None
        if cache_dir is not None:
            self.cache_path = Path(cache_dir) / self._cache_file_name()
        self.features = self._load_cached_features()
        if self.features is None:
            self.features = self.embed([example.image for example in self.pool], desc="Precomputing features for RICES")
            self._save_cached_features(self.features)

    # -- cache --------------------------------------------------------------------------------------------------

    def _cache_key(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.model_name_or_path.encode("utf-8"))
        for example in self.pool:
            digest.update(b"\0")
            digest.update(str(example.id).encode("utf-8"))
        return digest.hexdigest()[:32]

    def _cache_file_name(self) -> str:
        return f"rices_{_safe_name(self.model_name_or_path)}_{self._cache_key()}.safetensors"

    def _load_cached_features(self) -> torch.Tensor | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.cache_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != self._cache_key() or "features" not in handle.keys():
                return None
            features = handle.get_tensor("features")
        if features.ndim != 2 or features.shape[0] != len(self.pool):
            return None
        return features

    def _save_cached_features(self, features: torch.Tensor) -> None:
        if self.cache_path is None:
            return
        from safetensors.torch import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.cache_path.with_name(self.cache_path.name + f".tmp{os.getpid()}")
        metadata = {"key": self._cache_key(), "model": self.model_name_or_path, "num_examples": str(len(self.pool))}
        save_file({"features": features.contiguous()}, str(temporary), metadata=metadata)
        os.replace(temporary, self.cache_path)

    # -- model ------------------------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The CLIP model, loaded (and moved to `device`, in eval mode) on first use."""
        if self._model is None:
            self._model = _load_clip(self.model_name_or_path)
        self._model.to(self.device).eval()
        return self._model

    @property
    def image_processor(self) -> Any:
        """The image processor, loaded from `model_name_or_path` on first use unless one was passed."""
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = _from_pretrained(
                AutoImageProcessor.from_pretrained, self.model_name_or_path, "image processor"
            )
        return self._image_processor

    def embed(self, images: list[Any], desc: str | None = None) -> torch.Tensor:
        """
        L2-normalised CLIP image embeddings.

        Args:
            images: file paths or PIL images.
            desc: progress-bar label; None: no progress bar.

        Returns:
            (len(images), dim) float32 tensor on the CPU.
        """
        from tqdm import tqdm

        model = self.model
        processor = self.image_processor
        dtype = next(model.parameters()).dtype
        features = []
        starts = range(0, len(images), self.batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc=desc, disable=desc is None):
                batch = [_load_image(image) for image in images[start : start + self.batch_size]]
                pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
                embedding = _image_features(model, pixel_values.to(device=self.device, dtype=dtype)).float()
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
                features.append(embedding.detach().cpu())
        if not features:
            return torch.empty(0, 0)
        return torch.cat(features)

    # -- retrieval --------------------------------------------------------------------------------------------

    def find(self, queries: list[EvalExample], num_shots: int) -> list[list[EvalExample]]:
        """
        The `num_shots` pool examples most similar to each query's image, most similar LAST.

        A query whose `id` is in the pool never gets itself back (its own pool entry is excluded).

        Returns:
            len(queries) lists of `num_shots` pool examples.
        """
        if not queries:
            return []
        if num_shots == 0:
            return [[] for _ in queries]
        query_features = self.embed([query.image for query in queries])
        exclude = torch.tensor([self._index_of_id.get(query.id, -1) for query in queries], dtype=torch.long)
        indices = nearest_neighbours(query_features, self.features, num_shots, exclude=exclude)
        return [[self.pool[i] for i in row] for row in indices.tolist()]
