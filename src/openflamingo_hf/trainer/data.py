"""
Pretraining data for OpenFlamingo: image-caption pairs (LAION-style) and interleaved documents (MMC4-style and
ChatGPT-generated sequences), as `datasets.IterableDataset`s of tokenized samples. Pairs and MMC4 documents may hold
videos in place of images.

Each sample is a dict with `input_ids`, `attention_mask`, `labels` (seq_len,) (right padding to `max_length`),
`pixel_values` (num_media, num_frames, 3, H, W) (an image is one frame; `num_frames` is 1 without videos), when a
media has several frames `frame_mask` (num_media, num_frames) (False on the zero frames after a media's own), and
`skipped` (reason -> count, see `shard_reading`), ready for `OpenFlamingoDataCollator`. The processor builds each sample
(`pair_sample`, `interleaved_sample`: text layout, tokens, labels and pixel layout), and `processing.media_inputs`
reads the videos' frames (uniformly sampled to `num_frames`); this module only selects, orders and filters the media.

Formats, and what is skipped: see `openflamingo_hf.trainer.shard_reading`, which reads the shards (and
`openflamingo_hf.trainer.shard_writing`, which writes them).

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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import PIL.Image

from ..processing.media_inputs import VideoFrames, load_video_input, uniform_frame_indices
from .collator import SKIPPED_KEY
from .shard_reading import (
    IMAGE_BELOW_THRESHOLD,
    IMAGE_MISSING_BASE64,
    IMAGE_TOO_SMALL,
    IMAGE_UNDECODABLE,
    MALFORMED_FIELDS,
    MISSING_FIELDS,
    NO_IMAGES,
    SINGLE_IMAGE_AT_END,
    SINGLE_IMAGE_DROPPED,
    TOO_FEW_IMAGES,
    UNDECODABLE_IMAGE,
    UNDECODABLE_VIDEO,
    VIDEO_UNDECODABLE,
    Media,
    SkipSample,
    Video,
    VideoSetupError,
    _InterleavedReader,
    _PairReader,
    _ShardReader,
    expand_shards,
)

if TYPE_CHECKING:
    from ..processing.processing_openflamingo import OpenFlamingoProcessor

Rng = np.random.Generator | random.Random


# MMC4: images whose encoded size is at most this many (decimal) kilobytes are dropped, as `len(bytes) // 1000 <= 10`
# in the original.
MIN_KB = 10
# MMC4 `image_info` keys of one media, in the order they are looked for.
MMC4_MEDIA_KEYS = ("video_base64", "frames_base64", "image_base64")
# ChatGPT-generated documents mark images as `_!_IMAGE1_!_`, `_!_IMAGE2_!_`, ...
GPT_IMAGE_MARKER = re.compile(r"_!_IMAGE\d+_!_")

# The original's sample shuffle buffer (`wds.shuffle(5000, initial=1000)` in open_flamingo's `train/data.py`).
SAMPLE_SHUFFLE_BUFFER = 5000
# `resampled=True`: the data sources `datasets` shuffles per epoch and splits over processes and workers are these
# draw slots, not shards; each reader seeds its draws from the slots it is handed (see
# `shard_reading._ShardReader.draws`). Enough slots for every (process, worker) pair of a large run to get its own.
RESAMPLED_DRAW_SLOTS = 4096


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
    subfolder `x/`, + `x.txt`), one `datasets` shard per tar / file / folder. See the module docstring, and
    `shard_reading`'s for the formats.

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
    # After the buffer, in the reader's own process (DataLoader workers get one copy of both): see
    # `shard_reading._ShardReader`.
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


__all__ = [
    "build_interleaved_dataset",
    "build_pair_dataset",
    "preprocess_interleaved",
    "preprocess_pair",
    "sample_stream",
]
