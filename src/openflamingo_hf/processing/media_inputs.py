# Copyright 2024 The OpenFlamingo authors and the openflamingo_hf contributors.
# Licensed under the MIT License.
"""
Decoding of the OpenFlamingo processor's media inputs: every image becomes an 8-bit PIL image, every video the list
of its (uniformly sampled) frames as such images. The processor lays the decoded media out as pixel values; this
module only reads and normalizes them, and its errors name the sample and image (`where`) they come from.
"""

from __future__ import annotations

import base64
import os
from io import BytesIO
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_utils import ChannelDimension, is_valid_image, load_image

# No import from the rest of the package: this file is shipped next to the processor in trust_remote_code Hub folders.

# ----------------------------------------------------------------------------------------------------------------
# Image normalization: every image becomes an 8-bit PIL image before the image processor runs. Its own handling of
# arrays guesses the channel axis (channels first when in doubt), rescales float [0, 1] images by 1/255 a second
# time, and PIL clips 16-bit images to white when converting them to RGB; a PIL image in an 8-bit mode is what every
# image processor backend handles the same, correct way.
# ----------------------------------------------------------------------------------------------------------------

# Channel counts of an image array: gray, RGB, RGBA (as in transformers' `infer_channel_dimension_format` calls).
_CHANNEL_COUNTS = (1, 3, 4)
# 16-bit PIL modes. They, and the 32-bit modes `I` and `F`, are clipped (not scaled) by `Image.convert("RGB")`.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _read_image_source(source: str, where: str) -> PIL.Image.Image:
    """
    Opens an image file path (or `file://` URL), base64 image data (optionally as a `data:image/...` URL) or an
    http(s) URL.

    Files and base64 data are opened without a mode conversion, so that `_normalize_pil_image` can scale 16-bit
    images instead of PIL clipping them (which `load_image`'s `convert("RGB")` does). URLs are downloaded by
    `load_image`, which returns 8-bit RGB.
    """
    if source.startswith("file://"):
        source = url2pathname(urlparse(source).path)
    try:
        if source.startswith(("http://", "https://")):
            return load_image(source)
        if os.path.isfile(source):
            opened = PIL.Image.open(source)
        else:
            data = source.split(",", 1)[-1] if source.startswith("data:image/") else source
            opened = PIL.Image.open(BytesIO(base64.decodebytes(data.encode())))
        with opened:
            # Decode here (PIL opens lazily), so that a corrupt file gets the message below; `exif_transpose`
            # returns a copy, which outlives the file closed here.
            opened.load()
            return PIL.ImageOps.exif_transpose(opened)
    except Exception as error:
        shown = source if len(source) <= 120 else source[:120] + "..."
        if source.startswith(("http://", "https://")):
            reason = f"could not download {shown!r} ({type(error).__name__}: {error})"
        elif os.path.isfile(source):
            reason = f"{shown!r} exists but is not a readable image file ({type(error).__name__}: {error})"
        else:
            reason = f"there is no image file at {shown!r} (and it is not base64 image data)"
        raise ValueError(
            f"{where}: {reason}. Pass the path of a readable image file, an http(s) URL, base64 image data, or a PIL "
            "image."
        ) from error


def _empty_image_error(where: str, description: str) -> ValueError:
    """The error for an image without pixels (the image processor would fail on it with a `ZeroDivisionError`)."""
    return ValueError(
        f"{where}: the image is empty ({description}). Pass an image at least one pixel wide and high, or leave the "
        "empty image (and its `<image>` marker) out."
    )


def _normalize_pil_image(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """Scales a 16-bit / 32-bit PIL image to an 8-bit gray one; returns 8-bit modes unchanged."""
    if image.width == 0 or image.height == 0:
        raise _empty_image_error(where, f"a {image.width}x{image.height} (width x height) PIL image")
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_uint8(np.asarray(image))
    elif image.mode == "I":
        gray = _int32_image_to_uint8(np.asarray(image), where)
    elif image.mode == "F":
        gray = _float_to_uint8(np.asarray(image), where)
    else:
        # 8-bit modes (RGB, L, RGBA, LA, P, 1, CMYK, ...): the image processor converts them to RGB itself,
        # compositing transparency onto white.
        return image
    return PIL.Image.fromarray(gray)


def _array_to_pil_image(
    image: np.ndarray | torch.Tensor, where: str, channel_format: ChannelDimension | None
) -> PIL.Image.Image:
    """Turns an `(H, W)`, `(H, W, C)` or `(C, H, W)` array / tensor into an 8-bit L, RGB or RGBA PIL image."""
    is_tensor = isinstance(image, torch.Tensor)
    pixels = _to_numpy(image)
    if pixels.ndim not in (2, 3):
        raise ValueError(
            f"{where}: an image array must have 2 or 3 dimensions ((H, W), (H, W, C) or (C, H, W)), got shape "
            f"{tuple(pixels.shape)}."
        )
    if pixels.size == 0:
        raise _empty_image_error(where, f"an array of shape {tuple(pixels.shape)}")
    if pixels.ndim == 3:
        if _channel_layout(pixels.shape, is_tensor, channel_format, where) == ChannelDimension.FIRST:
            pixels = np.moveaxis(pixels, 0, -1)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    # `fromarray` picks L / RGB / RGBA from the uint8 array's shape.
    return PIL.Image.fromarray(np.ascontiguousarray(_pixels_to_uint8(pixels, where)))


def _to_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view / copy of an array or (any device, any float precision) tensor."""
    if isinstance(image, np.ndarray):
        return image
    image = image.detach().cpu()
    # numpy has no bfloat16; float32 holds every half-precision value exactly.
    if image.dtype in (torch.float16, torch.bfloat16):
        image = image.float()
    return image.numpy()


def _channel_layout(
    shape: tuple[int, ...], is_tensor: bool, requested: ChannelDimension | None, where: str
) -> ChannelDimension:
    """
    The channel axis of a 3-D image array: `requested` if given, else the axis of size 1, 3 or 4. When both the
    first and the last axis qualify (an image at most 4 pixels high or wide), numpy arrays are read as (H, W, C),
    the numpy / PIL convention, and torch tensors as (C, H, W), the torchvision convention.
    """
    first_fits, last_fits = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
    if requested is not None:
        channels = shape[0] if requested == ChannelDimension.FIRST else shape[-1]
        if channels not in _CHANNEL_COUNTS:
            raise ValueError(
                f"{where}: with `input_data_format={requested.value!r}` the image array of shape {tuple(shape)} has "
                f"{channels} channels, but an image needs 1 (gray), 3 (RGB) or 4 (RGBA). Check the array's layout "
                "or `input_data_format`."
            )
        return requested
    if first_fits and last_fits:
        return ChannelDimension.FIRST if is_tensor else ChannelDimension.LAST
    if first_fits or last_fits:
        return ChannelDimension.FIRST if first_fits else ChannelDimension.LAST
    raise ValueError(
        f"{where}: cannot find the channel axis of the image array of shape {tuple(shape)}: an image needs 1 "
        f"(gray), 3 (RGB) or 4 (RGBA) channels, on its first axis (C, H, W) or its last axis (H, W, C), but these "
        f"axes have {shape[0]} and {shape[-1]} entries. Convert it to gray, RGB or RGBA first."
    )


def _pixels_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """8-bit pixel values for an `(H, W)` / `(H, W, C)` array of any supported dtype (rules: see *Images* in
    `OpenFlamingoProcessor.__call__`)."""
    kind = pixels.dtype.kind
    if kind == "b":
        return pixels.astype(np.uint8) * 255
    if kind == "u" and pixels.dtype.itemsize == 1:
        return pixels
    if kind == "u" and pixels.dtype.itemsize == 2:
        return _sixteen_bit_to_uint8(pixels)
    if kind in "ui":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: an image of dtype {pixels.dtype} must have pixel values in [0, 255], got [{low}, {high}]. "
                "Pass 16-bit images as uint16, or scale the image to [0, 255]."
            )
        return pixels.astype(np.uint8)
    if kind == "f":
        return _float_to_uint8(pixels, where)
    raise TypeError(
        f"{where}: unsupported pixel dtype {pixels.dtype}. Pass uint8 pixels in [0, 255], uint16 (16-bit) pixels, "
        "or float pixels in [0, 1] or [0, 255]."
    )


def _sixteen_bit_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scales 16-bit values [0, 65535] to [0, 255], rounding to nearest (65535 / 255 = 257 exactly)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _int32_image_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """A PIL mode `I` image (32-bit integers, e.g. some 16-bit PNGs) holding 16-bit values, scaled to 8 bits."""
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"{where}: a PIL image of mode 'I' is read as 16-bit, with values in [0, 65535], but has values in "
            f"[{low}, {high}]. Scale it to 16 bits (mode 'I;16') or 8 bits (mode 'L') first."
        )
    return _sixteen_bit_to_uint8(pixels)


def _float_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """
    Float pixels to 8 bits: values all in [0, 1] are read as [0, 1], else as [0, 255]. NaN / infinite, negative
    (e.g. already normalized pixel values) and > 255 values are refused rather than silently clipped.
    """
    pixels = pixels.astype(np.float64)
    num_non_finite = int(np.count_nonzero(~np.isfinite(pixels)))
    if num_non_finite:
        raise ValueError(
            f"{where}: the image has NaN or infinite pixel values ({num_non_finite} of {pixels.size}). Pass an image "
            "with finite pixel values."
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"{where}: float pixel values must lie in [0, 1] or [0, 255], got [{low:g}, {high:g}]. Pass the raw image "
            "(not normalized pixel values), clamped to its range (e.g. `image.clamp(0, 1)`)."
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return np.rint(pixels * scale).astype(np.uint8)


def load_image_input(image: Any, where: str, channel_format: ChannelDimension | None = None) -> PIL.Image.Image:
    """
    Turns one input image into a PIL image that the image processor preprocesses correctly (see *Images* in
    `OpenFlamingoProcessor.__call__`): reads a path / URL / base64 string, scales 16-bit and float pixels to 8 bits,
    lays arrays out as `(H, W, C)`, and refuses what is not a valid image with a message that starts with `where`.
    """
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        image = _read_image_source(image, where)
    if not is_valid_image(image):
        raise TypeError(
            f"{where}: unsupported image type {type(image).__module__}.{type(image).__qualname__}. Pass a "
            "PIL.Image.Image, a numpy array or torch tensor of shape (H, W), (H, W, C) or (C, H, W), or a path "
            "to an image file."
        )
    if isinstance(image, PIL.Image.Image):
        return _normalize_pil_image(image, where)
    return _array_to_pil_image(image, where, channel_format)


# ----------------------------------------------------------------------------------------------------------------
# Video reading: frames sampled uniformly, files through transformers' `load_video`
# ----------------------------------------------------------------------------------------------------------------


class VideoFrames(list):
    """The loaded frames of one video: one media slot of several frames (a plain list is not a media item)."""


def uniform_frame_indices(total_num_frames: int, num_frames: int) -> np.ndarray:
    """
    Which frames of a `total_num_frames`-frame video to keep: transformers' uniform sampling
    (`video_utils.default_sample_indices_fn`: `arange(num_frames) * total // num_frames`), or every frame when the
    video has no more than `num_frames`.
    """
    if total_num_frames <= num_frames:
        return np.arange(total_num_frames)
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    return default_sample_indices_fn(VideoMetadata(total_num_frames=total_num_frames), num_frames=num_frames)


def read_video_file(path: str, num_frames: int | None, where: str) -> np.ndarray:
    """(T, H, W, C) uint8 frames of a video file, uniformly sampled to `num_frames` (`None`: every frame), read by
    transformers' `load_video` (PyAV)."""
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such video file: {path}.")
    from transformers.video_utils import load_video

    def sample_indices(metadata, **_) -> np.ndarray:
        # PyAV opens some non-video files (a PNG, for one) as a stream without frames; `load_video` would then fail
        # with an IndexError on the empty index list.
        if not metadata.total_num_frames:
            raise ValueError("PyAV finds no video frames in it")
        total = metadata.total_num_frames
        return uniform_frame_indices(total, total if num_frames is None else num_frames)

    try:
        frames, _ = load_video(path, backend="pyav", sample_indices_fn=sample_indices)
    except ImportError as error:
        raise ImportError(f"{where}: reading video files needs PyAV: `pip install av` ({error}).") from error
    except Exception as error:  # noqa: BLE001 (PyAV raises its own error types for unreadable files)
        raise _unreadable_video_error(path, where, error) from error
    if len(frames) == 0:
        raise _unreadable_video_error(path, where, ValueError("it has no frames"))
    return frames


def _unreadable_video_error(path: str, where: str, error: Exception) -> ValueError:
    return ValueError(
        f"{where}: {path} cannot be read as a video ({error}); pass a video file that PyAV decodes (e.g. .mp4, .webm, "
        ".avi), a (T, H, W, C) frame array or a list of frame images, and pass still images with `images=`."
    )


def is_video_input(item: Any) -> bool:
    """A video: a file path, a `(T, H, W, C)` / `(T, C, H, W)` array or tensor, or a non-empty list of frames."""
    if isinstance(item, (str, os.PathLike)):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == 4
    return (
        isinstance(item, (list, tuple))
        and len(item) > 0
        and all(isinstance(f, PIL.Image.Image) or (isinstance(f, (np.ndarray, torch.Tensor)) and f.ndim in (2, 3))
                for f in item)
    )


def load_video_input(
    video: Any, num_frames: int | None, where: str, channel_format: ChannelDimension | None = None
) -> VideoFrames:
    """
    The frames of one video (a file path, a `(T, H, W, C)` / `(T, C, H, W)` array or tensor, or a list of frames) as
    8-bit PIL images, sampled uniformly to `num_frames` (all of them when it has no more, or when `None`).
    """
    if not is_video_input(video) and not (isinstance(video, (list, tuple)) and len(video) == 0):
        raise TypeError(
            f"{where}: a video is a file path, a (T, H, W, C) / (T, C, H, W) array or tensor, or a list of frames; got "
            f"{type(video).__name__}" + (f" of shape {tuple(video.shape)}" if hasattr(video, "shape") else "") + "."
        )
    if isinstance(video, (str, os.PathLike)):
        frames = read_video_file(os.fspath(video), num_frames, where)
    else:
        frames = video
        if len(frames) == 0:
            raise ValueError(f"{where} has no frames.")
        if num_frames is not None:
            frames = [frames[int(i)] for i in uniform_frame_indices(len(frames), num_frames)]
    return VideoFrames(
        load_image_input(frame, f"{where}, frame {frame_idx}", channel_format) for frame_idx, frame in enumerate(frames)
    )


__all__ = [
    "VideoFrames",
    "is_video_input",
    "load_image_input",
    "load_video_input",
    "read_video_file",
    "uniform_frame_indices",
]
