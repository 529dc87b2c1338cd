"""Where each benchmark's files are (the `openflamingo-eval` flags, as data) and how its two splits are loaded."""

from __future__ import annotations

from dataclasses import dataclass

from .evaluate import EVAL_TASKS, BenchmarkData


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


def load_benchmark_data(name: str, values: dict) -> BenchmarkData:
    """Both splits of benchmark `name` from the flags' `values` (option name -> value)."""
    from . import loaders

    task = EVAL_TASKS[name].task
    if values.get(f"{name}_dataset"):
        kind = {"captioning": "captioning", "vqa": "vqa"}.get(task, "classification")
        source = values[f"{name}_dataset"]
        return BenchmarkData(loaders.load_hf_dataset(source, kind, "train"),
                             loaders.load_hf_dataset(source, kind, "test"))
    v = values
    if name in ("coco", "flickr30"):
        prefix, dataset = ("coco", "coco") if name == "coco" else ("flickr", "flickr")
        image_dirs = ((v["coco_train_image_dir_path"], v["coco_val_image_dir_path"]) if name == "coco"
                      else (v["flickr_image_dir_path"], None))
        splits = [loaders.load_karpathy_captions(v[f"{prefix}_karpathy_json_path"], *image_dirs, split=split,
                                                 dataset=dataset) for split in ("train", "test")]
        references_path = v.get(f"{prefix}_annotations_json_path")
        references = loaders.load_coco_references(references_path) if references_path else None
        return BenchmarkData(*splits, references=references)
    if task == "vqa":
        splits = []
        for split in ("train", "test"):
            image_dir = v["textvqa_image_dir_path"] if name == "textvqa" else v[f"{name}_{split}_image_dir_path"]
            splits.append(loaders.load_vqa(image_dir, v[f"{name}_{split}_questions_json_path"],
                                           v[f"{name}_{split}_annotations_json_path"],
                                           dataset=name.replace("_", ""), is_train=split == "train"))
        return BenchmarkData(*splits)
    if name == "hateful_memes":
        return BenchmarkData(*(loaders.load_hateful_memes(v["hateful_memes_image_dir_path"],
                                                          v[f"hateful_memes_{split}_annotations_json_path"])
                               for split in ("train", "test")))
    import os

    class_names = v.get("imagenet_class_names_path")
    _check_class_folders(os.path.join(v["imagenet_root"], "val"), class_names)
    train = loaders.load_imagenet(os.path.join(v["imagenet_root"], "train"), class_names)
    test = loaders.load_imagenet(os.path.join(v["imagenet_root"], "val"), class_names)
    return BenchmarkData(train, test)  # the classes: the labels of both splits (`evaluate._class_names`)


def _check_class_folders(split_dir: str, class_names: str | None) -> None:
    """ImageNet's own folders are WordNet ids (n01440764): ranking those as class names would score nonsense."""
    import os
    import re

    if class_names is None and os.path.isdir(split_dir):
        folders = [name for name in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, name))]
        if folders and all(re.fullmatch(r"n\d{8}", name) for name in folders):
            raise ValueError(
                f"{split_dir}: the class folders are WordNet ids (e.g. {sorted(folders)[0]}); pass "
                "--imagenet_class_names_path, a JSON list of the class names in sorted folder order (the original "
                "used OpenAI's CLIP ImageNet class names) or a folder -> name map."
            )
