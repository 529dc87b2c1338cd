"""
Reading OpenFlamingo's pretraining shards: the shard readers behind `build_pair_dataset` and
`build_interleaved_dataset` (`openflamingo_hf.trainer.data`), shard specs (`expand_shards`), the undecoded media
of a sample (`Video`, `Media`) and the reasons a sample is skipped (`SkipSample` and the `*` constants).

Formats (see `openflamingo_hf.trainer.shard_writing`, which writes them):

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

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import webdataset as wds
from transformers.utils import logging
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .collator import SKIPPED_KEY

logger = logging.get_logger(__name__)

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

# --- Member and file names --------------------------------------------------------------------------------------
# A pair's image, by extension.
PAIR_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")
# Video containers that PyAV reads (through the processor and transformers' `load_video`), by file extension.
VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv", "mov")
# A tar member `x.frames.npy`: the frames of a video as one (T, H, W, C) / (T, C, H, W) uint8 array. Not a bare `npy`,
# which webdatasets also use for other arrays (e.g. embeddings) next to an image.
FRAMES_ARRAY_MEMBER = "frames.npy"
# Tar members `x.0.jpg`, `x.1.jpg`, ...: frame n of the sample's video (webdataset keys end at the first dot, so
# these are the extensions `0.jpg`, `1.jpg`, ... of sample `x`).
FRAME_MEMBER = re.compile(r"(\d+)\.(?:jpg|png|jpeg)")

# --- Reading ----------------------------------------------------------------------------------------------------
# A resampled reader that draws this many shards in a row (times the shard count) without one good sample stops with
# an error instead of drawing forever.
_EMPTY_DRAWS_PER_SHARD = 10

# Data errors logged per reason and process; the rest are only counted.
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
# Shard readers
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


__all__ = [
    "BAD_JSON",
    "BAD_TEXT",
    "CORRUPT_TAR",
    "DUPLICATE_MEMBER",
    "IMAGE_BELOW_THRESHOLD",
    "IMAGE_MISSING_BASE64",
    "IMAGE_TOO_SMALL",
    "IMAGE_UNDECODABLE",
    "MALFORMED_FIELDS",
    "MISSING_FIELDS",
    "MISSING_IMAGE_FILE",
    "MISSING_VIDEO_FILE",
    "NO_IMAGES",
    "PREPROCESS_ERROR",
    "SINGLE_IMAGE_AT_END",
    "SINGLE_IMAGE_DROPPED",
    "TAR_ERROR",
    "TOO_FEW_IMAGES",
    "TRUNCATED_TAR",
    "UNDECODABLE_IMAGE",
    "UNDECODABLE_VIDEO",
    "UNREADABLE_SHARD",
    "VIDEO_UNDECODABLE",
    "Media",
    "SkipSample",
    "Video",
    "VideoSetupError",
    "expand_shards",
    "shard_rng",
]
