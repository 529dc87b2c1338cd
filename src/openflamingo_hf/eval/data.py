"""How each benchmark's two splits are loaded from the `openflamingo-eval` flags naming its files
(`tasks.PATH_FLAGS`)."""

from __future__ import annotations

from .example import BenchmarkData
from .tasks import EVAL_TASKS


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
