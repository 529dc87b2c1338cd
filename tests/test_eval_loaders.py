"""
Tests of the benchmark loaders (offline, tiny fixtures written in each benchmark's real format into tmp_path).

Each loader is checked against the exact EvalExamples a hand-written fixture must give; each malformed file must raise
BenchmarkFormatError with a message naming the file and the field.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from openflamingo_hf.eval.loaders import (
    BenchmarkFormatError,
    load_coco_references,
    load_hateful_memes,
    load_hf_dataset,
    load_imagenet,
    load_karpathy_captions,
    load_vqa,
    query_set,
    subsample,
)
from openflamingo_hf.eval.example import EvalExample


def write_png(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------------- captioning


def coco_karpathy() -> dict:
    def rec(cocoid, filepath, split, *raws):
        return {"filepath": filepath, "filename": f"COCO_{filepath}_{cocoid:012d}.jpg", "split": split,
                "cocoid": cocoid, "imgid": cocoid % 100, "sentids": [1],
                "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raws]}

    return {"dataset": "coco", "images": [
        rec(9, "train2014", "train", "A cat.", "A small cat."),
        rec(42, "val2014", "restval", "A dog."),
        rec(7, "val2014", "val", "A bird."),
        rec(5, "val2014", "test", "A car.", "A red car."),
    ]}


@pytest.fixture
def coco_dirs(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    return tmp_path / "train2014", tmp_path / "val2014"


def test_karpathy_coco_train_is_the_train_split_only(tmp_path, coco_dirs):
    path = write_json(tmp_path / "dataset_coco.json", coco_karpathy())
    train, val = coco_dirs
    got = load_karpathy_captions(path, train, val, split="train", dataset="coco")
    assert got == [
        EvalExample(id="9", image=str(train / "COCO_train2014_000000000009.jpg"), captions=["A cat.", "A small cat."]),
    ]  # the restval record (id 42) is not a demonstration candidate, as in the original
    assert load_karpathy_captions(path, train, val, split="test", dataset="coco") == [
        EvalExample(id="5", image=str(val / "COCO_val2014_000000000005.jpg"), captions=["A car.", "A red car."]),
    ]


def test_karpathy_flickr(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "Two men."}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "A man."}, {"raw": "Men."}]},
        {"filename": "1000268201.jpg", "imgid": 2, "split": "val", "sentences": [{"raw": "A girl."}]},
        {"filename": "1000344755.jpg", "imgid": 3, "split": "restval", "sentences": [{"raw": "Not train."}]},
    ]}
    path = write_json(tmp_path / "dataset_flickr30k.json", data)
    assert load_karpathy_captions(path, images, split="train", dataset="flickr") == [
        EvalExample(id="1000092795", image=str(images / "1000092795.jpg"), captions=["Two men."])]
    assert load_karpathy_captions(path, images, split="test", dataset="flickr") == [
        EvalExample(id="10002456", image=str(images / "10002456.jpg"), captions=["A man.", "Men."])]


def _drop(key):
    def edit(data):
        del data["images"][0][key]
    return edit


def _set(key, value):
    def edit(data):
        data["images"][0][key] = value
    return edit


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.pop("images"), "images"),
    (lambda d: d.update(images={"a": 1}), "images"),
    (_drop("filename"), "filename"),
    (_drop("split"), "split"),
    (_drop("cocoid"), "cocoid"),
    (_set("cocoid", "9"), "cocoid"),
    (_drop("filepath"), "filepath"),
    (_drop("sentences"), "sentences"),
    (_set("sentences", []), "sentences"),
    (_set("sentences", [{"tokens": ["a"]}]), "sentences[0].raw"),
    (_set("sentences", [{"raw": 3}]), "sentences[0].raw"),
])
def test_karpathy_malformed(tmp_path, coco_dirs, edit, field):
    data = coco_karpathy()
    edit(data)
    path = write_json(tmp_path / "dataset_coco.json", data)
    with pytest.raises(BenchmarkFormatError) as info:
        load_karpathy_captions(path, *coco_dirs, split="train")
    assert "dataset_coco.json" in str(info.value) and repr(field) in str(info.value)
    if field != "images":
        assert "record 0" in str(info.value)


def test_karpathy_unreadable_and_missing_dirs(tmp_path, coco_dirs):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(BenchmarkFormatError, match="broken.json"):
        load_karpathy_captions(bad, *coco_dirs)
    path = write_json(tmp_path / "dataset_coco.json", coco_karpathy())
    with pytest.raises(BenchmarkFormatError, match="nowhere"):
        load_karpathy_captions(path, tmp_path / "nowhere", coco_dirs[1])
    with pytest.raises(BenchmarkFormatError, match=r"record \d+.*'filepath'.*val_image_dir"):
        load_karpathy_captions(path, coco_dirs[0], None, split="test")


def test_coco_references(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", {"images": [], "annotations": [
        {"image_id": 5, "id": 1, "caption": "A car."},
        {"image_id": 7, "id": 2, "caption": "A bird."},
        {"image_id": 5, "id": 3, "caption": "A red car."},
    ]})
    assert load_coco_references(path) == {"5": ["A car.", "A red car."], "7": ["A bird."]}


@pytest.mark.parametrize("data,field", [
    ({"images": []}, "annotations"),
    ({"annotations": [{"id": 1, "caption": "x"}]}, "image_id"),
    ({"annotations": [{"image_id": 1, "caption": None}]}, "caption"),
])
def test_coco_references_malformed(tmp_path, data, field):
    path = write_json(tmp_path / "captions_val2014.json", data)
    with pytest.raises(BenchmarkFormatError, match=rf"captions_val2014\.json.*'{field}'"):
        load_coco_references(path)


# -------------------------------------------------------------------------------------------------------------- VQA


def vqa_files(tmp_path, questions, answers, subtype="val2014"):
    q = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}
    if subtype is not None:
        q["data_subtype"] = subtype
    a = {"annotations": [{"question_id": qid, "image_id": 0, "answers": [
        {"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(xs)]}
        for qid, xs in answers]}
    return write_json(tmp_path / "questions.json", q), write_json(tmp_path / "annotations.json", a)


COCO_QUESTIONS = [{"image_id": 42, "question": "What color?", "question_id": 420},
                  {"image_id": 9, "question": "How many?", "question_id": 91}]
COCO_ANSWERS = [(91, ["2", "two", "2"]), (420, ["red", "red"])]  # out of order: matched by question_id


@pytest.mark.parametrize("dataset", ["vqav2", "okvqa"])
def test_vqa_coco_subtype_from_file(tmp_path, dataset):
    q, a = vqa_files(tmp_path, COCO_QUESTIONS, COCO_ANSWERS, subtype="val2014")
    got = load_vqa(tmp_path, q, a, dataset=dataset, is_train=True)  # data_subtype wins over is_train
    assert got == [
        EvalExample(id="420", image=str(tmp_path / "COCO_val2014_000000000042.jpg"), question="What color?",
                    answers=["red", "red"]),
        EvalExample(id="91", image=str(tmp_path / "COCO_val2014_000000000009.jpg"), question="How many?",
                    answers=["2", "two", "2"]),
    ]


@pytest.mark.parametrize("subtype,is_train,prefix", [
    (None, True, "COCO_train2014_"), (None, False, "COCO_val2014_"), ("test-dev2015", False, "COCO_test2015_"),
])
def test_vqa_coco_subtype_fallback(tmp_path, subtype, is_train, prefix):
    q, _ = vqa_files(tmp_path, COCO_QUESTIONS, [], subtype=subtype)
    got = load_vqa(tmp_path, q, None, dataset="vqav2", is_train=is_train)  # no annotations: answers []
    assert [(e.id, e.image, e.answers) for e in got] == [
        ("420", str(tmp_path / f"{prefix}000000000042.jpg"), []),
        ("91", str(tmp_path / f"{prefix}000000000009.jpg"), []),
    ]


def test_vqa_vizwiz_and_textvqa(tmp_path):
    q, a = vqa_files(tmp_path, [{"image_id": "VizWiz_val_00000000.jpg", "question": "What is this?",
                                 "question_id": 0}], [(0, ["soup", "unanswerable"])], subtype=None)
    assert load_vqa(tmp_path, q, a, dataset="vizwiz") == [EvalExample(
        id="0", image=str(tmp_path / "VizWiz_val_00000000.jpg"), question="What is this?",
        answers=["soup", "unanswerable"])]
    q, a = vqa_files(tmp_path, [{"image_id": "003a8ae2ef43b901", "question": "What brand?",
                                 "question_id": 34602}], [(34602, ["nokia"])], subtype=None)
    assert load_vqa(tmp_path, q, a, dataset="textvqa") == [EvalExample(
        id="34602", image=str(tmp_path / "003a8ae2ef43b901.jpg"), question="What brand?", answers=["nokia"])]


@pytest.mark.parametrize("questions,answers,file,field", [
    ([{"image_id": 42, "question_id": 420}], [(420, ["a"])], "questions.json", "question"),
    ([{"question": "q", "question_id": 420}], [(420, ["a"])], "questions.json", "image_id"),
    ([{"image_id": "42", "question": "q", "question_id": 420}], [(420, ["a"])], "questions.json", "image_id"),
    ([{"image_id": 42, "question": "q"}], [(420, ["a"])], "questions.json", "question_id"),
    ([{"image_id": 42, "question": "q", "question_id": 421}], [(420, ["a"])], "annotations.json", "question_id"),
    ([{"image_id": 42, "question": "q", "question_id": 420}], [(420, ["a"]), (420, ["b"])], "annotations.json",
     "question_id"),
    ([{"image_id": 42, "question": "q", "question_id": 420}], [(420, [7])], "annotations.json", "answers[0].answer"),
])
def test_vqa_malformed(tmp_path, questions, answers, file, field):
    q, a = vqa_files(tmp_path, questions, answers)
    with pytest.raises(BenchmarkFormatError) as info:
        load_vqa(tmp_path, q, a, dataset="vqav2")
    assert file in str(info.value) and repr(field) in str(info.value)


def test_vqa_missing_keys_and_dir(tmp_path):
    q, a = vqa_files(tmp_path, COCO_QUESTIONS, COCO_ANSWERS)
    write_json(tmp_path / "a2.json", {"questions": []})
    with pytest.raises(BenchmarkFormatError, match=r"a2\.json.*'annotations'"):
        load_vqa(tmp_path, q, tmp_path / "a2.json")
    assert load_vqa(tmp_path, tmp_path / "a2.json", a) == []  # an empty questions list is fine
    write_json(tmp_path / "a2.json", {"annotations": []})
    with pytest.raises(BenchmarkFormatError, match=r"a2\.json.*'questions'"):
        load_vqa(tmp_path, tmp_path / "a2.json", a)
    with pytest.raises(BenchmarkFormatError, match="val2014_missing"):
        load_vqa(tmp_path / "val2014_missing", q, a)


# --------------------------------------------------------------------------------------------------- classification


def test_hateful_memes(tmp_path):
    lines = [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color"},
             {"id": "10398", "img": "img/10398.png", "label": 1, "text": "bad meme"}]
    path = tmp_path / "dev_seen.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    (tmp_path / "img").mkdir()
    assert load_hateful_memes(tmp_path / "img", path) == [
        EvalExample(id="42953", image=str(tmp_path / "img" / "42953.png"), label="no",
                    ocr="its their character not their color"),
        EvalExample(id="10398", image=str(tmp_path / "img" / "10398.png"), label="yes", ocr="bad meme"),
    ]


@pytest.mark.parametrize("line,field", [
    ('{"img": "img/1.png", "label": 0, "text": "t"}', "'id'"),
    ('{"id": 1, "label": 0, "text": "t"}', "'img'"),
    ('{"id": 1, "img": "img/1.png", "text": "t"}', "'label'"),
    ('{"id": 1, "img": "img/1.png", "label": 2, "text": "t"}', "'label'"),
    ('{"id": 1, "img": "img/1.png", "label": true, "text": "t"}', "'label'"),
    ('{"id": 1, "img": "img/1.png", "label": 1}', "'text'"),
    ('{"id": 1, "img": ', "JSON object"),
])
def test_hateful_memes_malformed(tmp_path, line, field):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": 0, "img": "img/0.png", "label": 0, "text": "ok"}\n' + line + "\n")
    with pytest.raises(BenchmarkFormatError) as info:
        load_hateful_memes(tmp_path, path)
    assert "train.jsonl" in str(info.value) and field in str(info.value) and "record 1" in str(info.value)
    with pytest.raises(BenchmarkFormatError, match="no_img"):
        load_hateful_memes(tmp_path / "no_img", path)


@pytest.fixture
def imagenet(tmp_path):
    val = tmp_path / "val"
    write_png(val / "n01443537" / "b.JPEG")
    write_png(val / "n01443537" / "a.jpeg")
    write_png(val / "n01440764" / "x.png")
    (val / "n01440764" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagenet_default_and_lists(imagenet, tmp_path):
    val = imagenet / "val"
    expected_ids = ["n01440764/x.png", "n01443537/a.jpeg", "n01443537/b.JPEG"]
    got = load_imagenet(val)
    assert got == [EvalExample(id=i, image=str(val / i), label=i.split("/")[0]) for i in expected_ids]
    names = ["tench", "goldfish"]
    by_list = load_imagenet(imagenet, names, split="val")
    assert [(e.id, e.label) for e in by_list] == list(zip(expected_ids, ["tench", "goldfish", "goldfish"]))
    mapping = {"n01443537": "goldfish", "n01440764": "tench"}
    assert load_imagenet(val, mapping) == by_list
    assert load_imagenet(val, str(write_json(tmp_path / "names.json", names))) == by_list
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}
    assert load_imagenet(val, write_json(tmp_path / "imagenet_class_index.json", index)) == by_list


@pytest.mark.parametrize("class_names,match", [
    (["tench"], "one name per class folder"),
    ({"n01440764": "tench"}, "'n01443537'"),
    (["tench", 3], "record 1"),
])
def test_imagenet_bad_class_names(imagenet, class_names, match):
    with pytest.raises(BenchmarkFormatError, match=match):
        load_imagenet(imagenet / "val", class_names)


def test_imagenet_bad_folders(imagenet, tmp_path):
    with pytest.raises(BenchmarkFormatError, match="train"):
        load_imagenet(imagenet, split="train")
    (imagenet / "val" / "n09999999").mkdir()
    with pytest.raises(BenchmarkFormatError, match="n09999999"):
        load_imagenet(imagenet / "val")
    bad = tmp_path / "names.json"
    bad.write_text("[")
    with pytest.raises(BenchmarkFormatError, match="names.json"):
        load_imagenet(imagenet / "val", bad)


# ---------------------------------------------------------------------------------------------- datasets folders


def test_hf_captioning_with_pil_images(tmp_path):
    import datasets

    images = [Image.new("RGB", (4, 3), (i * 50, 0, 0)) for i in range(2)]
    ds = datasets.Dataset.from_dict({"image": images, "cocoid": [9, 42], "sentences": [
        [{"raw": "A cat."}, {"raw": "A small cat."}], [{"raw": "A dog."}]]})
    ds.save_to_disk(tmp_path / "coco")
    got = load_hf_dataset(tmp_path / "coco", "captioning", "test")
    assert [(e.id, e.captions) for e in got] == [("9", ["A cat.", "A small cat."]), ("42", ["A dog."])]
    assert [e.image.convert("RGB").getpixel((0, 0)) for e in got] == [(0, 0, 0), (50, 0, 0)]


def test_hf_vqa_datasetdict_with_paths(tmp_path):
    import datasets

    paths = [str(write_png(tmp_path / "img" / f"{i}.png")) for i in range(2)]
    train = datasets.Dataset.from_dict({"image": paths, "question_id": [1, 2], "question": ["Q1?", "Q2?"],
                                        "answers": [["yes", "no"], ["2"]]})
    val = datasets.Dataset.from_dict({"image": paths[:1], "question_id": [3], "question": ["Q3?"],
                                      "answers": [[{"answer": "red"}, {"answer": "blue"}]]})
    datasets.DatasetDict(train=train, validation=val).save_to_disk(tmp_path / "vqa")
    assert load_hf_dataset(tmp_path / "vqa", "vqa", "train") == [
        EvalExample(id="1", image=paths[0], question="Q1?", answers=["yes", "no"]),
        EvalExample(id="2", image=paths[1], question="Q2?", answers=["2"])]
    assert load_hf_dataset(tmp_path / "vqa", "vqa", "validation") == [
        EvalExample(id="3", image=paths[0], question="Q3?", answers=["red", "blue"])]
    with pytest.raises(BenchmarkFormatError, match="'test'.*train"):
        load_hf_dataset(tmp_path / "vqa", "vqa", "test")


def test_hf_classification(tmp_path):
    import datasets

    paths = [str(write_png(tmp_path / "img" / f"{i}.png")) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["tench", "goldfish"])})
    ds = datasets.Dataset.from_dict({"image": paths, "label": [1, 0, 1]}, features=features)
    ds.save_to_disk(tmp_path / "imagenet")
    got = load_hf_dataset(tmp_path / "imagenet", "classification", "validation")
    assert [(e.id, e.label) for e in got] == [("0", "goldfish"), ("1", "tench"), ("2", "goldfish")]
    assert got[0].image == paths[0] or got[0].image.size == (4, 3)

    memes = datasets.Dataset.from_dict({"id": [5, 6], "image": paths[:2], "label": [0, 1], "text": ["a", "b"]})
    memes.save_to_disk(tmp_path / "memes")
    assert load_hf_dataset(tmp_path / "memes", "classification", "test", label_names=["no", "yes"]) == [
        EvalExample(id="5", image=paths[0], label="no", ocr="a"),
        EvalExample(id="6", image=paths[1], label="yes", ocr="b")]
    with pytest.raises(BenchmarkFormatError, match="'question'"):
        load_hf_dataset(tmp_path / "memes", "vqa", "test")


# --------------------------------------------------------------------------------------------------------- sampling


def test_subsample():
    items = list(range(100))
    a = subsample(items, 10, seed=1)
    assert a == subsample(items, 10, seed=1) and a != subsample(items, 10, seed=2)
    assert len(set(a)) == 10 and a == sorted(a) and set(a) <= set(items)
    assert subsample(items, None, seed=1) == items and subsample(items, 500, seed=1) == items
    assert subsample(items, 0, seed=1) == []


def test_query_set():
    train = [EvalExample(id=str(i), image=f"{i}.png") for i in range(50)]
    pool = query_set(train, 8, seed=42)
    assert pool == query_set(train, 8, seed=42) and len({e.id for e in pool}) == 8
    assert query_set(train, seed=42) == train  # fewer than 2048: the whole training set
    # A demonstration pool drawn from the training set never meets the test examples.
    test = [EvalExample(id=f"t{i}", image=f"t{i}.png") for i in range(20)]
    assert not {e.id for e in query_set(train, 8, 0)} & {e.id for e in subsample(test, 5, 0)}
