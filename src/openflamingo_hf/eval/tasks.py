"""
The eight benchmarks as plain data: how each is prompted and scored (`EVAL_TASKS`) and the `openflamingo-eval` flags
naming its files (`PATH_FLAGS`). This module imports neither torch nor the metrics, so that `openflamingo-eval --help`
and its argument errors answer without loading them; the runner (`evaluate.py`) and the loading (`data.py`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is prompted, answered and scored."""

    name: str
    title: str
    task: str  # a key of the processor's TASK_TEMPLATES
    metric: str  # "cider", "vqa_accuracy", "roc_auc" or "accuracy"
    max_new_tokens: int = 0  # generation benchmarks; 0: answered by ranking class names
    ok_vqa: bool = False  # OK-VQA's answer stemming


EVAL_TASKS = {
    b.name: b
    for b in (
        Benchmark("coco", "COCO", "captioning", "cider", 20),
        Benchmark("flickr30", "Flickr30K", "captioning", "cider", 20),
        Benchmark("vqav2", "VQAv2", "vqa", "vqa_accuracy", 5),
        Benchmark("ok_vqa", "OK-VQA", "vqa", "vqa_accuracy", 5, ok_vqa=True),
        Benchmark("textvqa", "TextVQA", "vqa", "vqa_accuracy", 5),
        Benchmark("vizwiz", "VizWiz", "vqa", "vqa_accuracy", 5),
        Benchmark("hateful_memes", "Hateful Memes", "hateful_memes", "roc_auc"),
        Benchmark("imagenet", "ImageNet", "classification", "accuracy"),
    )
}


@dataclass(frozen=True)
class PathFlag:
    name: str
    help: str
    required: bool = True


def _vqa_flags(name: str, title: str) -> tuple[PathFlag, ...]:
    return tuple(
        PathFlag(f"{name}_{split}_{kind}", f"{title} {split} {what}.")
        for split in ("train", "test")
        for kind, what in (("image_dir_path", "image folder"), ("questions_json_path", "questions JSON"),
                           ("annotations_json_path", "annotations JSON"))
    )


# benchmark -> the flags naming its files (the original evaluate.py's names). Each benchmark may instead be given
# as one `datasets` folder or Hub dataset repo with train and test splits: `--<benchmark>_dataset`.
PATH_FLAGS: dict[str, tuple[PathFlag, ...]] = {
    "coco": (
        PathFlag("coco_karpathy_json_path", "Karpathy split file of COCO (dataset_coco.json)."),
        PathFlag("coco_train_image_dir_path", "COCO train2014 image folder."),
        PathFlag("coco_val_image_dir_path", "COCO val2014 image folder."),
        PathFlag("coco_annotations_json_path", "COCO captions annotations (references for CIDEr); default: the "
                 "Karpathy file's sentences.", required=False),
    ),
    "flickr30": (
        PathFlag("flickr_karpathy_json_path", "Karpathy split file of Flickr30K (dataset_flickr30k.json)."),
        PathFlag("flickr_image_dir_path", "Flickr30K image folder."),
        PathFlag("flickr_annotations_json_path", "COCO-style references (optional; default: the Karpathy file's "
                 "sentences).", required=False),
    ),
    "vqav2": _vqa_flags("vqav2", "VQAv2"),
    "ok_vqa": _vqa_flags("ok_vqa", "OK-VQA"),
    "vizwiz": _vqa_flags("vizwiz", "VizWiz"),
    "textvqa": (
        PathFlag("textvqa_image_dir_path", "TextVQA image folder (train and val images)."),
        *(flag for flag in _vqa_flags("textvqa", "TextVQA") if "image_dir" not in flag.name),
    ),
    "hateful_memes": (
        PathFlag("hateful_memes_image_dir_path", "Hateful Memes img/ folder."),
        PathFlag("hateful_memes_train_annotations_json_path", "Hateful Memes train.jsonl."),
        PathFlag("hateful_memes_test_annotations_json_path", "Hateful Memes evaluation JSONL (e.g. dev_seen.jsonl)."),
    ),
    "imagenet": (
        PathFlag("imagenet_root", "ImageNet root holding train/ and val/ class folders."),
        PathFlag("imagenet_class_names_path", "JSON list (sorted folder order) or folder -> name map of class "
                 "names; default: the folder names.", required=False),
    ),
}


def missing_paths(name: str, values: dict) -> list[str]:
    """The required flags of benchmark `name` that `values` leaves unset (none when its `_dataset` is given)."""
    if values.get(f"{name}_dataset"):
        return []
    return [f"--{flag.name}" for flag in PATH_FLAGS[name] if flag.required and not values.get(flag.name)]


__all__ = ["EVAL_TASKS", "PATH_FLAGS", "Benchmark", "PathFlag", "missing_paths"]
