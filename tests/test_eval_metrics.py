"""Tests of openflamingo_hf.eval.metrics against hand-computed values and pycocoevalcap/sklearn used directly (against
open_flamingo's own code: tests/test_eval_vs_original.py)."""

from __future__ import annotations

import shutil

import pytest

from openflamingo_hf.eval import metrics
from openflamingo_hf.eval.metrics import (
    compute_accuracy,
    compute_cider,
    compute_roc_auc,
    compute_vqa_accuracy,
    okvqa_stem,
)

# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


def _ten(matching: str, n_matching: int, other: str = "zebra") -> list[str]:
    return [matching] * n_matching + [other] * (10 - n_matching)


def test_vqa_three_of_ten_matching_is_90():
    # Leave-one-out over the 10 annotators: the 3 subsets with a matching annotator left out have 2 matches -> 2/3;
    # the 7 others keep all 3 -> min(1, 3/3) = 1.  (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert compute_vqa_accuracy(["cat"], [_ten("cat", 3)]) == pytest.approx(90.0)


def test_vqa_one_of_ten_matching_is_30():
    # Leaving the matching annotator out: 0 matches -> 0; the 9 other subsets: 1 match -> 1/3.  9 * (1/3) / 10 = 0.3
    assert compute_vqa_accuracy(["cat"], [_ten("cat", 1)]) == pytest.approx(30.0)


def test_vqa_four_or_more_matching_is_100_and_none_is_0():
    # With 4 matching, even leaving one of them out keeps 3 -> every subset scores 1.
    assert compute_vqa_accuracy(["cat"], [_ten("cat", 4)]) == pytest.approx(100.0)
    assert compute_vqa_accuracy(["dog"], [_ten("cat", 3)]) == 0.0


def test_vqa_fewer_than_ten_answers_leaves_each_out():
    # answers red, blue, blue; prediction blue. Leave red out: 2 blue -> 2/3; leave either blue out: 1 -> 1/3.
    # (2/3 + 1/3 + 1/3) / 3 = 4/9
    assert compute_vqa_accuracy(["blue"], [["red", "blue", "blue"]]) == pytest.approx(100 * 4 / 9)


def test_vqa_mean_over_questions():
    assert compute_vqa_accuracy(["cat", "dog"], [_ten("cat", 3), _ten("cat", 3)]) == pytest.approx(45.0)


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("Two", "2"),  # lower-casing, then number word -> digit
        ("the dog.", "dog"),  # article removed, trailing period stripped
        ("a dog", "the dog"),  # articles removed on the answers too
        ("dont", "don't"),  # contractions table
        ("1,000", "1000"),  # comma between digits: all marks deleted
        ("red,blue", "red blue"),  # a comma not touching a space becomes a space
        ("red, blue", "red blue"),  # a comma touching a space is deleted
        ("yes.", "yes"),  # trailing period
        ("  big   \n\tdog ", "big dog"),  # newline/tab -> space, strip, runs of spaces collapsed by split/join
        ("3.5", "3.5"),  # a period before a digit is kept ...
    ],
)
def test_vqa_normalisation_matches(prediction, answer):
    assert compute_vqa_accuracy([prediction], [_ten(answer, 3)]) == pytest.approx(90.0)


def test_vqa_decimal_point_is_not_stripped():
    # ... so "3.5" must not match "35" (a bug stripping every period would give 90 here).
    assert compute_vqa_accuracy(["3.5"], [_ten("35", 3)]) == 0.0


def test_vqa_normalises_even_when_all_answers_identical():
    # open_flamingo 2.0.1's VQAEval.evaluate (the code behind the published figures) normalises the prediction and the
    # answers always. Some copies of the official vqaEval.py skip that when all annotators agree, which would score
    # these 0; open_flamingo's does not (tests/test_eval_vs_original.py checks this against its code).
    assert compute_vqa_accuracy(["Two"], [["2"] * 10]) == pytest.approx(100.0)
    assert compute_vqa_accuracy(["yes."], [["yes"] * 10]) == pytest.approx(100.0)
    assert compute_vqa_accuracy(["ten"], [["10"] * 10]) == pytest.approx(100.0)
    assert compute_vqa_accuracy(["dog"], [["The Dog."] * 10]) == pytest.approx(100.0)  # the answers too
    assert compute_vqa_accuracy([" 2\n"], [["2"] * 10]) == pytest.approx(100.0)
    assert compute_vqa_accuracy(["3"], [["2"] * 10]) == 0.0


def test_vqa_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 answer"):
        compute_vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no answers"):
        compute_vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="no questions"):
        compute_vqa_accuracy([], [])


# ---------------------------------------------------------------------------------------------------------------------
# OK-VQA stemming
# ---------------------------------------------------------------------------------------------------------------------


def _nltk_data_available() -> bool:
    try:
        metrics._load_nltk()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def fake_nltk(monkeypatch):
    """Stands in for NLTK's tokenizer, tagger and WordNet (whose data is not on PyPI): whitespace tokens, words ending
    in "s" tagged NNS, a tiny verb-lemma table. The manual table and inflection.singularize are the real ones."""
    lemmas = {"running": "run", "swimming": "swim"}

    def pos_tag(tokens):
        return [(t, "NNS" if t.endswith("s") else "VBG" if t.endswith("ing") else "NN") for t in tokens]

    monkeypatch.setattr(metrics, "_load_nltk", lambda: (str.split, pos_tag, lambda w: lemmas.get(w, w)))


def test_okvqa_stem_rules(fake_nltk):
    assert okvqa_stem("dogs") == "dog"  # NNS -> inflection.singularize
    assert okvqa_stem("running") == "run"  # "-ing" -> WordNet verb lemma
    # the manual table wins over both rules: singularize would give "christma", WordNet "riding" stays as is
    assert okvqa_stem("christmas") == "christmas"
    assert okvqa_stem("riding") == "ride"
    assert okvqa_stem("leaves") == "leaf"
    assert okvqa_stem("tennis") == "tennis"
    assert okvqa_stem("two dogs swimming") == "two dog swim"


def test_vqa_ok_vqa_flag_cuts_and_stems_predictions(fake_nltk):
    answers = [_ten("dog", 3)]
    # open_flamingo's postprocess_ok_vqa_generation: cut at "Question"/"Answer"/"Short", then at the first ", ", then
    # stem
    assert compute_vqa_accuracy(["dogs Short answer: cats"], answers, ok_vqa=True) == pytest.approx(90.0)
    assert compute_vqa_accuracy(["dogs, cats"], answers, ok_vqa=True) == pytest.approx(90.0)
    assert compute_vqa_accuracy(["dogs"], answers) == 0.0  # no stemming without the flag


@pytest.mark.skipif(not _nltk_data_available(), reason="NLTK data (punkt_tab, tagger, wordnet) not installed")
def test_okvqa_stem_with_real_nltk():
    assert okvqa_stem("dogs") == "dog"
    assert okvqa_stem("running") == "run"
    assert okvqa_stem("christmas") == "christmas"
    assert okvqa_stem("riding") == "ride"


@pytest.mark.skipif(_nltk_data_available(), reason="NLTK data is installed here")
def test_okvqa_stem_without_nltk_data_says_what_to_install():
    with pytest.raises(RuntimeError, match="nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet"):
        okvqa_stem("dogs")


# ---------------------------------------------------------------------------------------------------------------------
# CIDEr
# ---------------------------------------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs Java")

_PREDICTIONS = {
    1: "A dog runs on the grass.",
    2: "a man riding a red bike",
    3: "two cats sleeping on a sofa",
}
_REFERENCES = {
    1: ["A dog running across a grassy field.", "A brown dog runs on the grass.", "The dog is playing outside."],
    2: ["A man rides a bicycle down the street.", "A person on a red bike.", "Man riding his bike."],
    3: ["Two cats are asleep on the couch.", "A pair of cats sleeping on a sofa.", "Cats napping together."],
}


@needs_java
def test_cider_matches_pycocoevalcap_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in _REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, v in _PREDICTIONS.items() for c in [v]})
    expected, _ = Cider().compute_score(gts, res)

    score = compute_cider(_PREDICTIONS, _REFERENCES)
    assert score == pytest.approx(100 * expected)
    assert 0 < score < 1000  # CIDEr-D x 100 of partly matching captions; rules out a missing/duplicated x100


@needs_java
def test_cider_tokenizes_and_accepts_single_reference_str():
    # PTBTokenizer lower-cases and drops punctuation, so these two predictions must score the same; a single reference
    # str must equal the one-element list.
    refs = {"a": "A dog on the grass.", "b": "A cat on a sofa."}
    plain = compute_cider({"a": "a dog on the grass", "b": "a cat"}, refs)
    noisy = compute_cider({"a": "A Dog, on the grass!", "b": "A cat."}, {k: [v] for k, v in refs.items()})
    assert plain == pytest.approx(noisy)
    assert plain > 0


def test_cider_errors(monkeypatch):
    with pytest.raises(ValueError, match="no references: 3"):
        compute_cider({1: "x", 3: "y"}, {1: ["x"], 2: ["z"]})
    with pytest.raises(ValueError, match="no prediction: 2"):
        compute_cider({1: "x", 3: "y"}, {1: ["x"], 2: ["z"]})
    with pytest.raises(ValueError, match="at least one caption"):
        compute_cider({}, {})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs Java.*apt-get install default-jre"):
        compute_cider({1: "x"}, {1: ["x"]})


# ---------------------------------------------------------------------------------------------------------------------
# ROC-AUC and accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_roc_auc_hand_computed():
    # positives 0.9, 0.8, 0.3; negatives 0.4, 0.2, 0.1: of the 9 positive/negative pairs only (0.3, 0.4) is inverted.
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.4, 0.2, 0.1]
    assert compute_roc_auc(labels, scores) == pytest.approx(100 * 8 / 9)
    assert compute_roc_auc([bool(x) for x in labels], scores) == pytest.approx(100 * 8 / 9)
    assert compute_roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(50.0)  # a tie counts half


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="one class"):
        compute_roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        compute_roc_auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        compute_roc_auc([2, 0], [0.1, 0.2])


def test_accuracy():
    # exact, case-sensitive match: 2 of 3
    assert compute_accuracy(["cat", "dog", "Dog"], ["cat", "dog", "dog"]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        compute_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        compute_accuracy([], [])
