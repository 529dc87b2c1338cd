"""
A small procedural image-text world, drawn with PIL: the data the embedded OpenFlamingo is trained and tested on.

Each image shows one to three shapes of one kind and one colour, scattered on a noisy light background:

    caption   "two red circles."          question "What color is the shape?"    answer "red"
                                           question "What shape is it?"           answer "circle"
                                           question "How many shapes are there?"  answer "two"

Training documents write captions bare (as the recipe's pairs do) and in the released models' prompt
(`Output:two red circles.`), and questions in their VQA prompt (`Question:What shape is it? Short answer:circle`).

The tag task has no instruction: a tag lists the shape, colour and count in one of several formats (`FORMATS`), and
only the demonstrations of a prompt say which one to use (in-context learning):

    "<image>Tag: circle-red-2<|endofchunk|><image>Tag: square-blue-1<|endofchunk|><image>Tag:"  ->  " triangle-green-3"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Drawn at 96 px (PNGs above the recipe's 10 KB minimum); the embedded vision tower sees them at 64 px.
IMAGE_SIZE = 96
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 70, 215), "yellow": (225, 200, 30)}
COUNTS = {1: "one", 2: "two", 3: "three"}
# Seeds from here on are never used for training data (`write_world_shards` refuses them): held-out images for the
# bundled samples, the tests and `evaluate_embedded` come from them.
HELD_OUT_SEED_START = 1_000_000
SAMPLE_SEED = HELD_OUT_SEED_START + 2029  # the bundled sample images (six different captions, every question kind)
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
}
# Tag formats: only the demonstrations of a prompt say which one is wanted.
FORMATS = {
    "dash": lambda shape, color, count: f"{shape}-{color}-{count}",
    "slash": lambda shape, color, count: f"{color}/{shape}/{count}",
    "words": lambda shape, color, count: f"{count} {color} {shape}",
}


@dataclass
class Example:
    """One image of the world and everything true about it."""

    image: Image.Image
    shape: str
    color: str
    count: int
    question: str
    answer: str
    caption: str = field(init=False)

    def __post_init__(self):
        plural = "s" if self.count > 1 else ""
        self.caption = f"{COUNTS[self.count]} {self.color} {self.shape}{plural}."

    def tag(self, format_name: str) -> str:
        """The tag of this image in one of `FORMATS`."""
        return FORMATS[format_name](self.shape, self.color, self.count)


def draw(shape: str, color: str, count: int, rng: np.random.Generator) -> Image.Image:
    """`count` shapes of one kind and colour at random non-overlapping places, on a noisy light background."""
    background = rng.integers(150, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    canvas = ImageDraw.Draw(image)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    for x, y, r in _places(count, rng):
        _draw_shape(canvas, shape, x, y, r, fill)
    return image


def _draw_shape(canvas: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, fill: tuple) -> None:
    """One circle, square or triangle of radius `r` centred at (x, y)."""
    if shape == "circle":
        canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        canvas.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        canvas.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def _places(count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Centres and radii of `count` shapes that do not overlap (rejection sampling, deterministic under `rng`)."""
    places: list[tuple[int, int, int]] = []
    while len(places) < count:
        r = int(rng.integers(10, 16) if count > 1 else rng.integers(14, 24))
        x, y = (int(v) for v in rng.integers(r + 1, IMAGE_SIZE - r - 1, size=2))
        # Circles around the shapes, 1.5x their radius (a square's corner reaches 1.41x): no two touch.
        if all((x - px) ** 2 + (y - py) ** 2 > (1.5 * (r + pr)) ** 2 for px, py, pr in places):
            places.append((x, y, r))
    return places


def make_examples(n: int, seed: int = 0, draw_images: bool = True) -> list[Example]:
    """`n` random examples of the world, reproducible from `seed` (each with one random question). Without
    `draw_images` the images are left out (`None`): the texts alone, fast."""
    rng = np.random.default_rng(seed)
    # Drawing has its own random stream, so that the texts of a seed are the same with and without images.
    draw_rng = np.random.default_rng([seed, 1])
    examples = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        count = int(rng.integers(1, 4))
        kind = list(QUESTIONS)[int(rng.integers(len(QUESTIONS)))]
        answer = {"color": color, "shape": shape, "count": COUNTS[count]}[kind]
        image = draw(shape, color, count, draw_rng) if draw_images else None
        examples.append(Example(image, shape, color, count, QUESTIONS[kind], answer))
    return examples


# ----------------------------------------------------------------------------------------------------------------------
# Texts of the world, in the shapes the embedded model is trained and prompted with
# ----------------------------------------------------------------------------------------------------------------------

TAG_PROMPT = "Tag:"


def vqa_text(question: str, answer: str = "") -> str:
    """`Question:{q} Short answer:{a}`: the released models' VQA prompt (the processor's `TASK_TEMPLATES["vqa"]`);
    without `answer`, the query."""
    from ..processing.processing_openflamingo import TASK_TEMPLATES

    return TASK_TEMPLATES["vqa"].format(question=question, answer=answer)


def output_caption_text(caption: str = "") -> str:
    """`Output:{caption}`: the released models' caption prompt (the processor's `TASK_TEMPLATES["captioning"]`);
    without `caption`, the query `Output:`."""
    from ..processing.processing_openflamingo import TASK_TEMPLATES

    return TASK_TEMPLATES["captioning"].format(answer=caption)


def tag_text(tag: str = "") -> str:
    """`Tag: {tag}`; without `tag`, the query `Tag:`."""
    return f"{TAG_PROMPT} {tag}" if tag else TAG_PROMPT


# What follows an image in a training document. "caption" is the recipe's bare pair text; "output_caption" and "vqa"
# are the released models' evaluation prompts, so that the prompts users copy from them work on the embedded model.
CHUNK_KINDS = ("caption", "output_caption", "vqa", "tag")


def chunk_texts(example: Example, kind: str, format_name: str = "dash") -> str:
    """The text that follows an image in a training document (one of `CHUNK_KINDS`)."""
    if kind == "caption":
        return example.caption
    if kind == "output_caption":
        return output_caption_text(example.caption)
    if kind == "vqa":
        return vqa_text(example.question, example.answer)
    if kind == "tag":
        return tag_text(example.tag(format_name))
    raise ValueError(f"Unknown chunk kind {kind!r}; use one of {', '.join(CHUNK_KINDS)}.")


def make_document(examples: list[Example], rng: np.random.Generator) -> dict:
    """
    An MMC4-style interleaved document (`text_list`, `image_info` with base64 PNGs, `similarity_matrix`) whose every
    image introduces one chunk of one kind; tag documents keep one tag format throughout, so that the format can
    only be learned from the earlier chunks (in-context).
    """
    from ..trainer.shard_writing import encode_image_base64

    kind = CHUNK_KINDS[int(rng.integers(len(CHUNK_KINDS)))]
    format_name = list(FORMATS)[int(rng.integers(len(FORMATS)))]
    sentences = [chunk_texts(example, kind, format_name) for example in examples]
    similarity = [[0.9 if j == i else 0.1 for j in range(len(sentences))] for i in range(len(sentences))]
    return {
        "text_list": sentences,
        "image_info": [{"image_base64": encode_image_base64(example.image)} for example in examples],
        "similarity_matrix": similarity,
    }


def text_corpus(n: int, seed: int = 0) -> list[str]:
    """Image-free documents of the world's language (every chunk kind of `CHUNK_KINDS`), to pretrain the LM."""
    rng = np.random.default_rng(seed)
    documents = []
    for examples in _groups(make_examples(n, seed, draw_images=False), rng):
        kind = CHUNK_KINDS[int(rng.integers(len(CHUNK_KINDS)))]
        format_name = list(FORMATS)[int(rng.integers(len(FORMATS)))]
        documents.append(" ".join(chunk_texts(example, kind, format_name) for example in examples))
    return documents


def _groups(examples: list[Example], rng: np.random.Generator, low: int = 3, high: int = 6) -> list[list[Example]]:
    groups, start = [], 0
    while start < len(examples):
        size = int(rng.integers(low, high + 1))
        groups.append(examples[start : start + size])
        start += size
    return [group for group in groups if len(group) >= low]


def write_world_shards(folder, num_pairs: int, num_documents: int, seed: int = 0, shard_size: int = 500) -> dict:
    """
    Writes the recipe's two kinds of shards for the world: `pairs-NNNN.tar` (image + caption) and `docs-NNNN.tar`
    (interleaved documents of 3-6 images, see `make_document`). Returns the brace patterns of both.
    """
    import os

    from ..trainer.shard_writing import write_interleaved_shard, write_pair_shard

    # Pairs use `seed`, documents `seed + 1 ...`: all of them must stay below the held-out seeds.
    if seed < 0 or seed + 1 + num_documents > HELD_OUT_SEED_START:
        raise ValueError(
            f"Training seeds {seed}..{seed + num_documents} reach the held-out seeds (>= {HELD_OUT_SEED_START}); "
            "use a smaller seed or fewer documents."
        )
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = make_examples(num_pairs, seed)
    pair_shards = _write_sharded(folder, "pairs", [{"image": e.image, "caption": e.caption} for e in pairs],
                                 shard_size, write_pair_shard)
    documents, doc_seed = [], seed + 1
    while len(documents) < num_documents:
        group = make_examples(int(rng.integers(3, 7)), doc_seed)
        doc_seed += 1
        documents.append(make_document(group, rng))
    doc_shards = _write_sharded(folder, "docs", documents, shard_size, write_interleaved_shard)
    return {"pairs": pair_shards, "docs": doc_shards}


def _write_sharded(folder, prefix, items, shard_size, writer) -> str:
    import os

    count = 0
    for count, start in enumerate(range(0, len(items), shard_size), 1):
        writer(os.path.join(folder, f"{prefix}-{count - 1:04d}.tar"), items[start : start + shard_size])
    return os.path.join(folder, f"{prefix}-{{0000..{count - 1:04d}}}.tar")


# ----------------------------------------------------------------------------------------------------------------------
# Clips: one shape moving across the frame (the video task; only the order of the frames tells the direction)
# ----------------------------------------------------------------------------------------------------------------------

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "up": "down", "down": "up"}
CLIP_FRAMES = 4


@dataclass
class Clip:
    """A clip of `CLIP_FRAMES` frames in which one shape moves in one direction."""

    frames: list
    shape: str
    color: str
    direction: str
    caption: str = field(init=False)

    def __post_init__(self):
        self.caption = f"one {self.color} {self.shape} moving {self.direction}."


def draw_clip(shape: str, color: str, direction: str, rng: np.random.Generator) -> list:
    """`CLIP_FRAMES` frames of one shape moving 16 px per frame in `direction`, on one noisy background."""
    background = rng.integers(150, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    r, step = int(rng.integers(10, 14)), 16
    dx, dy = DIRECTIONS[direction]
    span = step * (CLIP_FRAMES - 1)
    # A start from which the whole path stays inside the image.
    low_x, high_x = r + 1 + max(0, -dx * span), IMAGE_SIZE - r - 1 - max(0, dx * span)
    low_y, high_y = r + 1 + max(0, -dy * span), IMAGE_SIZE - r - 1 - max(0, dy * span)
    x0, y0 = int(rng.integers(low_x, high_x)), int(rng.integers(low_y, high_y))
    frames = []
    for t in range(CLIP_FRAMES):
        image = Image.fromarray(background.copy())
        x, y = x0 + dx * step * t, y0 + dy * step * t
        _draw_shape(ImageDraw.Draw(image), shape, x, y, r, fill)
        frames.append(image)
    return frames


def make_clips(n: int, seed: int = 0) -> list[Clip]:
    """`n` random clips, reproducible from `seed`."""
    rng = np.random.default_rng([seed, 2])
    clips = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        clips.append(Clip(draw_clip(shape, color, direction, rng), shape, color, direction))
    return clips


def reverse_clip(clip: Clip) -> Clip:
    """The clip played backwards: the same frames in reverse order, which show the opposite direction."""
    return Clip(clip.frames[::-1], clip.shape, clip.color, OPPOSITE_DIRECTIONS[clip.direction])


def write_clip_file(clip: Clip, path: str, fps: int = 4) -> str:
    """Writes a clip as a lossless video file (FFV1 in AVI, which records its frame count, so `load_video` can
    sample it) with PyAV (`pip install av`)."""
    import av

    with av.open(path, "w", format="avi") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = clip.frames[0].size
        stream.pix_fmt = "bgr0"
        for frame in clip.frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
