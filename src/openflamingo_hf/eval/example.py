"""One evaluation example of any benchmark (what every loader returns and the runner, prompts and metrics read), and a
benchmark's two splits of them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalExample:
    """
    One image with what a benchmark knows about it. Which fields are set depends on the task:

    - captioning (COCO, Flickr30K): `captions` (the reference captions; the first is used as a demonstration);
    - VQA (VQAv2, OK-VQA, TextVQA, VizWiz): `question` and `answers` (every annotator's answer, usually 10;
      empty where a split has no annotations);
    - classification: `label` (ImageNet: the class name; Hateful Memes: "yes" or "no") and, for Hateful Memes,
      `ocr` (the text written on the meme).

    Attributes:
        id: unique within its split (COCO image id, question id, meme id, file path, ...), as a string.
        image: path of the image file (or a PIL image for data that holds decoded images).
    """

    id: str
    image: object
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    label: str | None = None
    ocr: str | None = None


@dataclass
class BenchmarkData:
    """A benchmark's two splits. `references`: captioning references by id (default: each example's `captions`);
    `class_names`: ImageNet's classes (default: the labels of both splits, sorted)."""

    train: list[EvalExample]
    test: list[EvalExample]
    references: dict[str, list[str]] | None = None
    class_names: list[str] | None = None
