"""
Writing OpenFlamingo's pretraining shards, in the formats that `build_pair_dataset` / `build_interleaved_dataset`
read (see `openflamingo_hf.trainer.shard_reading`): webdataset tars of image- or video-caption pairs and of
interleaved (MMC4 or ChatGPT-generated) JSON documents, and the base64 encodings those documents hold.

Imports no part of the training recipe (the datasets, `Trainer`), so that data can be written without it (the
embedded world's shards, tests).
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import PIL.Image
import webdataset as wds

from .shard_reading import FRAMES_ARRAY_MEMBER, VIDEO_EXTENSIONS


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
    "encode_image",
    "encode_image_base64",
    "encode_video_base64",
    "write_interleaved_shard",
    "write_pair_shard",
]
