"""
Published few-shot evaluation figures of the five OpenFlamingo v2 releases, as data.

Every number below is transcribed from Table 11 ("Full evaluation results using demonstrations sampled uniformly at
random across seven vision-language datasets using 0, 4, 8, 16, and 32 in-context examples. Results are averaged
across 3 evaluation seeds and reported with standard deviations.") of the OpenFlamingo technical report, Awadalla et
al. 2023, arXiv:2308.01390, https://arxiv.org/abs/2308.01390 (HTML: https://ar5iv.labs.arxiv.org/html/2308.01390).
Its columns map to the releases as follows; `SOURCES` gives the same URL for each:

- "OF-3B"     -> OpenFlamingo-3B-vitl-mpt1b
- "OF-3B (I)" -> OpenFlamingo-3B-vitl-mpt1b-langinstruct
- "OF-4B"     -> OpenFlamingo-4B-vitl-rpj3b
- "OF-4B (I)" -> OpenFlamingo-4B-vitl-rpj3b-langinstruct
- "OF-9B"     -> OpenFlamingo-9B-vitl-mpt7b

The 0-, 4- and 32-shot cells agree with the report's Table 4. The releases' Hugging Face model cards
(https://huggingface.co/openflamingo/<release name>, listed in `MODEL_CARDS`) carry an "Evaluation" table of the same
form, but it could not be read in full for this transcription, so the cards are not the source of these numbers. Note
that the first commit of the OpenFlamingo-9B-vitl-mpt7b card
(https://huggingface.co/openflamingo/OpenFlamingo-9B-vitl-mpt7b/blob/e9986489d948c1670716c225f02f789f3c5ba8de/README.md)
lists different, earlier VQAv2 figures (0-shot 48.3, 4-shot 49.4) than the report (52.7, 54.8); the report's figures
are the ones `openflamingo_hf.releases` quotes.

Metrics: COCO and Flickr-30K are CIDEr; VQAv2, OK-VQA, TextVQA and VizWiz are VQA accuracy (%); Hateful Memes is ROC
AUC (x100). The report gives no ImageNet figures for these releases, so no release has an "imagenet" entry; a cell
that is not in the source is left out rather than filled in.
"""

from __future__ import annotations

__all__ = ["BENCHMARKS", "MODEL_CARDS", "PUBLISHED", "SHOTS", "SOURCES", "published_scores"]

#: The benchmark keys a release's entry may use.
BENCHMARKS: tuple[str, ...] = (
    "coco",
    "flickr30",
    "vqav2",
    "ok_vqa",
    "textvqa",
    "vizwiz",
    "hateful_memes",
    "imagenet",
)

#: The numbers of in-context examples the published tables report.
SHOTS: tuple[int, ...] = (0, 4, 8, 16, 32)

_REPORT = "https://arxiv.org/abs/2308.01390"


def _row(*cells: tuple[float, float | None]) -> dict[int, tuple[float, float | None]]:
    """One table row: (mean, std) cells for 0, 4, 8, 16 and 32 shots, in that order."""
    if len(cells) != len(SHOTS):
        raise ValueError(f"A row needs {len(SHOTS)} cells, got {len(cells)}.")
    return dict(zip(SHOTS, cells))


#: release name -> benchmark key -> shots -> (mean, standard deviation over 3 seeds, or None if not published).
PUBLISHED: dict[str, dict[str, dict[int, tuple[float, float | None]]]] = {
    "OpenFlamingo-3B-vitl-mpt1b": {
        "coco": _row((74.9, 0.2), (77.3, 0.3), (85.9, 0.6), (89.8, 0.2), (93.0, 0.6)),
        "flickr30": _row((52.3, 1.0), (57.2, 0.4), (58.6, 1.1), (59.2, 0.5), (61.1, 1.3)),
        "vqav2": _row((44.6, 0.0), (45.8, 0.0), (46.2, 0.0), (46.6, 0.0), (47.0, 0.1)),
        "ok_vqa": _row((28.2, 0.2), (30.3, 0.5), (31.1, 0.3), (30.9, 0.3), (31.0, 0.1)),
        "textvqa": _row((24.2, 0.2), (27.0, 0.3), (27.7, 0.1), (28.0, 0.2), (28.3, 0.2)),
        "vizwiz": _row((23.7, 0.5), (27.0, 0.3), (32.1, 0.7), (36.1, 0.3), (39.8, 0.1)),
        "hateful_memes": _row((51.2, 2.5), (50.6, 0.8), (52.0, 1.1), (48.5, 0.7), (50.2, 1.8)),
    },
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": {
        "coco": _row((74.4, 0.6), (82.7, 0.7), (87.8, 0.5), (91.9, 0.3), (94.8, 0.3)),
        "flickr30": _row((51.2, 0.2), (59.1, 0.3), (60.7, 0.6), (63.0, 0.4), (64.5, 1.3)),
        "vqav2": _row((44.1, 0.1), (45.7, 0.1), (45.9, 0.1), (45.8, 0.0), (44.8, 0.1)),
        "ok_vqa": _row((28.7, 0.1), (30.6, 0.2), (31.5, 0.3), (30.7, 0.3), (30.6, 0.1)),
        "textvqa": _row((23.1, 0.2), (28.1, 0.4), (29.1, 0.1), (29.1, 0.1), (28.5, 0.1)),
        "vizwiz": _row((23.4, 0.3), (27.7, 0.1), (32.1, 0.6), (35.3, 0.1), (39.3, 0.4)),
        "hateful_memes": _row((50.1, 2.2), (49.5, 0.6), (50.7, 1.8), (48.7, 1.0), (47.8, 2.2)),
    },
    "OpenFlamingo-4B-vitl-rpj3b": {
        "coco": _row((76.7, 0.2), (81.8, 0.4), (90.7, 0.3), (93.9, 0.4), (95.1, 0.3)),
        "flickr30": _row((53.6, 0.9), (60.7, 1.2), (55.9, 1.3), (56.8, 0.5), (56.9, 0.7)),
        "vqav2": _row((45.1, 0.1), (49.0, 0.0), (48.3, 0.0), (45.5, 0.1), (43.0, 0.2)),
        "ok_vqa": _row((30.7, 0.1), (35.1, 0.0), (33.9, 0.1), (28.5, 0.2), (26.4, 0.2)),
        "textvqa": _row((21.0, 0.3), (25.9, 0.0), (21.3, 0.2), (18.2, 0.4), (14.1, 0.2)),
        "vizwiz": _row((18.8, 0.1), (26.6, 0.5), (28.8, 0.4), (24.6, 0.2), (23.1, 1.1)),
        "hateful_memes": _row((52.3, 2.3), (51.5, 1.4), (55.2, 0.8), (54.5, 1.3), (52.2, 1.2)),
    },
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": {
        "coco": _row((81.2, 0.3), (85.8, 0.5), (94.8, 0.2), (98.0, 0.3), (99.2, 0.3)),
        "flickr30": _row((55.6, 1.3), (61.2, 0.5), (59.0, 1.0), (54.8, 1.0), (53.0, 0.5)),
        "vqav2": _row((46.9, 0.0), (49.0, 0.0), (47.4, 0.0), (45.1, 0.1), (47.3, 0.0)),
        "ok_vqa": _row((31.7, 0.1), (34.6, 0.0), (33.7, 0.2), (31.3, 0.1), (34.7, 0.3)),
        "textvqa": _row((21.1, 0.4), (27.2, 0.3), (25.1, 0.2), (23.2, 0.1), (23.2, 0.2)),
        "vizwiz": _row((21.5, 0.2), (26.5, 0.4), (29.1, 0.2), (31.0, 0.6), (31.3, 0.2)),
        "hateful_memes": _row((53.1, 2.2), (54.9, 1.1), (58.5, 0.3), (56.9, 1.5), (54.9, 1.1)),
    },
    "OpenFlamingo-9B-vitl-mpt7b": {
        "coco": _row((79.5, 0.2), (89.0, 0.3), (96.3, 0.1), (98.8, 0.7), (99.5, 0.1)),
        "flickr30": _row((59.5, 1.0), (65.8, 0.6), (62.9, 1.0), (62.8, 1.0), (61.3, 0.7)),
        "vqav2": _row((52.7, 0.2), (54.8, 0.0), (54.8, 0.0), (54.3, 0.0), (53.3, 0.1)),
        "ok_vqa": _row((37.8, 0.2), (40.1, 0.1), (41.1, 0.2), (42.7, 0.2), (42.4, 0.0)),
        "textvqa": _row((24.2, 0.5), (28.2, 0.4), (29.1, 0.1), (27.3, 0.1), (23.8, 0.2)),
        "vizwiz": _row((27.5, 0.2), (34.1, 0.7), (38.5, 0.1), (42.5, 0.4), (44.0, 0.5)),
        "hateful_memes": _row((51.6, 1.8), (54.0, 2.0), (54.7, 2.8), (53.9, 3.1), (53.8, 2.1)),
    },
}

#: release name -> URL of the table its figures were transcribed from.
SOURCES: dict[str, str] = {name: f"{_REPORT} (Table 11)" for name in PUBLISHED}

#: release name -> its Hugging Face model card (not the transcription source; see the module docstring).
MODEL_CARDS: dict[str, str] = {name: f"https://huggingface.co/openflamingo/{name}" for name in PUBLISHED}


def published_scores(release_name: str) -> dict[tuple[str, int], float]:
    """
    The published mean scores of one release, as {(benchmark key, shots): mean}.

    Args:
        release_name: a key of `PUBLISHED`, e.g. "OpenFlamingo-9B-vitl-mpt7b".

    Raises:
        ValueError: `release_name` is not a known release; the message lists the known ones.
    """
    try:
        table = PUBLISHED[release_name]
    except (KeyError, TypeError):
        raise ValueError(
            f"No published scores for OpenFlamingo release {release_name!r}. Known releases: {', '.join(PUBLISHED)}."
        ) from None
    return {(benchmark, shots): mean for benchmark, row in table.items() for shots, (mean, _std) in row.items()}
