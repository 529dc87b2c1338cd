"""
Tests of how OpenFlamingoProcessor reads images of every accepted kind (offline, tiny images).

Each accepted input is compared with an independent reference: the pixel values that the processor's own image
processor gives for the equivalent 8-bit PIL image, built by hand here. Each refused input must raise the documented
exception type, with a message that names the sample and image and says what is wrong.
"""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from openflamingo_hf.processing.processing_openflamingo import OpenFlamingoProcessor
from openflamingo_hf.testing_utils import build_tiny_tokenizer, make_image

IMAGE = "<image>"
HEIGHT, WIDTH = 30, 40


@pytest.fixture(scope="module")
def processor() -> OpenFlamingoProcessor:
    return OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """A deterministic (HEIGHT, WIDTH) uint8 gray image covering 0 and 255."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(HEIGHT, WIDTH), dtype=np.uint8)
    pixels[0, :2] = (0, 255)
    return pixels


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A deterministic (HEIGHT, WIDTH, 3) uint8 RGB image."""
    return np.asarray(make_image(1, size=(WIDTH, HEIGHT)))


def encode(processor: OpenFlamingoProcessor, image, **kwargs) -> torch.Tensor:
    """The `(3, 224, 224)` pixel values the processor gives for one image."""
    return processor(images=image, text=IMAGE, return_tensors="pt", **kwargs)["pixel_values"][0, 0, 0]


def reference(processor: OpenFlamingoProcessor, pixels: np.ndarray) -> torch.Tensor:
    """
    What the image processor gives, on its own, for the 8-bit image `pixels` ((H, W) gray or (H, W, 3) RGB) as a
    PIL RGB image: the path that every image processor backend handles correctly.
    """
    assert pixels.dtype == np.uint8
    image = Image.fromarray(pixels).convert("RGB")
    return torch.as_tensor(processor.image_processor(image, return_tensors="pt")["pixel_values"][0])


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # The inputs are built to give exactly the reference's 8-bit pixels, so nothing is left to round.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# 1. High bit depth PIL images (16-bit PNGs): scaled to 8 bits, not clipped to white
# ------------------------------------------------------------------------------------------------------------------


def test_sixteen_bit_mid_gray_is_eight_bit_mid_gray(processor):
    sixteen_bit = Image.fromarray(np.full((HEIGHT, WIDTH), 32768, dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    assert_same(encode(processor, sixteen_bit), reference(processor, np.full((HEIGHT, WIDTH), 128, np.uint8)))


@pytest.mark.parametrize("source", ["pil", "png_path", "png_base64", "png_data_url", "mode_i", "uint16_array"])
def test_sixteen_bit_gray_image_is_scaled_to_eight_bits(processor, gray, tmp_path, source):
    # v * 257 maps [0, 255] onto [0, 65535]; the +100 stays within rounding of v * 257.
    sixteen = gray.astype(np.uint16) * 257 + np.where(gray < 255, 100, 0).astype(np.uint16)
    image = Image.fromarray(sixteen)
    if source == "png_path":
        path = tmp_path / "sixteen_bit.png"
        path.write_bytes(png_bytes(image))
        image = str(path)
    elif source == "png_base64":
        image = base64.b64encode(png_bytes(image)).decode()
    elif source == "png_data_url":
        image = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    elif source == "mode_i":
        image = Image.fromarray(sixteen.astype(np.int32))
        assert image.mode == "I"
    elif source == "uint16_array":
        image = sixteen
    assert_same(encode(processor, image), reference(processor, gray))


def test_sixteen_bit_rgb_array_is_scaled_to_eight_bits(processor, rgb):
    assert_same(encode(processor, rgb.astype(np.uint16) * 257), reference(processor, rgb))


@pytest.mark.parametrize("scale", [1 / 255, 1.0], ids=["unit_range", "byte_range"])
def test_mode_f_image_follows_the_float_rule(processor, gray, scale):
    image = Image.fromarray(gray.astype(np.float32) * np.float32(scale))
    assert image.mode == "F"
    assert_same(encode(processor, image), reference(processor, gray))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.fromarray(np.full((HEIGHT, WIDTH), 70000, np.int32)), r"mode 'I' is read as 16-bit.*\[70000, 70000\]"),
        (Image.fromarray(np.full((HEIGHT, WIDTH), -5, np.int32)), r"mode 'I' is read as 16-bit.*\[-5, -5\]"),
        (Image.fromarray(np.full((HEIGHT, WIDTH), 300.0, np.float32)), r"float pixel values must lie in.*300"),
        (Image.fromarray(np.full((HEIGHT, WIDTH), np.nan, np.float32)), r"NaN or infinite"),
    ],
    ids=["mode_i_above_16_bits", "mode_i_negative", "mode_f_above_255", "mode_f_nan"],
)
def test_high_bit_depth_pil_image_out_of_range_is_refused(processor, image, message):
    with pytest.raises(ValueError, match=rf"^Sample 0, image 0: .*{message}"):
        encode(processor, image)


# ------------------------------------------------------------------------------------------------------------------
# 2. Float arrays / tensors: [0, 1] is not rescaled a second time; [0, 255] stays [0, 255]
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: rgb.astype(np.float32) / 255,
        lambda rgb: rgb.astype(np.float64) / 255,
        lambda rgb: torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255,
        lambda rgb: (torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255).half(),
        lambda rgb: (torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255).requires_grad_(),
    ],
    ids=["numpy_float32_hwc", "numpy_float64_hwc", "torch_float32_chw", "torch_float16_chw", "torch_requires_grad"],
)
def test_float_image_in_unit_range_matches_uint8(processor, rgb, make):
    image = make(rgb)
    if isinstance(image, torch.Tensor) and image.dtype == torch.float16:
        # float16 cannot hold every v / 255 exactly: compare with what it holds, rounded to 8 bits.
        expected_pixels = np.rint(image.float().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    else:
        expected_pixels = rgb
    assert_same(encode(processor, image), reference(processor, expected_pixels))


@pytest.mark.parametrize(
    "make",
    [lambda rgb: rgb.astype(np.float32), lambda rgb: torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32))],
    ids=["numpy_hwc", "torch_chw"],
)
def test_float_image_in_byte_range_matches_uint8(processor, rgb, make):
    assert_same(encode(processor, make(rgb)), reference(processor, rgb))


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((3, 3, 3), -1.5, np.float32), r"float pixel values must lie in \[0, 1\] or \[0, 255\], got \[-1.5,"),
        (np.full((3, 3, 3), 256.0, np.float32), r"float pixel values must lie in .*, got \[256, 256\]"),
        (np.full((3, 3, 3), 300, np.int32), r"dtype int32 must have pixel values in \[0, 255\], got \[300, 300\]"),
    ],
    ids=["normalized_floats", "floats_above_255", "int32_above_255"],
)
def test_pixel_values_out_of_range_are_refused(processor, rgb, pixels, message):
    with pytest.raises(ValueError, match=rf"^Sample 1, image 0: .*{message}"):
        processor(images=[[rgb], [pixels]], text=[IMAGE, IMAGE])


def test_unsupported_pixel_dtype_is_refused(processor):
    with pytest.raises(TypeError, match=r"^Sample 0, image 0: unsupported pixel dtype complex64"):
        encode(processor, np.zeros((HEIGHT, WIDTH, 3), np.complex64))


# ------------------------------------------------------------------------------------------------------------------
# 3. 2-D arrays are gray images
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda gray: gray,
        lambda gray: torch.from_numpy(gray),
        lambda gray: gray.astype(np.float32) / 255,
        lambda gray: gray[:, :, None],
        lambda gray: torch.from_numpy(gray)[None],
        lambda gray: gray.astype(np.int64),
    ],
    ids=["numpy_uint8", "torch_uint8", "numpy_float_unit_range", "numpy_hw1", "torch_1hw", "numpy_int64"],
)
def test_gray_array_matches_pil_l_image(processor, gray, make):
    expected = reference(processor, gray)
    assert_same(encode(processor, Image.fromarray(gray, mode="L")), expected)
    assert_same(encode(processor, make(gray)), expected)


def test_bool_array_is_black_and_white(processor, gray):
    mask = gray > 127
    assert_same(encode(processor, mask), reference(processor, mask.astype(np.uint8) * 255))


# ------------------------------------------------------------------------------------------------------------------
# 4. Empty images
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("empty", "size"),
    [
        (Image.new("RGB", (0, 0)), r"a 0x0 \(width x height\) PIL image"),
        (Image.new("L", (40, 0)), r"a 40x0 \(width x height\) PIL image"),
        (np.zeros((0, 0, 3), np.uint8), r"an array of shape \(0, 0, 3\)"),
        (np.zeros((0, 40, 3), np.uint8), r"an array of shape \(0, 40, 3\)"),
        (np.zeros((0, 5), np.float32), r"an array of shape \(0, 5\)"),
        (torch.zeros(3, 30, 0), r"an array of shape \(3, 30, 0\)"),
    ],
    ids=["pil_0x0", "pil_40x0", "numpy_0x0", "numpy_0x40", "numpy_2d_0x5", "torch_30x0"],
)
def test_empty_image_is_refused_with_its_size(processor, rgb, empty, size):
    with pytest.raises(ValueError, match=rf"^Sample 0, image 1: the image is empty \({size}\)\. Pass an image"):
        processor(images=[rgb, empty], text=IMAGE * 2)


# ------------------------------------------------------------------------------------------------------------------
# 5. Channel axis of 3-D arrays
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40, 3), (1, 40, 3), (4, 50, 3), (2, 50, 3), (3, 40, 4)])
def test_short_hwc_numpy_array_is_read_as_hwc(processor, shape):
    pixels = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    if shape[-1] == 4:
        pixels[..., 3] = 255  # opaque, so that the reference is simply its RGB part
    assert_same(encode(processor, pixels), reference(processor, np.ascontiguousarray(pixels[..., :3])))
    assert_same(encode(processor, pixels), encode(processor, Image.fromarray(pixels)))


def test_ambiguous_torch_tensor_is_read_as_chw(processor):
    # (3, 40, 3) could be either layout: tensors follow torchvision, (C, H, W).
    chw = np.random.default_rng(3).integers(0, 256, size=(3, 40, 3), dtype=np.uint8)
    assert_same(encode(processor, torch.from_numpy(chw)), reference(processor, chw.transpose(1, 2, 0).copy()))


def test_unambiguous_hwc_torch_tensor_is_read_as_hwc(processor, rgb):
    assert_same(encode(processor, torch.from_numpy(rgb.copy())), reference(processor, rgb))


@pytest.mark.parametrize("where", ["top_level", "images_kwargs"])
def test_input_data_format_overrides_the_layout_rule(processor, where):
    chw = np.random.default_rng(4).integers(0, 256, size=(3, 40, 3), dtype=np.uint8)
    kwargs = {"input_data_format": "channels_first"}
    if where == "images_kwargs":
        kwargs = {"images_kwargs": kwargs}
    assert_same(encode(processor, chw, **kwargs), reference(processor, chw.transpose(1, 2, 0).copy()))
    # And "channels_last" makes a tensor HWC.
    hwc = torch.from_numpy(chw)
    assert_same(encode(processor, hwc, input_data_format="channels_last"), reference(processor, chw))


@pytest.mark.parametrize(
    ("pixels", "axes"),
    [
        (np.zeros((HEIGHT, WIDTH, 2), np.uint8), r"\(30, 40, 2\).*have 30 and 2 entries"),
        (np.zeros((5, HEIGHT, WIDTH), np.uint8), r"\(5, 30, 40\).*have 5 and 40 entries"),
        (torch.zeros(2, HEIGHT, WIDTH), r"\(2, 30, 40\).*have 2 and 40 entries"),
    ],
    ids=["numpy_two_channels_last", "numpy_five_channels_first", "torch_two_channels_first"],
)
def test_unsupported_channel_count_is_refused(processor, pixels, axes):
    with pytest.raises(ValueError, match=rf"^Sample 0, image 0: cannot find the channel axis .*{axes}"):
        encode(processor, pixels)


def test_input_data_format_with_wrong_channel_count_is_refused(processor, rgb):
    message = r"^Sample 0, image 0: with `input_data_format='channels_first'` the image .* has 30 channels"
    with pytest.raises(ValueError, match=message):
        encode(processor, rgb, input_data_format="channels_first")


# ------------------------------------------------------------------------------------------------------------------
# 6. Non-finite pixel values
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus_inf"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_non_finite_pixel_values_are_refused(processor, rgb, bad, kind):
    pixels = rgb.astype(np.float32) / 255
    pixels[3, 4, 1] = bad
    image = pixels if kind == "numpy" else torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    message = r"^Sample 1, image 2: the image has NaN or infinite pixel values \(1 of 3600\)"
    with pytest.raises(ValueError, match=message):
        processor(images=[[rgb], [rgb, rgb, image]], text=[IMAGE, IMAGE * 3])


# ------------------------------------------------------------------------------------------------------------------
# Transparency and palettes: RGB, with transparent pixels white
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpha() -> np.ndarray:
    """An on / off alpha channel, so that compositing onto white is exact: opaque keeps the pixel, clear is white."""
    return np.where(np.random.default_rng(5).random((HEIGHT, WIDTH)) < 0.5, 0, 255).astype(np.uint8)


def on_white(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(alpha[..., None] if pixels.ndim == 3 else alpha, pixels, 255).astype(np.uint8)


@pytest.mark.parametrize("source", ["pil", "numpy_hwc", "torch_chw", "png_path"])
def test_rgba_image_is_composited_onto_white(processor, rgb, alpha, tmp_path, source):
    rgba = np.dstack([rgb, alpha])
    image = Image.fromarray(rgba)
    if source == "numpy_hwc":
        image = rgba
    elif source == "torch_chw":
        image = torch.from_numpy(rgba.transpose(2, 0, 1).copy())
    elif source == "png_path":
        # Read from a file, the alpha channel was dropped before (the colour under transparent pixels showed).
        path = tmp_path / "rgba.png"
        path.write_bytes(png_bytes(Image.fromarray(rgba)))
        image = path
    assert_same(encode(processor, image), reference(processor, on_white(rgb, alpha)))


def test_la_image_is_composited_onto_white(processor, gray, alpha):
    image = Image.fromarray(np.dstack([gray, alpha]), mode="LA")
    assert_same(encode(processor, image), reference(processor, on_white(gray, alpha)))


def test_palette_image_becomes_rgb(processor, rgb):
    image = Image.fromarray(rgb).quantize(colors=16)
    assert image.mode == "P"
    assert_same(encode(processor, image), reference(processor, np.asarray(image.convert("RGB"))))
