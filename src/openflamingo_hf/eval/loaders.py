"""
Loaders for the eight OpenFlamingo few-shot evaluation datasets, each in its standard local format, as `EvalExample`s.

COCO and Flickr30K (Karpathy splits), VQAv2, OK-VQA, TextVQA, VizWiz (VQA-format question and annotation files),
Hateful Memes (JSONL) and ImageNet (class folders), plus the same data as a `datasets` folder or Hub repository.
The loaders follow the semantics of the original `open_flamingo/eval/eval_datasets.py`. They return image paths and
never open the images, but a missing image folder is an error. Every malformed file raises `BenchmarkFormatError`,
whose message names the file, the record (index and id where known), the field and what was expected.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from .example import EvalExample

__all__ = [
    "BenchmarkFormatError",
    "load_karpathy_captions",
    "load_coco_references",
    "load_vqa",
    "load_hateful_memes",
    "load_imagenet",
    "load_hf_dataset",
    "subsample",
    "query_set",
]

VQA_DATASETS = ("vqav2", "okvqa", "textvqa", "vizwiz")
# The file endings torchvision's ImageFolder accepts (compared case-insensitively, as there).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BenchmarkFormatError(ValueError):
    """A benchmark file or folder that does not have the expected format."""


# ----------------------------------------------------------------------------------------------------------- helpers


def _where(source: object, index: int | None = None, record_id: object = None, field: str | None = None) -> str:
    where = str(source)
    if index is not None:
        where += f": record {index}" + (f" (id {record_id!r})" if record_id is not None else "")
    if field is not None:
        where += f": field {field!r}"
    return where


def _fail(source: object, expected: str, index: int | None = None, record_id: object = None,
          field: str | None = None) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{_where(source, index, record_id, field)}: expected {expected}")


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", str: "a string", list: "a list", dict: "an object"}.get(t, t.__name__)
                       for t in types)


def _field(record: Any, key: str, types: type | tuple[type, ...], source: object, index: int,
           record_id: object = None) -> Any:
    """`record[key]`, checked to be of `types` (bool never counts as an integer)."""
    if not isinstance(record, dict):
        raise _fail(source, f"an object, got {type(record).__name__}", index, record_id)
    if key not in record:
        raise _fail(source, f"{_type_name(types)}, but the field is missing", index, record_id, key)
    value = record[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                                                  else (types,))):
        raise _fail(source, f"{_type_name(types)}, got {value!r}", index, record_id, key)
    return value


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkFormatError(f"{path}: expected a readable JSON file ({type(e).__name__}: {e})") from e


def _top_list(data: Any, key: str, path: object) -> list:
    if not isinstance(data, dict) or key not in data:
        raise _fail(path, f"a JSON object with a top-level {key!r} list", field=key)
    if not isinstance(data[key], list):
        raise _fail(path, f"a list, got {type(data[key]).__name__}", field=key)
    return data[key]


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    if not Path(path).is_dir():
        raise BenchmarkFormatError(f"{path}: expected the {what} folder, but it does not exist or is not a folder")
    return Path(path)


# ------------------------------------------------------------------------------------------------------- captioning


def load_karpathy_captions(json_path: str | os.PathLike, train_image_dir: str | os.PathLike,
                           val_image_dir: str | os.PathLike | None = None, split: str = "train",
                           dataset: str = "coco") -> list[EvalExample]:
    """
    COCO or Flickr30K captions from Karpathy's split file (`dataset_coco.json`, `dataset_flickr30k.json`):
    `{"images": [{"filename", "split", "sentences": [{"raw": ...}, ...], "cocoid" (COCO), "filepath" (COCO)}]}`.

    `split="train"` keeps the records marked "train" (as the original's CaptionDataset; "restval" is not used),
    `split="test"` the "test" records. COCO images lie in `train_image_dir` when `filepath` is "train2014", else in
    `val_image_dir`; Flickr images in `train_image_dir/filename`. `id` is the cocoid (COCO) or the file name's stem
    (Flickr).
    """
    if dataset not in ("coco", "flickr"):
        raise ValueError(f"dataset must be 'coco' or 'flickr', got {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    keep = {"train": {"train"}, "test": {"test"}}[split]
    train_dir = _require_dir(train_image_dir, "train image")
    val_dir = _require_dir(val_image_dir, "val image") if val_image_dir is not None else None
    examples = []
    for i, rec in enumerate(_top_list(_read_json(json_path), "images", json_path)):
        filename = _field(rec, "filename", str, json_path, i)
        if _field(rec, "split", str, json_path, i, filename) not in keep:
            continue
        if dataset == "coco":
            record_id = str(_field(rec, "cocoid", int, json_path, i, filename))
            if _field(rec, "filepath", str, json_path, i, filename) == "train2014":
                image_dir = train_dir
            elif val_dir is None:
                raise _fail(json_path, "'train2014', or a val_image_dir for the other images, got "
                            f"{rec['filepath']!r}", i, filename, "filepath")
            else:
                image_dir = val_dir
        else:
            record_id, image_dir = Path(filename).stem, train_dir
        examples.append(EvalExample(id=record_id, image=str(image_dir / filename),
                                    captions=_sentences(rec, json_path, i, filename)))
    return examples


def _sentences(rec: dict, source: object, index: int, record_id: object) -> list[str]:
    sentences = _field(rec, "sentences", list, source, index, record_id)
    if not sentences:
        raise _fail(source, "a non-empty list of sentences", index, record_id, "sentences")
    captions = []
    for j, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
            raise _fail(source, f"{{\"raw\": <string>}} sentences, got {sentence!r}", index, record_id,
                        f"sentences[{j}].raw")
        captions.append(sentence["raw"])
    return captions


def load_coco_references(annotations_json_path: str | os.PathLike) -> dict[str, list[str]]:
    """
    Reference captions per image from a COCO captions annotation file (`captions_val2014.json`, or the Karpathy
    test references): `{"annotations": [{"image_id": int or str, "caption": str}, ...]}` → `{str(image_id): [...]}`,
    captions in file order.
    """
    path = annotations_json_path
    references: dict[str, list[str]] = {}
    for i, rec in enumerate(_top_list(_read_json(path), "annotations", path)):
        image_id = _field(rec, "image_id", (int, str), path, i, rec.get("id") if isinstance(rec, dict) else None)
        caption = _field(rec, "caption", str, path, i, image_id)
        references.setdefault(str(image_id), []).append(caption)
    return references


# -------------------------------------------------------------------------------------------------------------- VQA


def load_vqa(image_dir: str | os.PathLike, questions_json_path: str | os.PathLike,
             annotations_json_path: str | os.PathLike | None = None, dataset: str = "vqav2",
             is_train: bool = False) -> list[EvalExample]:
    """
    VQAv2, OK-VQA, TextVQA or VizWiz in the VQA format: questions `{"questions": [{"image_id", "question",
    "question_id"}], "data_subtype"?}` and, optionally, annotations `{"annotations": [{"question_id", "answers":
    [{"answer": str}, ...]}]}` (every question must have one). Image paths, as the original's `get_img_path`:
    VQAv2/OK-VQA `image_dir/COCO_{subtype}_{image_id:012d}.jpg` (subtype from the questions' `data_subtype`, e.g.
    "val2014" or "test2015", else "train2014"/"val2014" by `is_train`); VizWiz `image_dir/image_id`; TextVQA
    `image_dir/{image_id}.jpg`. `id` is the question_id; `answers` all annotator answers in order ([] without
    annotations).
    """
    dataset = {"ok_vqa": "okvqa", "vqa": "vqav2"}.get(dataset, dataset)
    if dataset not in VQA_DATASETS:
        raise ValueError(f"dataset must be one of {VQA_DATASETS}, got {dataset!r}")
    root = _require_dir(image_dir, f"{dataset} image")
    data = _read_json(questions_json_path)
    questions = _top_list(data, "questions", questions_json_path)
    subtype = _coco_subtype(data, questions_json_path, is_train)
    answers = _vqa_answers(annotations_json_path) if annotations_json_path is not None else None
    examples = []
    for i, rec in enumerate(questions):
        qid = _field(rec, "question_id", (int, str), questions_json_path, i)
        question = _field(rec, "question", str, questions_json_path, i, qid)
        if dataset in ("vqav2", "okvqa"):
            image = root / f"COCO_{subtype}_{_field(rec, 'image_id', int, questions_json_path, i, qid):012d}.jpg"
        elif dataset == "vizwiz":
            image = root / _field(rec, "image_id", str, questions_json_path, i, qid)
        else:
            image = root / f"{_field(rec, 'image_id', (str, int), questions_json_path, i, qid)}.jpg"
        if answers is not None and str(qid) not in answers:
            raise _fail(annotations_json_path, f"an annotation for question {qid!r} (record {i} of "
                        f"{questions_json_path}), but there is none", field="question_id")
        examples.append(EvalExample(id=str(qid), image=str(image), question=question,
                                    answers=list(answers[str(qid)]) if answers is not None else []))
    return examples


def _coco_subtype(data: dict, path: object, is_train: bool) -> str:
    subtype = data.get("data_subtype")
    if subtype is None:
        return "train2014" if is_train else "val2014"
    if not isinstance(subtype, str) or not subtype.startswith(("train", "val", "test")):
        raise _fail(path, f"a COCO subtype such as 'train2014', 'val2014' or 'test2015', got {subtype!r}",
                    field="data_subtype")
    return "test2015" if subtype.startswith("test") else subtype  # test-dev2015 images are in test2015


def _vqa_answers(path: str | os.PathLike) -> dict[str, list[str]]:
    answers: dict[str, list[str]] = {}
    for i, rec in enumerate(_top_list(_read_json(path), "annotations", path)):
        qid = _field(rec, "question_id", (int, str), path, i)
        items = _field(rec, "answers", list, path, i, qid)
        for j, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("answer"), str):
                raise _fail(path, f"{{\"answer\": <string>}} items, got {item!r}", i, qid, f"answers[{j}].answer")
        if str(qid) in answers:
            raise _fail(path, f"one annotation per question, but question {qid!r} has several", i, qid,
                        "question_id")
        answers[str(qid)] = [item["answer"] for item in items]
    return answers


# --------------------------------------------------------------------------------------------------- classification


def load_hateful_memes(image_dir: str | os.PathLike, annotations_jsonl_path: str | os.PathLike) -> list[EvalExample]:
    """
    Hateful Memes from its JSONL annotations (`train.jsonl`, `dev_seen.jsonl`, `test_seen.jsonl`), one object a line:
    `{"id": int or str, "img": "img/42953.png", "label": 0 or 1, "text": str}` (blank lines skipped). The image is
    `image_dir/basename(img)`; `label` is "yes" (hateful, 1) or "no" (0); `ocr` the meme's text; `id` str(id).
    """
    path = annotations_jsonl_path
    root = _require_dir(image_dir, "Hateful Memes image")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkFormatError(f"{path}: expected a readable JSONL file ({type(e).__name__}: {e})") from e
    examples = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, f"one JSON object a line (line {i + 1}: {e})", i) from e
        meme_id = _field(rec, "id", (int, str), path, i)
        img = _field(rec, "img", str, path, i, meme_id)
        label = _field(rec, "label", int, path, i, meme_id)
        if label not in (0, 1):
            raise _fail(path, f"0 or 1, got {label!r}", i, meme_id, "label")
        examples.append(EvalExample(id=str(meme_id), image=str(root / img.split("/")[-1]),
                                    label="yes" if label == 1 else "no",
                                    ocr=_field(rec, "text", str, path, i, meme_id)))
    return examples


def load_imagenet(root_or_split_dir: str | os.PathLike,
                  class_names: Sequence[str] | Mapping[str, str] | str | os.PathLike | None = None,
                  split: str | None = None) -> list[EvalExample]:
    """
    ImageNet in the class-folder layout of torchvision's ImageFolder: `split_dir/<wnid>/<images>` (the folder given,
    or `root/split` when `split` is given, e.g. "val"). Classes are the sub-folders in sorted order; images are the
    files with an ImageFolder extension, walked in sorted order. `label` is the class name: `class_names` is a list
    (index = sorted folder index), a dict folder → name, or the path of a JSON file with either (or the
    `imagenet_class_index.json` form `{"0": [wnid, name], ...}`); default: the folder names. `id` is the path
    relative to the split folder.
    """
    split_dir = _require_dir(Path(root_or_split_dir) / split if split else root_or_split_dir, "ImageNet split")
    folders = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not folders:
        raise BenchmarkFormatError(f"{split_dir}: expected one sub-folder per class, but there are none")
    names = _class_names(class_names, folders)
    examples = []
    for folder, name in zip(folders, names):
        files = [Path(d) / f for d, _, fs in sorted(os.walk(split_dir / folder, followlinks=True))
                 for f in sorted(fs) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise BenchmarkFormatError(f"{split_dir / folder}: expected image files ({', '.join(IMAGE_EXTENSIONS)})"
                                       f" in class folder {folder!r}, but there are none")
        examples += [EvalExample(id=f.relative_to(split_dir).as_posix(), image=str(f), label=name) for f in files]
    return examples


def _class_names(class_names: Sequence[str] | Mapping[str, str] | str | os.PathLike | None,
                 folders: list[str]) -> list[str]:
    """The name of each sorted class folder."""
    source: object = "class_names"
    if class_names is None:
        return list(folders)
    if isinstance(class_names, (str, os.PathLike)):
        source, class_names = class_names, _read_json(class_names)
        if isinstance(class_names, dict) and all(isinstance(v, list) and len(v) == 2 for v in class_names.values()):
            class_names = {str(v[0]): v[1] for v in class_names.values()}  # imagenet_class_index.json
    if isinstance(class_names, Mapping):
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise _fail(source, f"a name for every class folder, but {missing[:5]} have none", field=missing[0])
        names = [class_names[f] for f in folders]
    elif isinstance(class_names, Sequence):
        if len(class_names) != len(folders):
            raise _fail(source, f"one name per class folder ({len(folders)}), got {len(class_names)} names")
        names = list(class_names)
    else:
        raise _fail(source, f"a list or a dict of class names, got {type(class_names).__name__}")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise _fail(source, f"a string class name, got {name!r}", i, folders[i])
    return names


# ---------------------------------------------------------------------------------------------- datasets / the Hub


def load_hf_dataset(path_or_repo: str | os.PathLike, task: str, split: str, image_column: str = "image",
                    id_column: str | None = None, text_column: str | None = None,
                    question_column: str = "question", answers_column: str = "answers",
                    label_column: str = "label", label_names: Sequence[str] | Mapping[Any, str] | None = None,
                    ocr_column: str | None = "text", **load_kwargs: Any) -> list[EvalExample]:
    """
    A benchmark held as a `datasets` folder (`save_to_disk`, read with `load_from_disk`; a DatasetDict is indexed by
    `split`) or a Hub dataset repository (`load_dataset(path_or_repo, split=split, **load_kwargs)`).

    `image_column` holds images (an Image feature: a PIL image, or the file path where the stored image has one) or
    paths. `task` "captioning": `text_column` or the first of "captions", "sentences", "caption" (a string, a list of
    strings or of `{"raw": ...}`); "vqa": `question_column` and `answers_column` (a list of strings or of
    `{"answer": ...}`; [] when absent); "classification": `label_column` (ClassLabel ints become their names, other
    values go through `label_names` or `str`) and `ocr_column` when present (Hateful Memes' text). `id` is
    `id_column`, else the first of "id", "question_id", "image_id", "cocoid" present, else the row index.
    """
    if task not in ("captioning", "vqa", "classification"):
        raise ValueError(f"task must be 'captioning', 'vqa' or 'classification', got {task!r}")
    ds, source = _open_hf(path_or_repo, split, load_kwargs)
    columns = list(ds.column_names)
    if task == "captioning":
        candidates = [text_column] if text_column else ["captions", "sentences", "caption"]
        text_column = next((c for c in candidates if c in columns), candidates[0])
    needed = {"captioning": [text_column], "vqa": [question_column], "classification": [label_column]}[task]
    for column in [image_column, *needed, *([id_column] if id_column else [])]:
        if column not in columns:
            raise _fail(source, f"a column {column!r} for task {task!r}, but the columns are {columns}", field=column)
    id_column = id_column or next((c for c in ("id", "question_id", "image_id", "cocoid") if c in columns), None)
    ds = _undecoded_images(ds, image_column)
    label_feature = ds.features.get(label_column)
    examples = []
    for i, row in enumerate(ds):
        ex = EvalExample(id=str(row[id_column]) if id_column else str(i), image=_hf_image(row[image_column], source, i))
        if task == "captioning":
            ex.captions = _strings(row[text_column], "raw", source, i, ex.id, text_column)
        elif task == "vqa":
            ex.question = row[question_column]
            if answers_column in row and row[answers_column] is not None:
                ex.answers = _strings(row[answers_column], "answer", source, i, ex.id, answers_column)
        else:
            ex.label = _hf_label(row[label_column], label_feature, label_names)
            if ocr_column and ocr_column in row:
                ex.ocr = row[ocr_column]
        examples.append(ex)
    return examples


def _open_hf(path_or_repo: str | os.PathLike, split: str, load_kwargs: dict) -> tuple[Any, str]:
    import datasets

    if Path(path_or_repo).exists():
        try:
            ds = datasets.load_from_disk(str(path_or_repo))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise BenchmarkFormatError(f"{path_or_repo}: expected a folder written by `save_to_disk` ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise _fail(path_or_repo, f"a split {split!r}, but the splits are {list(ds)}", field="split")
            ds = ds[split]
        return ds, str(path_or_repo)
    return datasets.load_dataset(str(path_or_repo), split=split, **load_kwargs), f"{path_or_repo}[{split}]"


def _undecoded_images(ds: Any, image_column: str) -> Any:
    """The dataset with an Image column left undecoded ({"path", "bytes"}), so rows are read without decoding."""
    import datasets

    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _hf_image(value: Any, source: object, index: int) -> object:
    """A path for a path (or a stored image with an existing path), else a lazily opened PIL image."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, dict) and (value.get("path") or value.get("bytes")):
        if value.get("path") and (not value.get("bytes") or Path(value["path"]).is_file()):
            return value["path"]
        import io

        from PIL import Image

        return Image.open(io.BytesIO(value["bytes"]))
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return value
    raise _fail(source, f"an image or an image path, got {type(value).__name__}", index, field="image")


def _strings(value: Any, key: str, source: object, index: int, record_id: str, column: str) -> list[str]:
    """A string, a list of strings, a list of {key: str} or a dict of lists {key: [str, ...]} as a list of str."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get(key), list):
        value = value[key]
    if isinstance(value, list):
        out = [v[key] if isinstance(v, dict) else v for v in value]
        if all(isinstance(v, str) for v in out):
            return out
    raise _fail(source, f"a string, a list of strings or of {{{key!r}: <string>}}, got {value!r}", index,
                record_id, column)


def _hf_label(value: Any, feature: Any, label_names: Sequence[str] | Mapping[Any, str] | None) -> str:
    import datasets

    if label_names is not None:
        return str(label_names[value])
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    return str(value)


# --------------------------------------------------------------------------------------------------------- sampling


def subsample(examples: Sequence[Any], num_samples: int | None, seed: int) -> list:
    """`num_samples` examples drawn with `seed`, without replacement, in their original order (all when
    `num_samples` is None or at least `len(examples)`)."""
    if num_samples is None or num_samples >= len(examples):
        return list(examples)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    indices = sorted(random.Random(seed).sample(range(len(examples)), num_samples))
    return [examples[i] for i in indices]


def query_set(train_examples: Sequence[Any], query_set_size: int = 2048, seed: int = 42) -> list:
    """The demonstration pool: `query_set_size` training examples drawn with `seed` (as the original's
    `get_query_set`; all of them when there are fewer)."""
    return subsample(train_examples, query_set_size, seed)
