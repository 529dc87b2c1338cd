"""
The evaluation's metrics and answer post-processing give the numbers of open_flamingo 2.0.1's own code.

Each test feeds crafted inputs to openflamingo_hf and to the original's code, and compares. The original runs in
`.venv-original` (made by scripts/setup_original_env.sh; another interpreter can be named with the environment variable
OPENFLAMINGO_HF_ORIGINAL_PYTHON) through a subprocess: `_WORKER` below loads open_flamingo/eval/{vqa_metric,
coco_metric, ok_vqa_utils, evaluate}.py and calls them as open_flamingo's evaluate.py does, with JSON in and out.
Where that environment is missing, each test compares against ORIGINAL_FIGURES instead: the original's output for the
same inputs, recorded with

    .venv/bin/python tests/test_eval_vs_original.py      # prints ORIGINAL_FIGURES; needs .venv-original

and `test_recorded_figures_are_the_originals` keeps that table honest wherever `.venv-original` exists. So every test
compares with the original, live or recorded; none passes without a reference.

Covered: VQA accuracy (`compute_vqa_accuracy` vs `VQAEval.evaluate` through `vqa_metric.compute_vqa_accuracy`, each
normalisation rule, unanimous and split answers, the original's rounding), the VQA answer cut and the caption cut
(`OpenFlamingoProcessor.postprocess_answer` vs `postprocess_vqa_generation` and evaluate.py's
`postprocess_captioning_generation(out).replace('"', "")`), CIDEr (`compute_cider` vs `coco_metric.compute_cider`),
OK-VQA (`okvqa_stem` and `compute_vqa_accuracy(ok_vqa=True)` vs `OKVQAStemmer.stem` and
`postprocess_ok_vqa_generation`: the rules with NLTK stood in for on both sides, and with the real NLTK only where its
data is installed), Hateful Memes (class scores -> P(yes) -> ROC-AUC) and ImageNet (class scores -> top-1 accuracy)
vs evaluate.py's `evaluate_classification`.
"""

from __future__ import annotations

import functools
import json
import os
import pprint
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from openflamingo_hf.eval import metrics
from openflamingo_hf.eval.evaluate import EVAL_TASKS, HATEFUL_MEMES_CLASSES, BenchmarkData, _record, score
from openflamingo_hf.eval.example import EvalExample
from openflamingo_hf.eval.metrics import compute_cider, compute_vqa_accuracy, okvqa_stem
from openflamingo_hf.processing.processing_openflamingo import OpenFlamingoProcessor

REPO = Path(__file__).resolve().parent.parent
ORIGINAL_PYTHON = Path(os.environ.get("OPENFLAMINGO_HF_ORIGINAL_PYTHON", REPO / ".venv-original" / "bin" / "python"))
ORIGINAL_MODULES = ("open_flamingo", "pycocoevalcap", "pycocotools", "nltk", "inflection", "sklearn", "torch")
postprocess_answer = OpenFlamingoProcessor.postprocess_answer
HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="CIDEr's PTB tokenizer (pycocoevalcap) needs Java, on both sides")
CIDER_REQUESTS = ("cider", "cider_line_breaks")

# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _ten(answer: str, count: int = 10, other: str = "zebra") -> list[str]:
    return [answer] * count + [other] * (10 - count)


# (prediction, annotator answers): scored as they are, without the generation cut.
VQA_CASES = [
    # all annotators agree: the prediction and the answers are normalised all the same
    ("yes.", _ten("yes")),
    ("Yes", _ten("yes")),
    ("YES!", _ten("yes")),
    ("ten", _ten("10")),
    ("Two", _ten("2")),
    ("2", _ten("2")),
    ("two", _ten("Two")),
    ("the dog", _ten("dog")),
    ("dog", _ten("The Dog.")),
    (" 2\n", _ten("2")),
    ("3", _ten("2")),
    ("", _ten("yes")),
    # split answers: 4+, 3, 2, 1 and 0 matching annotators; fewer than 10 answers
    ("cat", _ten("cat", 4)),
    ("cat", _ten("cat", 3)),
    ("cat", _ten("cat", 2)),
    ("cat", _ten("cat", 1)),
    ("cat", _ten("dog", 3)),
    ("blue", ["red", "blue", "blue"]),
    ("Blue.", ["red", "blue", "Blue"]),
    # punctuation: deleted next to a space, a space otherwise; every mark deleted once a comma sits between digits
    ("red, blue", _ten("red blue", 3)),
    ("red,blue", _ten("red blue", 3)),
    ("red ,blue", _ten("redblue", 3)),
    ("hot-dog", _ten("hot dog", 3)),
    ("hot - dog", _ten("hot dog", 3)),
    ("(a) dog", _ten("dog", 3)),
    ('"yes"', _ten("yes", 3)),
    ("yes?", _ten("yes", 3)),
    ("red/blue", _ten("red blue", 3)),
    ("@home", _ten("home", 3)),
    ("1,000", _ten("1000")),
    ("1,000", _ten("1 000", 3)),
    ("1,000 red-dogs", _ten("1000 reddogs", 3)),
    ("10, 5", _ten("10 5", 3)),
    # periods: removed unless a digit follows ("3.5" keeps its point), at most 32 per text
    ("3.5", _ten("3.5", 4, "35")),
    ("3.5", _ten("35")),
    ("3.", _ten("3", 3)),
    (".5", _ten("5", 3)),
    ("st. louis", _ten("st louis", 3)),
    ("a.m.", _ten("am", 3)),
    ("." * 40 + "x", _ten("." * 8 + "x", 3)),
    # number words, articles, contractions, case, whitespace
    ("none", _ten("0", 3)),
    ("zero", _ten("0", 3)),
    ("Four", _ten("4", 3)),
    ("eleven", _ten("11", 3)),
    ("an apple", _ten("apple", 3)),
    ("The", _ten("", 3)),
    ("a dog", _ten("the dog", 3)),
    ("dont", _ten("don't", 3)),
    ("isnt", _ten("isn't", 3)),
    ("Im", _ten("I'm", 3)),
    ("whats that", _ten("what's that", 3)),
    ("big\tdog", _ten("big dog", 3)),
    ("big\n\ndog ", _ten("big dog", 3)),
    ("BIG Dog", _ten("big dog", 3)),
]

# (generation, annotator answers): each side cuts the generation its way, then scores it.
VQA_GENERATIONS = [
    ("yes, it is Question: why", _ten("yes")),
    ("two Short answer: three", _ten("2")),
    (" blue Answer:", _ten("blue", 3)),
    ("Shorts are blue", _ten("shorts")),
    ("red, blue, green", _ten("red", 3)),
    ("1,000, maybe", _ten("1000")),
    ("no\nQuestion: is it?", _ten("no")),
    ("Yes.\n", _ten("yes")),
    ("answer: 4", _ten("4")),
    ("  The dog\t", _ten("dog", 3)),
    ("Questions", _ten("", 3)),
    ("3.5, or 4 Answer", _ten("3.5", 3)),
]

CAPTION_GENERATIONS = [
    ' a "cat" on a mat. Output: a dog',
    "A dog runs on the grass.\nOutput:",
    'Two "big" dogs, playing!',
    "a man riding a bike Outputs",
    "  A red double-decker bus\t",
    "Output: nothing",
    "no output here",
    "A dog\u00a0on a sofa\x85 ",
    "A plate\x0c of food ",
    " A cat on a mat\r",
    "\u2028A bird ",
    "A boat\u2029",
    "A horse\r\n",
    "A\vdog",
]

CIDER_CASES = {  # id: (generation, references); the generation is cut by each side first
    1: (' a "cat" on a mat. Output: a dog',
        ["A cat sitting on a mat.", "a cat on a rug", "The cat lies on the mat."]),
    2: ("A dog runs on the grass.\nOutput:",
        ["A dog running across a grassy field.", "A brown dog runs on the grass.", "The dog is playing outside."]),
    3: ('Two "big" dogs, playing!', ["Two large dogs playing together.", "two dogs play", "Dogs playing in a park."]),
    4: ("a man riding a bike Outputs", ["A man rides a bicycle down the street.", "A person on a red bike."]),
    5: ("  A red double-decker bus\t", ["A red double decker bus on a street.", "a red bus", "A big red bus."]),
    6: ("A plate of food with broccoli and rice", "A plate with broccoli and rice."),  # a single reference (a str)
    7: ("Output: nothing", ["An empty room.", "A room with nothing in it."]),  # an empty caption
    8: ("A CAT, a Dog & a bird; (together) ... ", ["A cat, a dog and a bird together.", "three animals"]),
    9: ("it's a man's hat - isn't it?", ["A man's hat.", "It is a hat."]),
    10: ("A dog\u00a0on a sofa\x85 ", ["A dog on a sofa.", "A dog lying on a couch."]),
}

# Characters that Stanford's PTB tokenizer takes for line breaks: a caption holding one moves the following captions
# to other images in the original (and with the same captions in the same order, in openflamingo_hf).
CIDER_LINE_BREAK_CASES = {
    1: ("A plate\x0c of food ", ["A plate of food.", "Food on a plate."]),
    2: (" A cat on a mat\r", ["A cat on a mat.", "A cat lying on a mat."]),
    3: ("\u2028A bird in the sky ", ["A bird flying in the sky.", "A bird."]),
    4: ("A man on a horse\r ", ["A man riding a horse.", "A horse and its rider."]),
    5: ("A boat on the water.", ["A boat on the water.", "A small boat on a lake."]),
    6: ("A dog on a sofa", ["A dog on a sofa.", "A dog lying on a couch."]),
}

# NLTK stood in for on both sides (its data is not on PyPI): whitespace tokens, these tags (default NN), these verb
# lemmas. The manual-match table and inflection.singularize are each side's own.
FAKE_NLTK = {
    "tags": {"dogs": "NNS", "Dogs": "NNS", "cats": "NNPS", "leaves": "NNS", "christmas": "NNS", "glasses": "NNS",
             "buses": "NNS", "men": "NNS", "jeans": "NNS", "skis": "NNS", "running": "VBG", "swimming": "VBG"},
    "lemmas": {"running": "run", "swimming": "swim", "skiing": "ski", "riding": "rid", "spring": "spring"},
}
OKVQA_WORDS = ["dogs", "Dogs", "cats", "leaves", "christmas", "running", "riding", "skiing", "spring", "glasses",
               "buses", "men", "sheep", "kid's", "police", "jeans", "skis", "two dogs swimming", "clothes"]
OKVQA_GENERATIONS = [
    ("dogs, cats Question: why", _ten("dog", 3)),
    ("running Short answer: swimming", _ten("run")),
    ("christmas trees", _ten("christmas tree", 3)),
    ("two leaves Answer: three", _ten("2 leaf")),
    (" glasses \n", _ten("glass", 3)),
    ("Shorts", _ten("short")),
    ("buses, 3", _ten("bus")),
]


def _f32(value: float) -> float:
    """A float32 value as a Python float: the class scores that `rank_class_names` hands on are float32."""
    return float(np.float32(value))


# Hateful Memes: (score of "no", score of "yes"), label (1: hateful). Where the model all but rules "yes" out, the
# original's P(yes) = 1 - P(no) is 0 (rows 2, 3, 4): those examples tie in ROC-AUC; a softmax would order them. Then
# 20 random pairs (mean log-likelihoods of a few tokens), for P(yes) to the last bit.
_RANDOM = np.random.default_rng(1)
HATEFUL_MEMES = [
    ((-1.0, -2.0), 0), ((-2.0, -1.0), 1), ((-0.5, -30.0), 1), ((-0.25, -40.0), 0), ((-0.125, -20.0), 1),
    ((-1.5, -1.5), 1), ((-3.0, -0.1), 0), ((-0.6, -0.7), 1), ((-2.5, -2.25), 0), ((-0.75, -0.7), 1),
] + [((float(a), float(b)), int(c)) for a, b, c in zip(_RANDOM.uniform(-6, -0.05, 20), _RANDOM.uniform(-6, -0.05, 20),
                                                       _RANDOM.integers(0, 2, 20))]


def _imagenet() -> tuple[list[list[float]], list[int]]:
    """Scores over the original's 1000 classes for 9 queries of classes 0-5: random, with the top class placed
    (right or wrong, some 1 float32 step above the runner-up)."""
    rng = np.random.default_rng(0)
    labels = [0, 0, 1, 1, 2, 2, 3, 4, 5]
    top = [0, 5, 1, 1, 900, 2, 3, 40, 4]
    scores = rng.uniform(-9.0, -5.0, size=(len(labels), 1000)).astype(np.float32)
    for row, best in enumerate(top):
        scores[row, best] = -1.0
        if row % 3 == 0:  # a runner-up one float32 step below
            scores[row, (best + 7) % 1000] = np.nextafter(np.float32(-1.0), np.float32(-2.0))
    return [[float(s) for s in row] for row in scores], labels


def _requests() -> dict[str, dict]:
    """What the original is asked, by name (the keys of ORIGINAL_FIGURES; without Java, all but CIDEr's)."""
    imagenet_scores, imagenet_labels = _imagenet()
    requests = {
        "vqa": {"op": "vqa", "cut": None, "questions": VQA_CASES},
        "vqa_generations": {"op": "vqa", "cut": "vqa", "questions": VQA_GENERATIONS},
        "caption_cut": {"op": "caption_cut", "texts": CAPTION_GENERATIONS},
        "cider": {"op": "cider", "predictions": [[i, g] for i, (g, _) in CIDER_CASES.items()],
                  "references": [[i, [r] if isinstance(r, str) else r] for i, (_, r) in CIDER_CASES.items()]},
        "cider_line_breaks": {"op": "cider", "predictions": [[i, g] for i, (g, _) in CIDER_LINE_BREAK_CASES.items()],
                              "references": [[i, r] for i, (_, r) in CIDER_LINE_BREAK_CASES.items()]},
        "okvqa_stem": {"op": "okvqa", "rules": FAKE_NLTK, "words": OKVQA_WORDS,
                       "generations": [g for g, _ in OKVQA_GENERATIONS]},
        "okvqa_accuracy": {"op": "vqa", "cut": "ok_vqa", "rules": FAKE_NLTK, "questions": OKVQA_GENERATIONS},
        "classification": {"op": "classification", "cases": {
            "hateful_memes": {"scores": [[_f32(s) for s in pair] for pair, _ in HATEFUL_MEMES],
                              "labels": [label for _, label in HATEFUL_MEMES]},
            "imagenet": {"scores": imagenet_scores, "labels": imagenet_labels}}},
    }
    return requests if HAVE_JAVA else {k: v for k, v in requests.items() if k not in CIDER_REQUESTS}


# ---------------------------------------------------------------------------------------------------------------------
# The original, live (.venv-original) or recorded (ORIGINAL_FIGURES)
# ---------------------------------------------------------------------------------------------------------------------

# Runs in .venv-original with {name: request} on stdin; prints {name: reply}. Only the standard library at the top:
# each request imports what it needs of the original.
_WORKER = r'''
import importlib.util
import json
import os
import re
import sys
import tempfile
import types

REQUEST = json.load(sys.stdin)
REPLY = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # the original's own prints (and pycocotools', Java's) go to stderr, not into the reply
sys.stdout = sys.stderr
EVAL_DIR = os.path.join(importlib.util.find_spec("open_flamingo").submodule_search_locations[0], "eval")


def load(name):
    """One of the original's evaluation modules, by file path: `open_flamingo/__init__.py` (torch, open_clip) is not
    run. Registered under its bare name, as evaluate.py imports its siblings."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EVAL_DIR, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def dump(directory, name, data):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def fake_nltk(rules):
    """Stands in for NLTK's tokenizer, tagger and WordNet (their data is not on PyPI): the test gives the same rules to
    openflamingo_hf's side. Whitespace tokens, tags from a table (default NN), verb lemmas from a table."""
    import nltk

    okvqa = load("ok_vqa_utils")
    nltk.tokenize.word_tokenize = str.split
    nltk.pos_tag = lambda tokens: [(t, rules["tags"].get(t, "NN")) for t in tokens]

    class Lemmatizer:
        def lemmatize(self, word, pos):
            assert pos == "v", pos
            return rules["lemmas"].get(word, word)

    okvqa.stemmer._wordnet_lemmatizer = Lemmatizer()


def vqa(request, directory):
    """evaluate.py's VQA path: the generation post-processing it picks, then vqa_metric.compute_vqa_accuracy on the
    result, question and annotation files. Also each question's unrounded accuracy, as VQAEval hands it to
    setEvalQA (which rounds it to 2 decimals for its own record)."""
    metric = load("vqa_metric")
    if request.get("rules") is not None:
        fake_nltk(request["rules"])
    cut = {None: lambda text: text, "vqa": metric.postprocess_vqa_generation,
           "ok_vqa": lambda text: load("ok_vqa_utils").postprocess_ok_vqa_generation(text)}[request["cut"]]
    predictions = [cut(text) for text, _ in request["questions"]]
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "license": {}, "questions": [{"question_id": i, "image_id": i, "question": "?"}
                                              for i in range(len(predictions))]}
    annotations = {"annotations": [
        {"question_id": i, "image_id": i, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"} for j, a in enumerate(answers)]}
        for i, (_, answers) in enumerate(request["questions"])]}
    results = [{"question_id": i, "answer": p} for i, p in enumerate(predictions)]
    per_question = {}
    set_eval_qa = metric.VQAEval.setEvalQA

    def record(self, question_id, accuracy):
        per_question[question_id] = accuracy
        return set_eval_qa(self, question_id, accuracy)

    metric.VQAEval.setEvalQA = record
    try:
        overall = metric.compute_vqa_accuracy(dump(directory, "results.json", results),
                                              dump(directory, "questions.json", questions),
                                              dump(directory, "annotations.json", annotations))
    finally:
        metric.VQAEval.setEvalQA = set_eval_qa
    reply = {"per_question": [per_question[i] for i in range(len(predictions))], "overall": overall}
    return reply if request["cut"] is None else {"predictions": predictions, **reply}


def caption_cut(request, directory):
    """evaluate.py's caption post-processing: `postprocess_captioning_generation(out).replace('"', "")`."""
    metric = load("coco_metric")
    return [metric.postprocess_captioning_generation(text).replace('"', "") for text in request["texts"]]


def cider(request, directory):
    """evaluate.py's captioning score: coco_metric.compute_cider(results, annotations)["CIDEr"] * 100, on the
    post-processed generations. COCOEvalCap runs every scorer; SPICE downloads Stanford CoreNLP models on first use,
    which this offline check cannot, so it is replaced by a stub (CIDEr reads nothing SPICE computes)."""
    import pycocoevalcap.eval

    class NoSpice:
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    pycocoevalcap.eval.Spice = NoSpice
    metric = load("coco_metric")
    captions = caption_cut({"texts": [text for _, text in request["predictions"]]}, directory)
    annotations = {"info": {}, "licenses": [], "type": "captions",
                   "images": [{"id": image_id} for image_id, _ in request["predictions"]],
                   "annotations": [{"image_id": image_id, "id": 1 + k, "caption": ref}
                                   for k, (image_id, ref) in enumerate(
                                       (i, r) for i, refs in request["references"] for r in refs)]}
    results = [{"image_id": image_id, "caption": c} for (image_id, _), c in zip(request["predictions"], captions)]
    scores = metric.compute_cider(dump(directory, "results.json", results),
                                  dump(directory, "annotations.json", annotations))
    return {"captions": captions, "cider": scores["CIDEr"] * 100.0}


def okvqa(request, directory):
    """ok_vqa_utils: OKVQAStemmer.stem on words, postprocess_ok_vqa_generation on generations."""
    okvqa = load("ok_vqa_utils")
    if request["rules"] is not None:
        fake_nltk(request["rules"])
    try:
        return {"stems": [okvqa.stemmer.stem(w) for w in request["words"]],
                "generations": [okvqa.postprocess_ok_vqa_generation(t) for t in request["generations"]]}
    except LookupError as error:
        found = re.search(r"Resource '?[\w.]+'? not found", str(error))
        return {"missing_nltk_data": found.group(0) if found else str(error)}


def classification(request, directory):
    """evaluate.py's evaluate_classification, as it is, for Hateful Memes and ImageNet, on one process (a gloo group
    of one), 0 shots, with a stand-in eval model whose get_rank_classifications returns the test's scores for each
    query (found by the meme text or by the colour of the query image). Returns its figure (ROC-AUC or top-1, both
    fractions) and, per example, the predicted class and the Hateful Memes score it fed roc_auc_score."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:  # the CPU torch beside PyPI's CUDA torchvision: see benchmarks/_original_worker.py
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import argparse

    import torch
    import torch.distributed as dist
    from PIL import Image

    sys.path.insert(0, EVAL_DIR)
    import evaluate
    import utils

    out = {}
    dist.init_process_group("gloo", init_method="file://" + os.path.join(directory, "pg"), rank=0, world_size=1)
    try:
        for name, case in request["cases"].items():
            scores, labels = case["scores"], case["labels"]
            seen, predicted, fed = [], [], {}
            root = os.path.join(directory, name)
            os.makedirs(root)

            def image(path, number):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.new("RGB", (1, 1), (number % 256, number // 256, 7)).save(path)

            class StandIn:
                def get_hateful_memes_prompt(self, text, label=None):
                    return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label or ''}"

                def get_imagenet_prompt(self, label=None):
                    return f"<image>Output:{label or ''}"

                def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache,
                                             normalize_length):
                    rows = []
                    for text, images in zip(batch_text, batch_images):
                        if name == "hateful_memes":
                            number = int(text.rsplit("#", 2)[1])
                        else:
                            r, g, _ = images[-1].convert("RGB").getpixel((0, 0))
                            number = r + 256 * g
                        seen.append(number)
                        rows.append(scores[number])
                    return torch.tensor(rows)

            if name == "hateful_memes":
                def memes(path, numbers, texts, labels):
                    with open(path, "w") as f:
                        for number, text, label in zip(numbers, texts, labels):
                            image(os.path.join(root, "img", f"{number}.png"), number)
                            f.write(json.dumps({"id": number, "img": f"img/{number}.png", "text": text,
                                                "label": label}) + "\n")
                    return path

                n = len(labels)
                args = argparse.Namespace(
                    hateful_memes_image_dir_path=os.path.join(root, "img"),
                    hateful_memes_test_annotations_json_path=memes(
                        os.path.join(root, "test.jsonl"), range(n), [f"#{i}#" for i in range(n)], labels),
                    hateful_memes_train_annotations_json_path=memes(
                        os.path.join(root, "train.jsonl"), [n, n + 1], ["demo one", "demo two"], [0, 1]))
                auc = evaluate.roc_auc_score

                def roc_auc_score(gts, pred_scores):
                    fed["scores"] = list(pred_scores)
                    return auc(gts, pred_scores)

                evaluate.roc_auc_score = roc_auc_score
            else:
                # evaluate_classification builds the query prompt from batch["ocr"] for ImageNet too, a key that its
                # ImageNetDataset lacks: 2.0.1 as released stops there with a KeyError. Its items get an empty "ocr"
                # (get_imagenet_prompt does not read it); nothing else changes.
                class ImageNetDataset(evaluate.ImageNetDataset):
                    def __getitem__(self, index):
                        return {**super().__getitem__(index), "ocr": ""}

                evaluate.ImageNetDataset = ImageNetDataset
                for number, label in enumerate(labels):
                    image(os.path.join(root, "val", f"c{label:03d}", f"{number:03d}.png"), number)
                image(os.path.join(root, "train", "c000", "a.png"), 900)
                image(os.path.join(root, "train", "c000", "b.png"), 901)
                args = argparse.Namespace(imagenet_root=root)
                names = utils.get_predicted_classnames

                def get_predicted_classnames(logprobs, k, class_id_to_name):
                    classes, logprobs_out = names(logprobs, k, class_id_to_name)
                    predicted.extend(row[0] for row in classes)
                    return classes, logprobs_out

                utils.get_predicted_classnames = get_predicted_classnames
            args.model, args.num_samples, args.batch_size, args.rices = "open_flamingo", -1, 3, False
            args.query_set_size, args.rank, args.world_size = 2, 0, 1
            figure = evaluate.evaluate_classification(args, StandIn(), seed=42, num_shots=0, dataset_name=name)
            if name == "hateful_memes":
                by_number = dict(zip(seen, fed["scores"]))
                out[name] = {"figure": figure, "p_yes": [by_number[i] for i in range(len(labels))]}
            else:
                classnames = load("classification_utils").IMAGENET_CLASSNAMES
                by_number = dict(zip(seen, predicted))
                out[name] = {"figure": figure,
                             "predicted": [classnames.index(by_number[i]) for i in range(len(labels))]}
    finally:
        dist.destroy_process_group()
    return out


OPS = {"vqa": vqa, "caption_cut": caption_cut, "cider": cider, "okvqa": okvqa, "classification": classification}
replies = {}
for key, request in REQUEST.items():  # {name: request}: one reply each, in one process
    with tempfile.TemporaryDirectory() as directory:
        replies[key] = OPS[request["op"]](request, directory)
REPLY.write(json.dumps(replies))
REPLY.close()
'''


@functools.lru_cache(maxsize=1)
def original_available() -> bool:
    """Whether ORIGINAL_PYTHON exists and finds the original and what its evaluation code imports."""
    if not ORIGINAL_PYTHON.exists():
        return False
    check = ("import importlib.util, sys; "
             f"sys.exit(any(importlib.util.find_spec(m) is None for m in {ORIGINAL_MODULES!r}))")
    found = subprocess.run([str(ORIGINAL_PYTHON), "-c", check], capture_output=True).returncode == 0
    if not found:
        warnings.warn(f"{ORIGINAL_PYTHON} lacks one of {ORIGINAL_MODULES}; comparing with the recorded figures "
                      "(bash scripts/setup_original_env.sh installs them)", stacklevel=2)
    return found


def run_original(requests: dict[str, dict]) -> dict[str, object]:
    """The original's replies to `requests`, computed now in ORIGINAL_PYTHON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # this package's path must not leak into the other environment
    done = subprocess.run([str(ORIGINAL_PYTHON), "-c", _WORKER], input=json.dumps(requests), capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the original's code failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


@functools.lru_cache(maxsize=1)
def _live_figures() -> dict[str, object]:
    return run_original(_requests())


def original(name: str) -> tuple[object, bool]:
    """(the original's reply to request `name`, whether it was computed live)."""
    if original_available():
        return _live_figures()[name], True
    return ORIGINAL_FIGURES[name], False


def _close(live: bool):
    """Float comparison: exact against the live original (same machine, same libraries); against the recorded
    figures, to 1e-12 relative, as numpy's and libm's last bits may differ between machines."""
    return (lambda x: x) if live else (lambda x: pytest.approx(x, rel=1e-12, abs=1e-15))


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_vqa_accuracy_equals_the_originals():
    reference, _ = original("vqa")
    for (prediction, answers), expected in zip(VQA_CASES, reference["per_question"], strict=True):
        ours = compute_vqa_accuracy([prediction], [answers]) / 100
        assert ours == expected, (prediction, answers[:4])  # the same arithmetic: equal to the last bit
    overall = compute_vqa_accuracy([p for p, _ in VQA_CASES], [a for _, a in VQA_CASES])
    assert overall == 100 * sum(reference["per_question"]) / len(VQA_CASES)
    # The original reports its overall figure rounded to two decimals; that is round(ours, 2).
    assert round(overall, 2) == reference["overall"]
    # The property that differs from some copies of the official vqaEval.py: unanimous answers are normalised too.
    assert reference["per_question"][:3] == [1.0, 1.0, 1.0]


def test_vqa_answer_cut_and_accuracy_equal_the_originals():
    reference, _ = original("vqa_generations")
    for (generation, answers), cut, expected in zip(VQA_GENERATIONS, reference["predictions"],
                                                    reference["per_question"], strict=True):
        ours = postprocess_answer("vqa", generation)
        assert ours == cut.strip(), generation  # the same cut; ours is also stripped, which the metric does anyway
        assert compute_vqa_accuracy([ours], [answers]) / 100 == expected, generation
    overall = compute_vqa_accuracy([postprocess_answer("vqa", g) for g, _ in VQA_GENERATIONS],
                                   [a for _, a in VQA_GENERATIONS])
    assert round(overall, 2) == reference["overall"]


def test_caption_cut_equals_the_originals():
    reference, _ = original("caption_cut")
    for generation, cut in zip(CAPTION_GENERATIONS, reference, strict=True):
        ours = postprocess_answer("captioning", generation)
        # Stripped, except where a PTB line-break character makes the whitespace matter: then the original's text.
        assert ours == (cut if any(c in cut for c in "\r\v\f\u2028\u2029") else cut.strip()), generation


def _cider(cases: dict) -> float:
    predictions = {i: postprocess_answer("captioning", generation) for i, (generation, _) in cases.items()}
    return compute_cider(predictions, {i: references for i, (_, references) in cases.items()})


@needs_java
def test_cider_equals_the_originals():
    reference, live = original("cider")
    assert _cider(CIDER_CASES) == _close(live)(reference["cider"])
    assert 50 < reference["cider"] < 300  # partly matching captions: rules out a missing or doubled x100


@needs_java
def test_cider_with_line_break_characters_equals_the_originals():
    reference, live = original("cider_line_breaks")
    assert _cider(CIDER_LINE_BREAK_CASES) == _close(live)(reference["cider"])
    # The case matters: stripping those captions (as the cut does for any other caption) would give another score.
    stripped = {i: postprocess_answer("captioning", g).strip() for i, (g, _) in CIDER_LINE_BREAK_CASES.items()}
    assert compute_cider(stripped, {i: r for i, (_, r) in CIDER_LINE_BREAK_CASES.items()}) != pytest.approx(
        reference["cider"])


def _fake_nltk(monkeypatch, rules: dict) -> None:
    def pos_tag(tokens):
        return [(token, rules["tags"].get(token, "NN")) for token in tokens]

    monkeypatch.setattr(metrics, "_load_nltk", lambda: (str.split, pos_tag, lambda w: rules["lemmas"].get(w, w)))


def test_okvqa_stemming_rules_equal_the_originals(monkeypatch):
    _fake_nltk(monkeypatch, FAKE_NLTK)
    reference, _ = original("okvqa_stem")
    assert [okvqa_stem(word) for word in OKVQA_WORDS] == reference["stems"]
    # postprocess_ok_vqa_generation = the VQA cut, then the stemming
    cut_and_stemmed = [okvqa_stem(postprocess_answer("vqa", g)) for g, _ in OKVQA_GENERATIONS]
    assert cut_and_stemmed == reference["generations"]


def test_okvqa_accuracy_equals_the_originals(monkeypatch):
    _fake_nltk(monkeypatch, FAKE_NLTK)
    reference, _ = original("okvqa_accuracy")
    for (generation, answers), expected in zip(OKVQA_GENERATIONS, reference["per_question"], strict=True):
        # as the evaluation runs it (the processor's cut, then ok_vqa=True), and on the uncut generation
        assert compute_vqa_accuracy([postprocess_answer("vqa", generation)], [answers], ok_vqa=True) / 100 == expected
        assert compute_vqa_accuracy([generation], [answers], ok_vqa=True) / 100 == expected, generation
    overall = compute_vqa_accuracy([g for g, _ in OKVQA_GENERATIONS], [a for _, a in OKVQA_GENERATIONS], ok_vqa=True)
    assert round(overall, 2) == reference["overall"]


def _nltk_data_available() -> bool:
    try:
        metrics._load_nltk()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _nltk_data_available(),
                    reason="NLTK data (punkt_tab, averaged_perceptron_tagger_eng, wordnet) is not installed: it is "
                    "not on PyPI (python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet)")
@pytest.mark.skipif(not original_available(), reason=f"{ORIGINAL_PYTHON} missing: bash scripts/setup_original_env.sh "
                    "(no recorded figures: they depend on the NLTK data installed)")
def test_okvqa_stemming_with_real_nltk_equals_the_originals():
    generations = [g for g, _ in OKVQA_GENERATIONS] + ["A man riding horses", "the leaves are falling, yes"]
    reply = run_original({"real": {"op": "okvqa", "rules": None, "words": OKVQA_WORDS, "generations": generations}})
    reference = reply["real"]
    assert "missing_nltk_data" not in reference, f"the original found no NLTK data: {reference}"
    assert [okvqa_stem(word) for word in OKVQA_WORDS] == reference["stems"]
    assert [okvqa_stem(postprocess_answer("vqa", g)) for g in generations] == reference["generations"]


def test_hateful_memes_roc_auc_equals_the_originals():
    reference, live = original("classification")
    reference = reference["hateful_memes"]
    benchmark = EVAL_TASKS["hateful_memes"]
    examples = [EvalExample(id=str(i), image=None, label="yes" if label else "no")
                for i, (_, label) in enumerate(HATEFUL_MEMES)]
    records = [_record(benchmark, example, [_f32(s) for s in pair], HATEFUL_MEMES_CLASSES)
               for example, (pair, _) in zip(examples, HATEFUL_MEMES)]
    p_yes = [record["p_yes"] for record in records]
    if live:
        assert p_yes == reference["p_yes"]  # bit for bit, on the same machine
    else:
        assert p_yes == pytest.approx(reference["p_yes"], rel=1e-6, abs=0)
    assert reference["p_yes"][2:5] == [0.0, 0.0, 0.0]  # the cases a softmax would tell apart
    # The original returns the fraction; ours the percentage.
    assert score(benchmark, records, BenchmarkData(train=[], test=examples)) == _close(live)(100 * reference["figure"])


def test_imagenet_top1_equals_the_originals():
    reference, live = original("classification")
    reference = reference["imagenet"]
    scores, labels = _imagenet()
    benchmark = EVAL_TASKS["imagenet"]
    class_names = [f"class {i}" for i in range(1000)]  # the original's names, by index (distinct where used here)
    examples = [EvalExample(id=str(i), image=None, label=class_names[label]) for i, label in enumerate(labels)]
    records = [_record(benchmark, example, row, class_names) for example, row in zip(examples, scores)]
    assert [class_names.index(r["prediction"]) for r in records] == reference["predicted"]
    assert score(benchmark, records, BenchmarkData(train=[], test=examples)) == _close(live)(100 * reference["figure"])


@pytest.mark.skipif(not original_available(), reason=f"{ORIGINAL_PYTHON} missing: bash scripts/setup_original_env.sh")
def test_recorded_figures_are_the_originals():
    live = _live_figures()
    assert set(live) == set(ORIGINAL_FIGURES) - (set() if HAVE_JAVA else set(CIDER_REQUESTS))
    for name, figures in live.items():
        assert ORIGINAL_FIGURES[name] == _approx_tree(figures), (
            f"ORIGINAL_FIGURES[{name!r}] is stale: regenerate it with `.venv/bin/python tests/test_eval_vs_original.py`"
        )


def _approx_tree(value):
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-12, abs=1e-15)
    if isinstance(value, dict):
        return {k: _approx_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx_tree(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# The original's figures for the inputs above, recorded with `.venv/bin/python tests/test_eval_vs_original.py`
# (open-flamingo 2.0.1, pycocoevalcap 1.2, scikit-learn 1.9.1, torch 2.13.0+cpu, in .venv-original).
# ---------------------------------------------------------------------------------------------------------------------

ORIGINAL_FIGURES: dict[str, object] = {
    'vqa': {'per_question': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.9, 0.6, 0.3, 0.0,
                             0.4444444444444444, 0.4444444444444444, 0.9, 0.9, 0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9,
                             1.0, 0.0, 0.9, 0.9, 1.0, 0.0, 0.9, 0.0, 0.9, 0.9, 0.0, 0.9, 0.9, 0.9, 0.0, 0.9, 0.9, 0.9,
                             0.9, 0.9, 0.0, 0.9, 0.9, 0.9, 0.9],
            'overall': 72.39},
    'vqa_generations': {'predictions': ['yes', 'two ', ' blue ', '', 'red', '1,000', 'no\n', 'Yes.\n', 'answer: 4',
                                        '  The dog\t', '', '3.5'],
                        'per_question': [1.0, 1.0, 0.9, 0.0, 0.9, 1.0, 1.0, 1.0, 0.0, 0.9, 0.9, 0.9],
                        'overall': 79.17},
    'caption_cut': [' a cat on a mat. ', 'A dog runs on the grass.\n', 'Two big dogs, playing!', 'a man riding a bike ',
                    '  A red double-decker bus\t', '', 'no output here', 'A dog\xa0on a sofa\x85 ',
                    'A plate\x0c of food ', ' A cat on a mat\r', '\u2028A bird ', 'A boat\u2029', 'A horse\r\n',
                    'A\x0bdog'],
    'cider': {'captions': [' a cat on a mat. ', 'A dog runs on the grass.\n', 'Two big dogs, playing!',
                           'a man riding a bike ', '  A red double-decker bus\t',
                           'A plate of food with broccoli and rice', '', 'A CAT, a Dog & a bird; (together) ... ',
                           "it's a man's hat - isn't it?", 'A dog\xa0on a sofa\x85 '],
              'cider': 252.11369966107995},
    'cider_line_breaks': {'captions': ['A plate\x0c of food ', ' A cat on a mat\r', '\u2028A bird in the sky ',
                                       'A man on a horse\r ', 'A boat on the water.', 'A dog on a sofa'],
                          'cider': 54.679575395475034},
    'okvqa_stem': {'stems': ['dog', 'Dog', 'cat', 'leaf', 'christmas', 'run', 'ride', 'ski', 'spring', 'glass', 'bus',
                             'man', 'sheep', 'kid', 'police', 'jean', 'ski', 'two dog swim', 'cloth'],
                   'generations': ['dog', 'run', 'christmas trees', 'two leaf', 'glass', '', 'bus']},
    'okvqa_accuracy': {'predictions': ['dog', 'run', 'christmas trees', 'two leaf', 'glass', '', 'bus'],
                       'per_question': [0.9, 1.0, 0.0, 1.0, 0.9, 0.0, 1.0],
                       'overall': 68.57},
    'classification': {'hateful_memes': {'figure': 0.495,
                                         'p_yes': [0.26894140243530273, 0.7310585975646973, 0.0, 0.0, 0.0, 0.5,
                                                   0.9478464722633362, 0.4750208258628845, 0.562176525592804,
                                                   0.5124974250793457, 0.8052335381507874, 0.018220365047454834,
                                                   0.8838223814964294, 0.5475860834121704, 0.9794968366622925,
                                                   0.8573812246322632, 0.1538744568824768, 0.3127633333206177,
                                                   0.08995366096496582, 0.9963416457176208, 0.19579356908798218,
                                                   0.07498294115066528, 0.8516826629638672, 0.48253554105758667,
                                                   0.8633455634117126, 0.9404537081718445, 0.3630915880203247,
                                                   0.6784338355064392, 0.8209047913551331, 0.23329752683639526]},
                       'imagenet': {'figure': 0.5555555555555556, 'predicted': [0, 5, 1, 1, 900, 2, 3, 40, 4]}},
}


if __name__ == "__main__":
    if not original_available():
        sys.exit(f"{ORIGINAL_PYTHON} is missing or incomplete: bash scripts/setup_original_env.sh")
    print("ORIGINAL_FIGURES: dict[str, object] = {")
    for key, value in run_original(_requests()).items():
        indent = " " * (len(repr(key)) + 6)
        text = pprint.pformat(value, width=120 - len(indent), compact=True, sort_dicts=False)
        print(f"    {key!r}: " + text.replace("\n", "\n" + indent) + ",")
    print("}")
