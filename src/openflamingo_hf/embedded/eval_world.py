"""
The embedded world written as the eight evaluation datasets, in each dataset's own file format, so that
`openflamingo-eval` runs end to end offline (and on a model that gives non-trivial scores):

    coco, flickr30            Karpathy JSON + image folders; captions are the world's captions
    vqav2, ok_vqa, textvqa,   VQA questions / annotations JSON (10 identical annotator answers) + image folders
    vizwiz
    hateful_memes             JSONL (`id`, `img`, `label`, `text`): the text is a caption, "hateful" (label 1)
                              when it is wrong about the image
    imagenet                  class folders, one per caption ("two red circles"), PNG files

`write_world_benchmarks` returns the `openflamingo-eval` flags that point at the files.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .world import HELD_OUT_SEED_START, Example, make_examples


def _save(example: Example, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    example.image.save(path, format="PNG")  # PNG content whatever the extension (PIL reads by content)
    return path


def _karpathy(folder: str, name: str, train: list[Example], test: list[Example], coco: bool) -> dict[str, str]:
    images, flags = [], {}
    for split, examples in (("train", train), ("test", test)):
        for example in examples:
            number = len(images)
            if coco:
                subdir = "train2014" if split == "train" else "val2014"
                filename = f"COCO_{subdir}_{number:012d}.jpg"
                _save(example, os.path.join(folder, name, subdir, filename))
                record = {"filepath": subdir, "filename": filename, "cocoid": number}
            else:
                filename = f"{number}.jpg"
                _save(example, os.path.join(folder, name, "images", filename))
                record = {"filepath": "", "filename": filename, "imgid": number}
            images.append({**record, "split": split, "sentences": [{"raw": example.caption}]})
    path = os.path.join(folder, name, f"dataset_{name}.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"images": images, "dataset": name}, file)
    if coco:
        flags.update(coco_karpathy_json_path=path, coco_train_image_dir_path=os.path.join(folder, name, "train2014"),
                     coco_val_image_dir_path=os.path.join(folder, name, "val2014"))
    else:
        flags.update(flickr_karpathy_json_path=path, flickr_image_dir_path=os.path.join(folder, name, "images"))
    return flags


def _vqa(folder: str, name: str, train: list[Example], test: list[Example]) -> dict[str, str]:
    flags = {}
    for split, examples in (("train", train), ("test", test)):
        subtype = "train2014" if split == "train" else "val2014"
        # TextVQA keeps train and val images in one folder (one flag), the others one folder per split.
        image_dir = os.path.join(folder, name, "images" if name == "textvqa" else subtype)
        questions, annotations = [], []
        for index, example in enumerate(examples):
            image_id = index + (0 if split == "train" else 100_000)
            if name in ("vqav2", "ok_vqa"):
                filename = f"COCO_{subtype}_{image_id:012d}.jpg"
                image_field = image_id
            elif name == "textvqa":
                filename, image_field = f"{image_id}.jpg", str(image_id)
            else:  # vizwiz: the image id is the file name
                filename = image_field = f"VizWiz_{split}_{image_id:08d}.jpg"
            _save(example, os.path.join(image_dir, filename))
            question_id = image_id * 10
            questions.append({"image_id": image_field, "question": example.question, "question_id": question_id})
            annotations.append({"question_id": question_id, "image_id": image_field,
                                "answers": [{"answer": example.answer, "answer_id": i + 1} for i in range(10)]})
        questions_path = os.path.join(folder, name, f"{split}_questions.json")
        annotations_path = os.path.join(folder, name, f"{split}_annotations.json")
        with open(questions_path, "w", encoding="utf-8") as file:
            json.dump({"questions": questions, "data_subtype": subtype}, file)
        with open(annotations_path, "w", encoding="utf-8") as file:
            json.dump({"annotations": annotations, "data_subtype": subtype}, file)
        flags[f"{name}_image_dir_path" if name == "textvqa" else f"{name}_{split}_image_dir_path"] = image_dir
        flags[f"{name}_{split}_questions_json_path"] = questions_path
        flags[f"{name}_{split}_annotations_json_path"] = annotations_path
    return flags


def _hateful_memes(folder: str, train: list[Example], test: list[Example], rng: np.random.Generator) -> dict:
    flags = {"hateful_memes_image_dir_path": os.path.join(folder, "hateful_memes", "img")}
    captions = sorted({e.caption for e in make_examples(400, HELD_OUT_SEED_START - 1, draw_images=False)})
    for split, examples in (("train", train), ("test", test)):
        lines = []
        for index, example in enumerate(examples):
            meme_id = index + (0 if split == "train" else 50_000)
            wrong = bool(rng.integers(2))
            text = str(rng.choice([c for c in captions if c != example.caption])) if wrong else example.caption
            _save(example, os.path.join(flags["hateful_memes_image_dir_path"], f"{meme_id:05d}.png"))
            lines.append(json.dumps({"id": meme_id, "img": f"img/{meme_id:05d}.png", "label": int(wrong),
                                     "text": text.rstrip(".")}))
        path = os.path.join(folder, "hateful_memes", f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        flags[f"hateful_memes_{split}_annotations_json_path"] = path
    return flags


def _imagenet(folder: str, train: list[Example], test: list[Example]) -> dict[str, str]:
    root = os.path.join(folder, "imagenet")
    for split, examples in (("train", train), ("val", test)):
        for index, example in enumerate(examples):
            _save(example, os.path.join(root, split, example.caption.rstrip("."), f"{split}_{index:05d}.png"))
    return {"imagenet_root": root}


def write_world_benchmarks(folder: str, num_train: int = 64, num_test: int = 32,
                           seed: int = HELD_OUT_SEED_START + 5000) -> dict[str, str]:
    """Writes the eight benchmarks of the world (held-out seeds) under `folder`; returns `openflamingo-eval` flags
    (option name without `--` -> path)."""
    rng = np.random.default_rng(seed)
    flags: dict[str, str] = {}
    for offset, name in enumerate(("coco", "flickr30", "vqav2", "ok_vqa", "textvqa", "vizwiz", "hateful_memes",
                                   "imagenet")):
        train = make_examples(num_train, seed + 2 * offset)
        test = make_examples(num_test, seed + 2 * offset + 1)
        if name in ("coco", "flickr30"):
            flags.update(_karpathy(folder, name if name == "coco" else "flickr30", train, test, coco=name == "coco"))
        elif name == "hateful_memes":
            flags.update(_hateful_memes(folder, train, test, rng))
        elif name == "imagenet":
            flags.update(_imagenet(folder, train, test))
        else:
            flags.update(_vqa(folder, name, train, test))
    return flags
