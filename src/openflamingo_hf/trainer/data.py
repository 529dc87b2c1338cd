"""
Pretraining data for OpenFlamingo: image-caption pairs (LAION-style) and interleaved documents (MMC4-style and
ChatGPT-generated sequences), as `datasets.IterableDataset`s of tokenized samples. Pairs and MMC4 documents may hold
videos in place of images.

Each sample is a dict with `input_ids`, `attention_mask`, `labels` (seq_len,) (right padding to `max_length`),
`pixel_values` (num_media, num_frames, 3, H, W) (an image is one frame; `num_frames` is 1 without videos), when a
media has several frames `frame_mask` (num_media, num_frames) (False on the zero frames after a media's own), and
`skipped` (reason -> count, see below), ready for `OpenFlamingoDataCollator`. The processor builds each sample
(`pair_sample`, `interleaved_sample`: text layout, tokens, labels and pixel layout), and `processing.media_inputs`
reads the videos' frames (uniformly sampled to `num_frames`); this module only selects, orders and filters the media.

Formats (see `write_pair_shard` / `write_interleaved_shard`, which write them):

- Pairs: webdataset tars whose samples hold an image (`jpg`, `png` or `jpeg`) and a caption (`txt`); a JSONL file
  with `{"image": path, "caption": text}` per line (paths relative to the JSONL's folder); or a folder of
  `x.jpg` / `x.png` / `x.jpeg` + `x.txt` pairs.
- Pairs with a video instead of an image (a sample holding both uses the video):
  - tars: a video file member (`mp4`, `avi`, `webm`, `mkv` or `mov`: `x.mp4` + `x.txt`), or a `frames.npy` member
    (`x.frames.npy`: a (T, H, W, C) or (T, C, H, W) uint8 NumPy array), or numbered frame members `x.0.jpg`,
    `x.1.jpg`, ... (`png` / `jpeg` too; ordered by number);
  - JSONL: `{"video": path, "caption": text}`, the path of a video file (or of a `.npy` frame array), or
    `{"video": [frame paths in order], "caption": text}`;
  - folders: `x.mp4` (or another video extension above) + `x.txt`, or a subfolder `x/` of frame images (ordered by
    name, numbers compared as numbers) + `x.txt`.
- Interleaved: webdataset tars whose samples hold a `json` document: MMC4 (`text_list`, `image_info` with
  `image_base64`, `similarity_matrix`) or ChatGPT-generated (`is_gpt`, `example` with `_!_IMAGEk_!_` markers,
  `image_map`). An MMC4 `image_info` entry may hold a video instead: `video_base64` (a video file, base64) or
  `frames_base64` (a list of base64 frame images, in order); it takes its place in the text like an image.

Videos are decoded as the processor decodes them (`processing.media_inputs`): files through transformers'
`load_video` (PyAV, `pip install av`; containers must record their frame count, as AVI and most MP4 do), frame lists
and arrays as given; each is sampled uniformly to `num_frames` frames (the builders' argument, default
`processor.num_frames`), shorter videos keep all their frames.

Sampling, as the original recipe draws its data (open_flamingo 2.0.1 `train/data.py`), per epoch (`set_epoch`,
which `OpenFlamingoTrainer` calls on both streams at the start of every epoch, resumed runs included):

- By default the shard list is shuffled, seeded by `seed` and the epoch, so every epoch reads the shards in a new
  order and a run that reads only part of an epoch's data still reaches every shard over its epochs. (The original
  shuffled through a 2,000-shard buffer; `datasets` permutes the whole list, the same thing for up to 2,000 shards.)
  Every shard (tar, JSONL file or folder) is one `datasets` shard: the shuffled list is split over processes
  (`split_dataset_by_node`, which `OpenFlamingoTrainer` applies by shards) and then over DataLoader workers, so in
  an epoch no two readers read the same shard (with fewer shards than workers some workers get none; give at least
  `num_workers * world_size` shards for full parallelism).
- With `resampled=True` (the original's `--dataset_resampled`) every reader instead draws shards with replacement,
  forever, through webdataset's `ResampledShards`, seeded by `seed`, the epoch, the process and the worker.
- Samples are then shuffled through a buffer of `shuffle_buffer_size` samples (the original's 5,000; `datasets`
  fills the whole buffer before its first sample, where the original started after 1,000), read from one shard at
  a time as the original's readers did.
- `shuffle=False` reads the shards in the order given in epoch 0 and samples in shard order (tests, inspection).

Randomness inside a sample (horizontal flips, the single-image rule) comes from a generator seeded from `(seed, shard
file name)` for every pass over a shard, so results do not depend on the number of workers or processes; every pass
over a shard makes the same choices; build with another `seed` to change them. A flip mirrors every frame of every
media of the sample (so it mirrors motion too: left becomes right).

Skipped data: unreadable or truncated shards, corrupt tar members, undecodable images and videos, malformed JSON and
missing fields are skipped, never raised and never yielded. The documents that the recipe itself rejects (too few
images, the single-image rule, ...) are skipped the same way. Each is counted under a reason (the `*` constants
below), and each yielded sample carries under `SKIPPED_KEY` the counts skipped since the previous sample its worker
yielded (the last sample of a shard is held back until the shard ends, so that it also carries the shard's trailing
skips), so that the counts reach the main process through DataLoader workers; the collator sums them per batch.
Reasons starting with `image_` or `video_` count single media (`image_info` entries, images or videos) dropped from
MMC4 documents, not samples. Data errors (not recipe rejections) are also logged as warnings, the first few per
reason and process. What is not a data error is raised: a video met without a frame count, or without PyAV
(`VideoSetupError`), since every video would be lost.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import PIL.Image
import webdataset as wds
from transformers.utils import logging
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from ..processing.media_inputs import VideoFrames, load_video_input, uniform_frame_indices
from .collator import SKIPPED_KEY

if TYPE_CHECKING:
    from ..processing.processing_openflamingo import OpenFlamingoProcessor

logger = logging.get_logger(__name__)

Rng = np.random.Generator | random.Random

# --- Skip reasons (keys of the `skipped` counts) ----------------------------------------------------------------
# Data errors (also logged as warnings).
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened (missing file, permissions, not a tar at all)
TRUNCATED_TAR = "truncated_tar"  # ends in the middle of a member: the rest of the shard is lost
CORRUPT_TAR = "corrupt_tar"  # invalid tar / compression data: the rest of the shard is lost
DUPLICATE_MEMBER = "duplicate_member"  # two members with the same sample key and extension
TAR_ERROR = "tar_error"  # any other error while reading a tar
MISSING_FIELDS = "missing_fields"  # no image / caption / json member, or a required JSON key is missing
MALFORMED_FIELDS = "malformed_fields"  # a field has the wrong type or shape
BAD_JSON = "bad_json"  # a member / line that is not valid JSON
BAD_TEXT = "bad_text"  # a caption that is not UTF-8
UNDECODABLE_IMAGE = "undecodable_image"  # a pair's image (or a ChatGPT document's image) does not decode
UNDECODABLE_VIDEO = "undecodable_video"  # a pair's video (its file, frame array or a sampled frame) does not decode
MISSING_IMAGE_FILE = "missing_image_file"  # a JSONL line's image file cannot be read
MISSING_VIDEO_FILE = "missing_video_file"  # a JSONL line's video file (or one of its frame files) does not exist
IMAGE_UNDECODABLE = "image_undecodable"  # an MMC4 image that does not decode (the image is dropped)
VIDEO_UNDECODABLE = "video_undecodable"  # an MMC4 video that does not decode (the video is dropped)
PREPROCESS_ERROR = "preprocess_error"  # any other error while preprocessing a sample
# Recipe rejections (counted, not logged).
NO_IMAGES = "no_images"  # no image left after filtering
TOO_FEW_IMAGES = "too_few_images"  # fewer than `min_num_images` `<image>` tokens after truncation
SINGLE_IMAGE_DROPPED = "single_image_dropped"  # one image: dropped with probability 0.5
SINGLE_IMAGE_AT_END = "single_image_at_end"  # one image, and its `<image>` is the last token: no label to learn
# The `image_*` reasons count `image_info` entries, images and videos alike.
IMAGE_MISSING_BASE64 = "image_missing_base64"  # no `image_base64` / `video_base64` / `frames_base64` (dropped)
IMAGE_BELOW_THRESHOLD = "image_below_threshold"  # best sentence similarity below `sim_threshold` (dropped)
IMAGE_TOO_SMALL = "image_too_small"  # encoded image, video file or any frame of at most 10 KB (dropped)

_RECIPE_REASONS = frozenset(
    {NO_IMAGES, TOO_FEW_IMAGES, SINGLE_IMAGE_DROPPED, SINGLE_IMAGE_AT_END, IMAGE_MISSING_BASE64,
     IMAGE_BELOW_THRESHOLD, IMAGE_TOO_SMALL}
)
# Reasons that describe a whole shard: counted once per shard even when the tar reader reports them several times.
_SHARD_REASONS = frozenset({UNREADABLE_SHARD, TRUNCATED_TAR, CORRUPT_TAR, TAR_ERROR})

# MMC4: images whose encoded size is at most this many (decimal) kilobytes are dropped, as `len(bytes) // 1000 <= 10`
# in the original.
MIN_KB = 10
PAIR_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")
# Video containers that PyAV reads (through the processor and transformers' `load_video`), by file extension.
VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv", "mov")
# A tar member `x.frames.npy`: the frames of a video as one (T, H, W, C) / (T, C, H, W) uint8 array. Not a bare `npy`,
# which webdatasets also use for other arrays (e.g. embeddings) next to an image.
FRAMES_ARRAY_MEMBER = "frames.npy"
# Tar members `x.0.jpg`, `x.1.jpg`, ...: frame n of the sample's video (webdataset keys end at the first dot, so
# these are the extensions `0.jpg`, `1.jpg`, ... of sample `x`).
FRAME_MEMBER = re.compile(r"(\d+)\.(?:jpg|png|jpeg)")
# MMC4 `image_info` keys of one media, in the order they are looked for.
MMC4_MEDIA_KEYS = ("video_base64", "frames_base64", "image_base64")
# ChatGPT-generated documents mark images as `_!_IMAGE1_!_`, `_!_IMAGE2_!_`, ...
GPT_IMAGE_MARKER = re.compile(r"_!_IMAGE\d+_!_")

# The original's sample shuffle buffer (`wds.shuffle(5000, initial=1000)` in open_flamingo's `train/data.py`).
SAMPLE_SHUFFLE_BUFFER = 5000
# `resampled=True`: the data sources `datasets` shuffles per epoch and splits over processes and workers are these
# draw slots, not shards; each reader seeds its draws from the slots it is handed (see `_ShardReader.draws`). Enough
# slots for every (process, worker) pair of a large run to get its own.
RESAMPLED_DRAW_SLOTS = 4096
# A resampled reader that draws this many shards in a row (times the shard count) without one good sample stops with
# an error instead of drawing forever.
_EMPTY_DRAWS_PER_SHARD = 10

_WARNINGS_PER_REASON = 3
_warned: Counter = Counter()


class VideoSetupError(RuntimeError):
    """
    A video cannot be read because of how the run is set up (no frame count, no PyAV), not because of its data:
    raised rather than skipped, since every video of the shards would be lost.
    """


@dataclass(frozen=True)
class Video:
    """
    A video of a sample, as its shard holds it (decoded when the sample is preprocessed), in one of three forms:

    - `data`: the bytes of a video file, `extension` its format: a container (`mp4`, `avi`, ...; PyAV probes the
      content, the extension only names the temporary file) or `npy` / `frames.npy`, a NumPy (T, H, W, C) or
      (T, C, H, W) uint8 array of frames;
    - `path`: a video file on disk (a `.npy` path is a frame array, any other a container);
    - `frames`: the frames in order, each encoded image bytes, an image file path or a PIL image.
    """

    data: bytes | None = None
    extension: str = ""
    path: str | None = None
    frames: tuple[bytes | str | PIL.Image.Image, ...] | None = None

    def __post_init__(self):
        if sum(value is not None for value in (self.data, self.path, self.frames)) != 1:
            raise ValueError("A Video holds exactly one of `data` (file bytes), `path` or `frames`.")
        if self.frames is not None and not self.frames:
            raise ValueError("A Video's `frames` must hold at least one frame.")


Media = bytes | PIL.Image.Image | Video  # one media slot of a sample, undecoded: an image or a video


class SkipSample(Exception):
    """
    A sample that is not used. `reason` is one of this module's reason constants; `counts` holds further counts
    (images dropped from the document before it was rejected).
    """

    def __init__(self, reason: str, detail: str = "", counts: Mapping[str, int] | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.counts = dict(counts or {})


# ----------------------------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------------------------


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """
    The shard paths named by `spec`, in order, without duplicates.

    `spec` is a list of paths, or a string of paths separated by commas, whitespace or `::`. Each path may use brace
    notation (`shard-{0000..0099}.tar`, `{a,b}`) and glob patterns (`*`, `?`, `[...]`); list items are not split.
    URLs (`scheme://...`, `pipe:...`) are kept as they are; local paths must exist.

    Raises:
        FileNotFoundError: when `spec` names nothing, or some path or pattern matches no file (naming them).
    """
    items = _split_spec(spec) if isinstance(spec, str) else [str(item) for item in spec]
    shards, unmatched = [], []
    for item in items:
        for path in expand_urls(item):
            matches = _match_path(path)
            if not matches:
                unmatched.append(path)
            shards.extend(matches)
    if unmatched or not shards:
        shown = ", ".join(repr(path) for path in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise FileNotFoundError(
            f"The shard spec {spec!r} matches no files" + (f" (nothing matches {shown})" if unmatched else "") + "."
        )
    return list(dict.fromkeys(shards))


def _split_spec(spec: str) -> list[str]:
    """Splits a shard string on commas and whitespace outside braces (`{a,b}` is one brace expression)."""
    items, current, depth = [], [], 0
    for char in spec:
        depth += (char == "{") - (char == "}")
        if depth == 0 and (char == "," or char.isspace()):
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item for item in items if item]


def _match_path(path: str) -> list[str]:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:", path):
        return [path]
    if re.search(r"[*?[]", path):
        return sorted(glob.glob(path))
    return [path] if os.path.exists(path) else []


def shard_rng(seed: int, shard: str) -> np.random.Generator:
    """The random generator of one pass over `shard`: seeded from `seed` and the shard's file name."""
    name = os.path.basename(os.path.normpath(shard))
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing of one sample
# ----------------------------------------------------------------------------------------------------------------


def preprocess_pair(
    media: Media,
    caption: str,
    processor: OpenFlamingoProcessor,
    max_length: int = 32,
    rng: Rng | None = None,
    mask_eos: bool = False,
    *,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """
    One image-caption (or video-caption) pair as a training sample.

    The sample is `processor.pair_sample(media, caption, max_length)` (text `pair_text(caption)` with right padding
    to `max_length`, labels `pretraining_labels`); the image (every frame of the video) is flipped horizontally
    with probability 0.5 (one `rng.random()` draw). A video fills the one media slot as an image does: the model's
    text marks it with `<image>` too, so text and labels are those of an image pair; its frames are read by
    `processing.media_inputs.load_video_input`, as `processor(videos=..., num_frames=...)` reads them.

    Args:
        media: encoded image bytes, a PIL image or a `Video`.
        caption: the caption (protocol tokens written in it, e.g. `<image>`, are removed by the processor).
        processor: an `OpenFlamingoProcessor`.
        rng: numpy `Generator` or `random.Random`; `None` draws from a fresh, unseeded generator.
        mask_eos: passed to `pretraining_labels`.
        num_frames: frames sampled (uniformly) from a video; default `processor.num_frames`.
    Returns:
        `input_ids`, `attention_mask`, `labels` (max_length,); `pixel_values` (1, T, 3, H, W) (T = 1 for an image,
        the sampled frame count for a video); `frame_mask` (1, T) (all True) when T > 1; `skipped` ({}).
    Raises:
        SkipSample: `undecodable_image` / `undecodable_video` when the media does not decode.
        VideoSetupError: a video, but no frame count (`num_frames` and `processor.num_frames` are None) or no PyAV.
    """
    rng = np.random.default_rng() if rng is None else rng
    decoded = _decode_media(media, processor, num_frames, UNDECODABLE_IMAGE, UNDECODABLE_VIDEO)
    flip = _coin(rng)
    return _training_sample(processor.pair_sample(decoded, caption, max_length, mask_eos=mask_eos), flip, {})


def preprocess_interleaved(
    document: Mapping[str, Any],
    processor: OpenFlamingoProcessor,
    sim_threshold: float = 0.24,
    min_num_images: int = 1,
    max_num_images: int = 6,
    max_length: int = 256,
    rng: Rng | None = None,
    mask_eos: bool = False,
    *,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """
    One interleaved document (a parsed MMC4 or ChatGPT-generated json) as a training sample.

    MMC4 (`text_list`, `image_info`, `similarity_matrix` with one row per `image_info` entry and one column per
    sentence): each image goes before the sentence of its row's maximum (several images may pick the same sentence)
    and is dropped when it has no `image_base64`, when that similarity is below `sim_threshold`, when its decoded
    bytes are at most 10 KB, or when it does not decode. The kept images are ordered by sentence (stably) and the
    first `max_num_images` are used. After tokenization (right padding to `max_length`, truncation), `num_images`
    is the number of `<image>` tokens left; the document is rejected when it is below `min_num_images`, with
    probability 0.5 when it is 1, and when it is 1 and the last token is `<image>`.

    An `image_info` entry may be a video instead (`video_base64`: a video file; `frames_base64`: frame images): it
    is one media slot, under the same rules as an image (its `<image>` marker, the threshold, the 10 KB rule on the
    file or on every frame, dropping when it does not decode, `max_num_images` and `min_num_images` counting it),
    its frames sampled uniformly to `num_frames` (default `processor.num_frames`) as the processor samples them.

    ChatGPT documents (`is_gpt`): see `_preprocess_gpt_document`.

    Random draws from `rng`: one for the flip (shared by all images and frames of the sample), then one for the
    single-image rule when it applies.

    Returns:
        `input_ids`, `attention_mask`, `labels` (max_length,) (labels: `pretraining_labels(..., interleaved=True)`);
        `pixel_values` (num_images, T, 3, H, W), the media the text uses, in text order (the collator pads; T is
        the most frames of one media, 1 without videos); `frame_mask` (num_images, T) when T > 1 (an image has one
        real frame); `skipped`: counts of the media dropped (`image_*` / `video_*` reasons).
    Raises:
        SkipSample: the document is not used (its `reason` says why; its `counts` hold the dropped media).
        VideoSetupError: a video, but no frame count or no PyAV (see `preprocess_pair`).
    """
    rng = np.random.default_rng() if rng is None else rng
    if "is_gpt" in document:
        return _preprocess_gpt_document(document, processor, min_num_images, max_num_images, max_length, rng,
                                        mask_eos)
    sentences, image_info, similarities = _mmc4_fields(document)
    dropped: Counter = Counter()
    candidates = _mmc4_candidates(image_info, similarities, sim_threshold, dropped)
    # The text gets the markers in sentence order, so the images must be in that order too: the k-th `<image>` in
    # the text is the k-th image. (The original kept them in `image_info` order, which pairs markers and images
    # wrongly whenever the two orders differ.) `sorted` is stable: images on one sentence keep their order.
    candidates.sort(key=lambda candidate: candidate[0])
    kept = []  # (sentence index, PIL image or video frames), at most max_num_images
    for sentence, media in candidates:
        if len(kept) == max_num_images:
            break
        try:
            kept.append((sentence, _decode_media(media, processor, num_frames, IMAGE_UNDECODABLE, VIDEO_UNDECODABLE)))
        except SkipSample as skipped:
            dropped[skipped.reason] += 1
    if not kept:
        raise SkipSample(NO_IMAGES, counts=dropped)

    flip = _coin(rng)
    sample = processor.interleaved_sample([media for _, media in kept], sentences,
                                          [sentence for sentence, _ in kept], max_length, mask_eos=mask_eos)
    # The processor lays out the media whose `<image>` markers truncation left.
    num_images = len(sample["pixel_values"])
    if num_images < max(min_num_images, 1):
        raise SkipSample(TOO_FEW_IMAGES, f"{num_images} image(s) after truncation", dropped)
    if num_images == 1 and _coin(rng):
        raise SkipSample(SINGLE_IMAGE_DROPPED, counts=dropped)
    if num_images == 1 and int(sample["input_ids"][-1]) == processor.image_token_id:
        raise SkipSample(SINGLE_IMAGE_AT_END, counts=dropped)
    # Only the media the text uses: the collator pads each batch to its longest row (the original padded every
    # document to max_num_images; the model refuses image slots that no <image> token of the batch refers to).
    return _training_sample(sample, flip, dropped)


def _mmc4_candidates(
    image_info: list[Mapping], similarities: list[np.ndarray], sim_threshold: float, dropped: Counter
) -> list[tuple[int, Media]]:
    """
    The `image_info` entries that pass the recipe's filters, as (sentence index, undecoded media), in `image_info`
    order; the others are counted in `dropped`.
    """
    candidates = []
    for info, row in zip(image_info, similarities):
        sentence = int(np.argmax(row))
        key = next((key for key in MMC4_MEDIA_KEYS if key in info), None)
        if key is None:
            dropped[IMAGE_MISSING_BASE64] += 1
        elif row[sentence] < sim_threshold:
            dropped[IMAGE_BELOW_THRESHOLD] += 1
        else:
            try:
                media = _mmc4_media(info[key], key)
            except SkipSample as skipped:
                dropped[skipped.reason] += 1
                continue
            if _encoded_kb(media) <= MIN_KB:
                dropped[IMAGE_TOO_SMALL] += 1
            else:
                candidates.append((sentence, media))
    return candidates


def _mmc4_media(value: Any, key: str) -> Media:
    """The media of one `image_info` entry: image bytes (`image_base64`) or a `Video` (the other keys)."""
    reason = IMAGE_UNDECODABLE if key == "image_base64" else VIDEO_UNDECODABLE
    if key == "frames_base64":
        if not isinstance(value, list) or not value:
            raise SkipSample(reason, "'frames_base64' must be a non-empty list of base64 images")
        return Video(frames=tuple(_b64decode(frame, reason) for frame in value))
    encoded = _b64decode(value, reason)
    return encoded if key == "image_base64" else Video(data=encoded, extension="video")


def _b64decode(value: Any, reason: str) -> bytes:
    try:
        return base64.b64decode(value)
    except (binascii.Error, TypeError, ValueError) as error:
        raise SkipSample(reason, f"not base64: {error}") from None


def _encoded_kb(media: Media) -> int:
    """Encoded size in (decimal) kilobytes, as the 10 KB rule measures it: a video file's, or its smallest frame's."""
    if isinstance(media, bytes):
        return len(media) // 1000
    if media.frames is not None:
        return min(len(frame) for frame in media.frames) // 1000
    return len(media.data) // 1000


def _preprocess_gpt_document(
    document: Mapping[str, Any],
    processor: OpenFlamingoProcessor,
    min_num_images: int,
    max_num_images: int,
    max_length: int,
    rng: Rng,
    mask_eos: bool,
) -> dict[str, Any]:
    """
    A ChatGPT-generated document: `example` is text with `_!_IMAGEk_!_` markers, the image of a marker is
    `image_map[marker]["base64_image"]`. Each marker starts a new chunk with its image; the text is built by
    `processor.interleaved_sample` from the text between markers, which gives the original's string (markers
    replaced by `<|endofchunk|><image>`, first `<|endofchunk|>` dropped, one space on each side of a marker
    removed, `<|endofchunk|>{eos}` appended). The first `max_num_images` markers are used (the original kept one
    fewer, and closed the cut text with a second `<|endofchunk|>`). No similarity or size filtering; a missing
    image rejects the document (`missing_fields`), as does an undecodable one (`undecodable_image`), since its
    marker would point at the wrong image; fewer than `min_num_images` `<image>` tokens after truncation too.
    """
    example, image_map = document.get("example"), document.get("image_map")
    if example is None or image_map is None:
        raise SkipSample(MISSING_FIELDS, "a ChatGPT document needs 'example' and 'image_map'")
    if not isinstance(example, str) or not isinstance(image_map, Mapping):
        raise SkipSample(MALFORMED_FIELDS, "'example' must be a string and 'image_map' an object")
    markers = GPT_IMAGE_MARKER.findall(example)
    parts = GPT_IMAGE_MARKER.split(example)  # parts[k] is the text before markers[k]; parts[-1] after the last
    num_used = min(len(markers), max_num_images)
    images = [_to_rgb(_gpt_image_bytes(image_map, marker), UNDECODABLE_IMAGE) for marker in markers[:num_used]]
    if not images:
        raise SkipSample(NO_IMAGES)
    # The original removed one space before each marker (`" <|endofchunk|>"` and `" <image>"` cleanups);
    # `interleaved_text` joins sentences with one space and removes that one, so drop the original one here.
    sentences = [_drop_one_trailing_space(part) if k < len(markers) else part for k, part in
                 enumerate(parts[: num_used + 1])]
    flip = _coin(rng)
    sample = processor.interleaved_sample(images, sentences, list(range(1, num_used + 1)), max_length,
                                          mask_eos=mask_eos)
    num_images = len(sample["pixel_values"])
    if num_images < max(min_num_images, 1):
        raise SkipSample(TOO_FEW_IMAGES, f"{num_images} image(s) after truncation")
    return _training_sample(sample, flip, Counter())


def _gpt_image_bytes(image_map: Mapping[str, Any], marker: str) -> bytes:
    entry = image_map.get(marker)
    if not isinstance(entry, Mapping) or "base64_image" not in entry:
        raise SkipSample(MISSING_FIELDS, f"no 'base64_image' for {marker} in 'image_map'")
    try:
        return base64.b64decode(entry["base64_image"])
    except (binascii.Error, TypeError, ValueError) as error:
        raise SkipSample(UNDECODABLE_IMAGE, f"{marker}: {error}") from None


def _drop_one_trailing_space(text: str) -> str:
    return text.removesuffix(" ")


def _mmc4_fields(document: Mapping[str, Any]) -> tuple[list[str], list[Mapping], list[np.ndarray]]:
    """`text_list`, `image_info` and the similarity rows, checked."""
    missing = [key for key in ("text_list", "image_info", "similarity_matrix") if key not in document]
    if missing:
        raise SkipSample(MISSING_FIELDS, f"missing {missing}")
    sentences, image_info, matrix = document["text_list"], document["image_info"], document["similarity_matrix"]
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise SkipSample(MALFORMED_FIELDS, "'text_list' must be a non-empty list of strings")
    if not isinstance(image_info, list) or not all(isinstance(info, Mapping) for info in image_info):
        raise SkipSample(MALFORMED_FIELDS, "'image_info' must be a list of objects")
    try:
        if not isinstance(matrix, list):
            raise TypeError
        rows = [np.asarray(row, dtype=np.float64) for row in matrix]
    except (TypeError, ValueError):
        raise SkipSample(MALFORMED_FIELDS, "'similarity_matrix' must be a list of number lists") from None
    if len(rows) != len(image_info) or any(row.shape != (len(sentences),) or not np.isfinite(row).all()
                                           for row in rows):
        raise SkipSample(
            MALFORMED_FIELDS,
            f"'similarity_matrix' must have one row per image ({len(image_info)}) and one finite number per "
            f"sentence ({len(sentences)})",
        )
    return sentences, image_info, rows


def _training_sample(sample: Mapping[str, Any], flip: bool, skipped: Mapping[str, int]) -> dict[str, Any]:
    """
    The processor's sample as the dataset's dict, with the skip counts; all its pixels flipped horizontally (every
    frame of every media) when `flip`.
    """
    sample = dict(sample)
    if flip:
        sample["pixel_values"] = sample["pixel_values"].flip(-1)
    sample[SKIPPED_KEY] = dict(skipped)
    return sample


def _to_rgb(image: bytes | PIL.Image.Image, reason: str) -> PIL.Image.Image:
    """An RGB PIL image from encoded bytes or a PIL image; `SkipSample(reason)` when the bytes do not decode."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    try:
        with PIL.Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")  # decodes the whole image
    except Exception as error:  # noqa: BLE001 (PIL raises many types for corrupt data: OSError, SyntaxError, ...)
        raise SkipSample(reason, f"{type(error).__name__}: {error}") from None


def _coin(rng: Rng) -> bool:
    """True with probability 0.5: one `rng.random()` draw below 0.5."""
    return rng.random() < 0.5


# --- Videos: read by `processing.media_inputs`, which owns reading files, frame layouts and uniform sampling ---


def _decode_media(
    media: Media, processor: OpenFlamingoProcessor, num_frames: int | None, image_reason: str, video_reason: str
) -> PIL.Image.Image | VideoFrames:
    """An RGB PIL image, or a video's frames; `SkipSample(image_reason / video_reason)`."""
    if isinstance(media, Video):
        return _video_frames(media, processor, num_frames, video_reason)
    return _to_rgb(media, image_reason)


def _video_frames(video: Video, processor: OpenFlamingoProcessor, num_frames: int | None, reason: str) -> VideoFrames:
    """
    The frames of one video, T = min(num_frames, the video's frames), as `processor(videos=..., num_frames=num_frames)`
    reads them.

    Raises:
        SkipSample(reason): the video (or a sampled frame) does not decode.
        VideoSetupError: no frame count (`num_frames` and `processor.num_frames` are None), or no PyAV.
    """
    num_frames = processor.num_frames if num_frames is None else num_frames
    if num_frames is None:
        raise VideoSetupError(
            "The shards hold a video but no frame count is set: pass num_frames=N to build_pair_dataset / "
            "build_interleaved_dataset (openflamingo-train --num_frames N) or set processor.num_frames. Use the "
            "model's config.perceiver_max_num_frames, or for a model without frame embeddings the frames to "
            "flatten into one media slot."
        )
    try:
        with _video_source(video, num_frames, reason) as source:
            return load_video_input(source, num_frames, "Sample 0, video 0")
    except ImportError as error:
        raise VideoSetupError(f"Reading the shards' video files needs PyAV: `pip install av` ({error}).") from error
    except (ValueError, TypeError) as error:  # the errors for videos that cannot be read
        raise SkipSample(reason, str(error)) from None


@contextlib.contextmanager
def _video_source(video: Video, num_frames: int, reason: str) -> Iterator[str | np.ndarray | list]:
    """
    What `load_video_input` takes for `video`: a file path (a temporary file for bytes, since transformers'
    `load_video` reads paths and URLs only; removed afterwards), a frame array, or decoded frames.
    """
    extension = video.extension or os.path.splitext(video.path or "")[1][1:]
    if extension.endswith("npy"):
        yield _frame_array(video, reason)
    elif video.frames is not None:
        # Decode only the frames that the processor's sampling keeps (it then keeps all of these).
        indices = uniform_frame_indices(len(video.frames), num_frames)
        yield [_to_rgb(_read_frame(video.frames[int(index)], reason), reason) for index in indices]
    elif video.path is not None:
        yield video.path
    else:
        with tempfile.NamedTemporaryFile(suffix=f".{extension or 'video'}") as file:
            file.write(video.data)
            file.flush()
            yield file.name


def _frame_array(video: Video, reason: str) -> np.ndarray:
    """The frames of a `.npy` video, (T, H, W, C) or (T, C, H, W) as stored (the processor samples and checks them)."""
    try:
        return np.load(video.path if video.path is not None else io.BytesIO(video.data), allow_pickle=False)
    except Exception as error:  # noqa: BLE001 (numpy raises ValueError, OSError, EOFError, ... for non-.npy data)
        raise SkipSample(reason, f"not a .npy frame array ({type(error).__name__}: {error})") from None


def _read_frame(frame: bytes | str | PIL.Image.Image, reason: str) -> bytes | PIL.Image.Image:
    """A frame's encoded bytes (read from its file when it is a path) or PIL image."""
    if not isinstance(frame, str):
        return frame
    try:
        with open(frame, "rb") as file:
            return file.read()
    except OSError as error:
        raise SkipSample(reason, str(error)) from None


# ----------------------------------------------------------------------------------------------------------------
# Reading shards
# ----------------------------------------------------------------------------------------------------------------


def _warn(reason: str, where: str, detail: str = "") -> None:
    """Logs a skipped shard / member, the first few times per reason in this process."""
    if reason in _RECIPE_REASONS:
        return
    _warned[reason] += 1
    if _warned[reason] <= _WARNINGS_PER_REASON:
        more = " (further such warnings are not shown)" if _warned[reason] == _WARNINGS_PER_REASON else ""
        logger.warning(f"Skipped {where} ({reason}{': ' + detail if detail else ''}){more}.")


def _tar_error_reason(error: Exception) -> str:
    text = str(error.args[0]) if error.args else ""
    if isinstance(error, EOFError) or (isinstance(error, tarfile.ReadError) and "unexpected end" in text):
        return TRUNCATED_TAR
    if isinstance(error, (tarfile.TarError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)):
        return CORRUPT_TAR
    if isinstance(error, OSError):
        return UNREADABLE_SHARD
    if isinstance(error, ValueError) and "duplicate file name" in text:
        return DUPLICATE_MEMBER
    return TAR_ERROR


class _ShardReader:
    """
    The generator behind the datasets: `datasets` calls it with the shards (or draw slots) of one reader, in the
    process (DataLoader worker) that reads them.

    Read errors and rejected samples are counted in `_pending`. `with_counts`, mapped over the stream after its
    shuffle buffer in the same process, hands each sample that leaves the stream the counts gathered since the
    previous one left: counts reach the trainer with the next batch, however long a sample stays in the buffer, and
    so does a shard that yields nothing. A sample is yielded when the next good sample is found or its shard ends, so
    that a shard's trailing skips are counted before its last sample leaves.
    """

    def __init__(self, preprocess, seed: int, resample_from: list[str] | None = None):
        self.preprocess = preprocess  # (record, rng) -> sample, may raise SkipSample
        self.seed = seed
        self.resample_from = resample_from  # the shards to draw from with replacement; None: read the given shards
        self._pending: Counter = Counter()

    def records(self, shard: str) -> Iterator[Any]:
        raise NotImplementedError

    def skip(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        self._pending[reason] += count
        _warn(reason, where, detail)

    def add_counts(self, counts: Mapping[str, int], where: str) -> None:
        for reason, count in counts.items():
            self.skip(reason, where, count=count)

    def __call__(self, sources: list) -> Iterator[dict[str, Any]]:
        """The samples of `sources`: shard paths, or with `resample_from` draw slots (see `draws`)."""
        if self.resample_from is None:
            yield from self.read(sources)
            return
        empty_draws = 0
        for shard in self.draws(sources):
            found = False
            for sample in self.read([shard]):
                found = True
                yield sample
            empty_draws = 0 if found else empty_draws + 1
            if empty_draws > _EMPTY_DRAWS_PER_SHARD * len(self.resample_from):
                raise RuntimeError(
                    f"{empty_draws} shards drawn in a row from {len(self.resample_from)} yielded no sample: every "
                    f"shard seems to be unreadable or empty (skipped so far: {dict(self._pending)}). Check the shard "
                    "paths and contents."
                )

    def draws(self, slots: list[int]) -> Iterator[str]:
        """
        Shards drawn with replacement, forever, by webdataset's `ResampledShards`. Its seed comes from `seed` and the
        draw slots this reader was handed: `datasets` shuffles the slots with the stream's seed and again per epoch,
        and splits them over processes and workers like shards, so every (seed, epoch, process, worker) draws its own
        reproducible sequence, as the original's per-worker, per-epoch seeds did.
        """
        slot_seed = wds.utils.make_seed(*slots)
        shards = wds.ResampledShards(self.resample_from, seed=self.seed, worker_seed=lambda: slot_seed,
                                     deterministic=True)
        for entry in shards:
            yield entry["url"]

    def read(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            rng = shard_rng(self.seed, shard)
            held = None
            for where, record in self.records(shard):
                try:
                    sample = self.preprocess(record, rng)
                except SkipSample as skipped:
                    self.skip(skipped.reason, where, skipped.detail)
                    self.add_counts(skipped.counts, where)
                    continue
                except VideoSetupError:
                    raise  # the run's setup, not this sample: every video would be skipped
                except Exception as error:  # noqa: BLE001 (e.g. an image the image processor cannot handle)
                    self.skip(PREPROCESS_ERROR, where, f"{type(error).__name__}: {error}")
                    continue
                self.add_counts(sample.pop(SKIPPED_KEY, {}), where)
                if held is not None:
                    yield held
                held = sample
            if held is not None:
                yield held

    def with_counts(self, sample: dict[str, Any]) -> dict[str, Any]:
        """`sample` with the skip counts gathered since the previous sample left the stream (`SKIPPED_KEY`)."""
        sample[SKIPPED_KEY] = dict(self._pending)
        self._pending.clear()
        return sample


class _TarReader(_ShardReader):
    """Reads webdataset tars with webdataset's tar iteration; its handler counts errors instead of raising."""

    def tar_samples(self, shard: str) -> Iterator[dict[str, Any]]:
        shard_errors = set()  # a truncated tar is reported twice (in the member, then at the next header)

        def handler(error: Exception) -> bool:
            reason = _tar_error_reason(error)
            if reason in _SHARD_REASONS:
                if reason in shard_errors:
                    return True
                shard_errors.add(reason)
            self.skip(reason, f"shard {shard}", f"{type(error).__name__}: {error.args[0] if error.args else ''}")
            return True

        streams = url_opener([{"url": shard}], handler=handler)
        yield from group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)
        if not shard_errors and _tar_stops_early(shard):
            self.skip(CORRUPT_TAR, f"shard {shard}", "a corrupt member header ended the archive early")


def _tar_stops_early(path: str) -> bool:
    """
    Whether a local, uncompressed tar has data after the point where reading it stops. Python's `tarfile` ends the
    archive silently at a corrupt header in the middle, losing the rest of the shard without an error.
    """
    if not os.path.isfile(path):
        return False
    try:
        with tarfile.open(path, "r:") as archive:
            end = 0
            for member in archive:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        with open(path, "rb") as file:
            file.seek(end)
            while chunk := file.read(1 << 16):
                if chunk.strip(b"\0"):
                    return True
    except (tarfile.TarError, OSError):
        return False  # compressed, or already reported by the main pass
    return False


class _PairReader(_TarReader):
    """Image- or video-caption pairs from tars, JSONL files and folders (chosen per shard)."""

    def records(self, shard: str) -> Iterator[tuple[str, tuple[Media, str]]]:
        if os.path.isdir(shard):
            return self._folder_records(shard)
        if shard.endswith(".jsonl"):
            return self._jsonl_records(shard)
        return self._tar_records(shard)

    def _tar_records(self, shard: str):
        for sample in self.tar_samples(shard):
            where = f"sample {sample.get('__key__')!r} of {shard}"
            media = _tar_media(sample)
            if media is None or "txt" not in sample:
                videos = f"{'/'.join(VIDEO_EXTENSIONS)}, {FRAMES_ARRAY_MEMBER} or frames 0.jpg, 1.jpg, ..."
                self.skip(MISSING_FIELDS, where,
                          f"needs an image ({'/'.join(PAIR_IMAGE_EXTENSIONS)}) or a video ({videos}), and a txt")
                continue
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as error:
                self.skip(BAD_TEXT, where, str(error))
                continue
            yield where, (media, caption)

    def _jsonl_records(self, shard: str):
        folder = os.path.dirname(shard)
        try:
            file = open(shard, "rb")  # noqa: SIM115 (closed by the `with` below; an error here is a skip)
        except OSError as error:
            self.skip(UNREADABLE_SHARD, f"shard {shard}", str(error))
            return
        with file:
            for line_number, line in enumerate(file, start=1):
                where = f"line {line_number} of {shard}"
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError as error:
                    self.skip(BAD_JSON, where, str(error))
                    continue
                try:
                    media = _jsonl_media(entry, folder)
                except SkipSample as skipped:
                    self.skip(skipped.reason, where, skipped.detail)
                    continue
                yield where, (media, entry["caption"])

    def _folder_records(self, shard: str):
        try:
            names = sorted(os.listdir(shard))
        except OSError as error:
            self.skip(UNREADABLE_SHARD, f"shard {shard}", str(error))
            return
        for stem, files in _folder_groups(shard, names).items():
            where = f"{stem!r} in {shard}"
            media = _folder_media(files)
            if media is None or "txt" not in files:
                self.skip(MISSING_FIELDS, where, "needs an image, a video file or a folder of frames, and a .txt file")
                continue
            try:
                if isinstance(media, str):  # an image file: read here, as JSONL images are
                    with open(media, "rb") as image_file:
                        media = image_file.read()
                with open(files["txt"], "rb") as text_file:
                    caption = text_file.read().decode("utf-8")
            except (OSError, UnicodeDecodeError) as error:
                self.skip(BAD_TEXT if isinstance(error, UnicodeDecodeError) else MISSING_IMAGE_FILE, where, str(error))
                continue
            yield where, (media, caption)


def _tar_media(sample: Mapping[str, Any]) -> Media | None:
    """
    The media of a pair tar sample, looked for in this order: a video file member (`mp4`, ..., `frames.npy`),
    numbered frame members (`0.jpg`, `1.jpg`, ...), an image (`jpg`, `png`, `jpeg`); None when there is none.
    """
    extension = next((ext for ext in (*VIDEO_EXTENSIONS, FRAMES_ARRAY_MEMBER) if ext in sample), None)
    if extension is not None:
        return Video(data=sample[extension], extension=extension)
    frames = sorted((int(match.group(1)), key) for key in sample if (match := FRAME_MEMBER.fullmatch(key)))
    if frames:
        return Video(frames=tuple(sample[key] for _, key in frames))
    extension = next((ext for ext in PAIR_IMAGE_EXTENSIONS if ext in sample), None)
    return None if extension is None else sample[extension]


def _jsonl_media(entry: Any, folder: str) -> Media:
    """
    The media of a JSONL pair line (`video` when it has one, else `image`; paths relative to `folder`): image bytes
    or a `Video`. Raises `SkipSample` (missing / malformed fields, missing files).
    """
    if not isinstance(entry, dict) or "caption" not in entry or not ("image" in entry or "video" in entry):
        raise SkipSample(MISSING_FIELDS, "needs 'caption' and 'image' or 'video'")
    if not isinstance(entry["caption"], str):
        raise SkipSample(MALFORMED_FIELDS, "'caption' must be a string")
    if "video" in entry:
        return _jsonl_video(entry["video"], folder)
    if not isinstance(entry["image"], str):
        raise SkipSample(MALFORMED_FIELDS, "'image' must be a string")
    try:
        with open(os.path.join(folder, entry["image"]), "rb") as image_file:
            return image_file.read()
    except OSError as error:
        raise SkipSample(MISSING_IMAGE_FILE, str(error)) from None


def _jsonl_video(value: Any, folder: str) -> Video:
    """A JSONL `video`: a video file path, or a list of frame paths. Files are checked here, read when decoded."""
    is_path_list = isinstance(value, list) and value and all(isinstance(path, str) for path in value)
    if not isinstance(value, str) and not is_path_list:
        raise SkipSample(MALFORMED_FIELDS, "'video' must be a video file path or a non-empty list of frame paths")
    paths = [os.path.join(folder, path) for path in ([value] if isinstance(value, str) else value)]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise SkipSample(MISSING_VIDEO_FILE, f"no such file: {missing[0]}" + (" ..." if len(missing) > 1 else ""))
    return Video(path=paths[0]) if isinstance(value, str) else Video(frames=tuple(paths))


def _folder_groups(shard: str, names: list[str]) -> dict[str, dict[str, str]]:
    """
    A pair folder's files by stem: `{"x": {"png": path, "txt": path, ...}}`; a subfolder `x/` that holds images is
    `{"x": {"frames": path}}`. Other files are ignored.
    """
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        path = os.path.join(shard, name)
        if os.path.isdir(path):
            if _frame_files(path):
                groups.setdefault(name, {}).setdefault("frames", path)
            continue
        stem, extension = os.path.splitext(name)
        extension = extension[1:].lower()
        if extension in (*PAIR_IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS, "txt"):
            groups.setdefault(stem, {}).setdefault(extension, path)
    return groups


def _folder_media(files: Mapping[str, str]) -> str | Video | None:
    """A folder pair's media: a `Video` (a video file, else a frames subfolder), else an image file path."""
    extension = next((ext for ext in VIDEO_EXTENSIONS if ext in files), None)
    if extension is not None:
        return Video(path=files[extension])
    if "frames" in files:
        return Video(frames=tuple(_frame_files(files["frames"])))
    extension = next((ext for ext in PAIR_IMAGE_EXTENSIONS if ext in files), None)
    return None if extension is None else files[extension]


def _frame_files(folder: str) -> list[str]:
    """The image files of a frames folder, in frame order: by name, numbers compared as numbers (`2.png` < `10.png`)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    names = [name for name in names if os.path.splitext(name)[1][1:].lower() in PAIR_IMAGE_EXTENSIONS]
    return [os.path.join(folder, name) for name in sorted(names, key=_natural_key)]


def _natural_key(name: str) -> list[str | int]:
    # `re.split` with a group alternates text and digit runs, so keys compare text with text and numbers with numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _InterleavedReader(_TarReader):
    """Interleaved documents: the `json` member of each tar sample."""

    def records(self, shard: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for sample in self.tar_samples(shard):
            where = f"sample {sample.get('__key__')!r} of {shard}"
            if "json" not in sample:
                self.skip(MISSING_FIELDS, where, "no json member")
                continue
            try:
                document = json.loads(sample["json"])
            except ValueError as error:
                self.skip(BAD_JSON, where, str(error))
                continue
            if not isinstance(document, dict):
                self.skip(MALFORMED_FIELDS, where, "the json is not an object")
                continue
            yield where, document


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def build_pair_dataset(
    shards: str | Sequence[str],
    processor: OpenFlamingoProcessor,
    max_length: int = 32,
    seed: int = 0,
    *,
    mask_eos: bool = False,
    shuffle: bool = True,
    shuffle_buffer_size: int = SAMPLE_SHUFFLE_BUFFER,
    resampled: bool = False,
    repeat: bool = False,
    num_frames: int | None = None,
) -> datasets.IterableDataset:
    """
    Image-caption and video-caption pairs (see `preprocess_pair`) from webdataset tars (`jpg`/`png`/`jpeg`, or a
    video: `mp4`/`avi`/`webm`/`mkv`/`mov`, `frames.npy` or frames `0.jpg`, `1.jpg`, ...; and `txt`; other samples
    are skipped), JSONL files (`.jsonl`: `{"image": path, "caption": ...}` or `{"video": path or [frame paths],
    "caption": ...}` per line, paths relative to the file's folder) and folders (`x.jpg`, `x.mp4` or a frames
    subfolder `x/`, + `x.txt`), one `datasets` shard per tar / file / folder. See the module docstring.

    Args:
        shards: shard spec, see `expand_shards`.
        processor: an `OpenFlamingoProcessor`.
        max_length: tokens per sample (the original used 32).
        seed: seeds the flips (per shard, see the module docstring) and the sampling.
        mask_eos: passed to `processor.pretraining_labels`.
        shuffle, shuffle_buffer_size, resampled, repeat: how the stream is drawn, see `sample_stream`.
        num_frames: frames sampled uniformly from each video (shorter ones keep all theirs); default
            `processor.num_frames`. Needed (here or there) when the shards hold videos.
    Returns:
        `datasets.IterableDataset` of dicts with `input_ids`, `attention_mask`, `labels`, `pixel_values`,
        `frame_mask` (videos of several frames), `skipped`.
    """
    _check_num_frames(num_frames)
    preprocess = functools.partial(_preprocess_pair_record, processor=processor, max_length=max_length,
                                   mask_eos=mask_eos, num_frames=num_frames)
    return _build(_PairReader, preprocess, expand_shards(shards), seed=seed, shuffle=shuffle,
                  shuffle_buffer_size=shuffle_buffer_size, resampled=resampled, repeat=repeat)


def build_interleaved_dataset(
    shards: str | Sequence[str],
    processor: OpenFlamingoProcessor,
    sim_threshold: float = 0.24,
    min_num_images: int = 1,
    max_num_images: int = 6,
    max_length: int = 256,
    seed: int = 0,
    mask_eos: bool = False,
    *,
    shuffle: bool = True,
    shuffle_buffer_size: int = SAMPLE_SHUFFLE_BUFFER,
    resampled: bool = False,
    repeat: bool = False,
    num_frames: int | None = None,
) -> datasets.IterableDataset:
    """
    Interleaved documents (see `preprocess_interleaved`) from webdataset tars of `json` samples (MMC4, whose
    `image_info` entries may be videos: `video_base64` / `frames_base64`; or ChatGPT-generated), one `datasets`
    shard per tar.

    Args:
        shards: shard spec, see `expand_shards`.
        processor: an `OpenFlamingoProcessor`.
        sim_threshold, min_num_images, max_num_images, max_length, mask_eos: see `preprocess_interleaved`.
        seed: seeds the flips and the single-image rule (per shard, see the module docstring) and the sampling.
        shuffle, shuffle_buffer_size, resampled, repeat: how the stream is drawn, see `sample_stream`.
        num_frames: frames sampled uniformly from each video; default `processor.num_frames` (see
            `build_pair_dataset`).
    Returns:
        `datasets.IterableDataset` of dicts with `input_ids`, `attention_mask`, `labels`, `pixel_values`
        (num_images, T, 3, H, W) (the media the text uses; T = 1 without videos), `frame_mask` (with videos of
        several frames), `skipped`.
    """
    _check_num_frames(num_frames)
    preprocess = functools.partial(
        _preprocess_document_record, processor=processor, sim_threshold=sim_threshold, min_num_images=min_num_images,
        max_num_images=max_num_images, max_length=max_length, mask_eos=mask_eos, num_frames=num_frames,
    )
    return _build(_InterleavedReader, preprocess, expand_shards(shards), seed=seed, shuffle=shuffle,
                  shuffle_buffer_size=shuffle_buffer_size, resampled=resampled, repeat=repeat)


def _check_num_frames(num_frames: int | None) -> None:
    if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive integer (frames per video) or None, got {num_frames!r}.")


def _preprocess_pair_record(record: tuple[Media, str], rng: Rng, **kwargs) -> dict[str, Any]:
    media, caption = record
    return preprocess_pair(media, caption, rng=rng, **kwargs)


def _preprocess_document_record(record: dict[str, Any], rng: Rng, **kwargs) -> dict[str, Any]:
    return preprocess_interleaved(record, rng=rng, **kwargs)


def _build(reader_class: type[_ShardReader], preprocess, shards: list[str], *, seed: int, shuffle: bool,
           shuffle_buffer_size: int, resampled: bool, repeat: bool) -> datasets.IterableDataset:
    if resampled:
        reader = reader_class(preprocess, seed, resample_from=shards)
        sources = list(range(RESAMPLED_DRAW_SLOTS))
    else:
        reader = reader_class(preprocess, seed)
        sources = shards
    # `datasets` treats every list in `gen_kwargs` as data sources: it shuffles them and splits them over processes
    # and DataLoader workers.
    dataset = datasets.IterableDataset.from_generator(reader, gen_kwargs={"sources": sources})
    dataset = sample_stream(dataset, seed=seed, shuffle=shuffle, shuffle_buffer_size=shuffle_buffer_size,
                            repeat=repeat and not resampled)
    # After the buffer, in the reader's own process (DataLoader workers get one copy of both): see `_ShardReader`.
    return dataset.map(reader.with_counts)


def sample_stream(
    dataset: datasets.IterableDataset,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer_size: int = SAMPLE_SHUFFLE_BUFFER,
    repeat: bool = False,
) -> datasets.IterableDataset:
    """
    How a pretraining stream is drawn, as the original recipe draws it (see the module docstring).

    Args:
        shuffle: shuffle the shard order, seeded by `seed` and then per epoch (`dataset.set_epoch`), and the samples
            through a buffer. False: shards in the given order in epoch 0, samples in shard order.
        shuffle_buffer_size: samples in the shuffle buffer (the original's 5,000); 0 shuffles shards only.
        repeat: within an epoch, start over (in the same order) when every shard has been read, so that an epoch
            of a fixed number of samples (the trainer's `samples_per_epoch`, the original's `--train_num_samples_*`)
            can be longer than the data. Resampled streams never end.
    Raises:
        ValueError: a negative `shuffle_buffer_size`.
    """
    if shuffle_buffer_size < 0:
        raise ValueError(f"shuffle_buffer_size must be >= 0 (samples; 0 shuffles shards only), got "
                         f"{shuffle_buffer_size}.")
    if shuffle:
        # One shard at a time into the buffer, as each of the original's readers read its shards; a buffer of one
        # sample leaves the samples in shard order.
        dataset = dataset.shuffle(seed=seed, buffer_size=max(1, shuffle_buffer_size), max_buffer_input_shards=1)
    if repeat:
        dataset = dataset.repeat(None)
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------------------------------------------


def encode_image(image: PIL.Image.Image, image_format: str = "PNG") -> bytes:
    """The image encoded as `image_format` (a PIL format name: PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def encode_image_base64(image: PIL.Image.Image | bytes, image_format: str = "PNG") -> str:
    """Base64 text of an encoded image (or of a PIL image encoded as `image_format`), for interleaved documents."""
    encoded = image if isinstance(image, bytes) else encode_image(image, image_format)
    return base64.b64encode(encoded).decode("ascii")


def encode_video_base64(video: str | os.PathLike | bytes) -> str:
    """Base64 text of a video file (its path, or its bytes), for the `video_base64` of an MMC4 `image_info` entry."""
    if not isinstance(video, bytes):
        with open(video, "rb") as file:
            video = file.read()
    return base64.b64encode(video).decode("ascii")


def write_pair_shard(path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]) -> int:
    """
    Writes image-caption (or video-caption) pairs as a webdataset tar read by `build_pair_dataset`.

    Args:
        examples: dicts with `caption` (str), and `image` (a PIL image, or encoded bytes written as they are) or
            `video`, and optionally `key` (default: the example's index, zero-padded) and `image_ext` (`"png"`
            (default), `"jpg"` or `"jpeg"`: the member's extension and, for PIL images, the encoding). A `video` is
            a video file path (written as member `x.<its extension>`), a list of frames (PIL images or encoded
            bytes, written as members `x.0.<image_ext>`, `x.1.<image_ext>`, ...) or a (T, H, W, C) uint8 array
            (member `x.frames.npy`).
    Returns:
        The number of samples written.
    """
    count = 0
    with wds.TarWriter(os.fspath(path), encoder=False) as writer:
        for index, example in enumerate(examples):
            extension = example.get("image_ext", "png")
            if "video" in example:
                members = _video_members(example["video"], extension)
            else:
                members = {extension: _encoded(example["image"], extension)}
            writer.write({"__key__": str(example.get("key", f"{index:09d}")), **members,
                          "txt": example["caption"].encode("utf-8")})
            count += 1
    return count


def _encoded(image: bytes | PIL.Image.Image, extension: str) -> bytes:
    return image if isinstance(image, bytes) else encode_image(image, "PNG" if extension == "png" else "JPEG")


def _video_members(video: Any, image_ext: str) -> dict[str, bytes]:
    """The tar members of one video (see `write_pair_shard`), extension -> bytes."""
    if isinstance(video, (str, os.PathLike)):
        extension = os.path.splitext(os.fspath(video))[1][1:].lower()
        if extension not in VIDEO_EXTENSIONS:
            raise ValueError(f"{video}: a video file must end in one of {', '.join(VIDEO_EXTENSIONS)}.")
        with open(video, "rb") as file:
            return {extension: file.read()}
    if isinstance(video, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, video, allow_pickle=False)
        return {FRAMES_ARRAY_MEMBER: buffer.getvalue()}
    return {f"{index}.{image_ext}": _encoded(frame, image_ext) for index, frame in enumerate(video)}


def write_interleaved_shard(path: str | os.PathLike, documents: Iterable[Mapping[str, Any] | str | bytes]) -> int:
    """
    Writes interleaved documents as a webdataset tar of `json` samples read by `build_interleaved_dataset`.

    Args:
        documents: JSON objects in the MMC4 format (`text_list`, `image_info` entries with `image_base64`, see
            `encode_image_base64`, or a video's `video_base64` (`encode_video_base64`) / `frames_base64` (a list of
            `encode_image_base64`), `similarity_matrix`) or the ChatGPT one (`is_gpt`, `example`, `image_map`);
            `str` / `bytes` are written as they are (e.g. to test malformed JSON). Keys are the zero-padded index.
    Returns:
        The number of samples written.
    """
    count = 0
    with wds.TarWriter(os.fspath(path), encoder=False) as writer:
        for index, document in enumerate(documents):
            if isinstance(document, str):
                document = document.encode("utf-8")
            elif not isinstance(document, bytes):
                document = json.dumps(document).encode("utf-8")
            writer.write({"__key__": f"{index:09d}", "json": document})
            count += 1
    return count


__all__ = [
    "SkipSample",
    "Video",
    "VideoSetupError",
    "build_interleaved_dataset",
    "build_pair_dataset",
    "encode_image",
    "encode_image_base64",
    "encode_video_base64",
    "expand_shards",
    "sample_stream",
    "preprocess_interleaved",
    "preprocess_pair",
    "shard_rng",
    "write_interleaved_shard",
    "write_pair_shard",
]
