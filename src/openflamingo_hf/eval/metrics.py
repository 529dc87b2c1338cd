"""
The metrics of the OpenFlamingo few-shot evaluation suite, each returning the percentage the papers report (0-100).

- `compute_vqa_accuracy`: the VQA accuracy that open_flamingo 2.0.1 computes (`VQAEval.evaluate` in
  `open_flamingo/eval/vqa_metric.py`, its copy of the VQAv2 evaluation code), for VQAv2, OK-VQA, TextVQA and VizWiz.
  That copy normalises the prediction and every answer always; some copies of the official `vqaEval.py` skip the
  normalisation when all annotators gave the same answer, open_flamingo's does not, and it produced the published
  figures. With `ok_vqa=True` predictions first go through open_flamingo's `postprocess_ok_vqa_generation` (answer cut,
  then OK-VQA's stemming, `okvqa_stem`).
- `compute_cider`: CIDEr-D as the COCO caption evaluation computes it (pycocoevalcap's `PTBTokenizer`, then `Cider`),
  i.e. open_flamingo's `coco_metric.compute_cider(...)["CIDEr"] * 100`; for COCO and Flickr30K.
- `compute_roc_auc`: ROC-AUC (scikit-learn's `roc_auc_score`, which open_flamingo calls); for Hateful Memes.
- `compute_accuracy`: top-1 exact match of class names; for ImageNet.

Each returns a percentage; open_flamingo's evaluation returns ROC-AUC and ImageNet accuracy as fractions (0-1) and
the VQA accuracy rounded to two decimals, and reports these figures. tests/test_eval_vs_original.py runs open_flamingo's
own code on crafted inputs and checks that these functions give its numbers.

Heavy or optional dependencies (pycocoevalcap, scikit-learn, nltk, inflection: the `eval` extra) are imported inside the
functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "compute_accuracy",
    "compute_cider",
    "compute_roc_auc",
    "compute_vqa_accuracy",
    "okvqa_stem",
]

_EVAL_EXTRA_HINT = "pip install 'openflamingo-hf[eval]'"

# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy (open_flamingo/eval/vqa_metric.py, VQAEval)
# ---------------------------------------------------------------------------------------------------------------------

# Data tables of the VQA evaluation code, reproduced as data. Keys with capitals ("Id've", "Im", "Ive") can never
# match because words are lower-cased first; they are kept because open_flamingo's table has them.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
# The evaluation code's pattern, verbatim: "(?!<=\d)" was meant as a look-behind but is a look-ahead that never fails
# here, so every "." not followed by a digit is removed ("3.5" keeps its point, "dog." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The evaluation code calls `periodStrip.sub("", text, re.UNICODE)`, which passes re.UNICODE (== 32) as `count`: at
# most 32 periods are removed. Kept so that results stay identical.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """`VQAEval.processPunctuation`: each mark is deleted where it touches a space (or wherever, once the text has a
    comma between two digits, so "1,000" -> "1000") and turned into a space otherwise; then periods are stripped."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        # The tests look at the original text, not at `out`, as the evaluation code does.
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """`VQAEval.processDigitArticle`: lower-case, split on whitespace, number words -> digits, drop articles, restore
    apostrophes of contractions, join with single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _normalise_answer(text: str) -> str:
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def _vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy (0-1), exactly as open_flamingo's `VQAEval.evaluate` computes it: the prediction and
    every answer are normalised, whether or not the annotators agree."""
    prediction = _normalise_answer(prediction)
    answers = [_normalise_answer(answer) for answer in answers]
    per_left_out = []
    for left_out in range(len(answers)):
        matching = sum(1 for i, answer in enumerate(answers) if i != left_out and answer == prediction)
        per_left_out.append(min(1.0, matching / 3))
    return sum(per_left_out) / len(per_left_out)


def _cut_vqa_answer(text: str) -> str:
    """open_flamingo's answer cut (`postprocess_vqa_generation`): up to the first "Question", "Answer" or "Short",
    then up to the first ", "; not stripped."""
    return re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0]


def compute_vqa_accuracy(predictions: list[str], answers: list[list[str]], *, ok_vqa: bool = False) -> float:
    """
    The VQA accuracy that open_flamingo 2.0.1 computes (`VQAEval.evaluate` in `open_flamingo/eval/vqa_metric.py`, its
    copy of the VQAv2 evaluation code), in percent.

    Per question, the prediction and every answer are normalised: newlines and tabs become spaces and both ends are
    stripped; punctuation handling (a mark next to a space is deleted, otherwise it becomes a space; every mark is
    deleted once the text has a comma between digits, "1,000" -> "1000"; periods not followed by a digit are removed,
    "3.5" keeps its point); lower-casing, number words to digits ("two" -> "2"), removal of "a", "an", "the", and the
    contractions table ("dont" -> "don't"), words re-joined by single spaces. This happens also when all annotators
    gave the same answer ("Yes." scores 100 against ten "yes"): open_flamingo's copy has no exception for that case,
    unlike some copies of the official `vqaEval.py`. The accuracy of the question is the mean, over each annotator left
    out in turn (10 subsets for the usual 10 answers), of min(1, #other answers equal to the prediction / 3). (The
    original leaves out an annotation record; the records of VQA-format annotation files are distinct, as their
    `answer_id`s are, so one answer is left out each time.) The result is the mean over questions times 100.

    Not rounded: open_flamingo's `compute_vqa_accuracy` returns `round(accuracy, 2)` (VQAEval's `n=2`), and its
    evaluation reports the mean of those per-trial figures; `round(compute_vqa_accuracy(...), 2)` is that number.

    Args:
        predictions: one generated answer per question, already cut by the generation post-processing (open_flamingo's
            `postprocess_vqa_generation`, `OpenFlamingoProcessor.postprocess_answer("vqa", ...)` here).
        answers: for each question, every annotator's answer (usually 10). For OK-VQA pass the v1.1 `answers` field,
            which is stemmed already.
        ok_vqa: first apply open_flamingo's `postprocess_ok_vqa_generation` to each prediction: cut at the first
            "Question", "Answer" or "Short", then at the first ", ", then `okvqa_stem` (needs the `eval` extra and NLTK
            data; see there). The cuts change nothing in an answer that `postprocess_answer` has cut already.

    Raises:
        ValueError: the lists differ in length, are empty, or a question has no answers.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"compute_vqa_accuracy got {len(predictions)} predictions but {len(answers)} answer lists; "
            "they must have one entry per question"
        )
    if not predictions:
        raise ValueError("compute_vqa_accuracy got no questions (0 predictions and 0 answer lists)")
    for index, question_answers in enumerate(answers):
        if isinstance(question_answers, str):
            raise ValueError(
                f"answers[{index}] is a string ({question_answers!r}); each entry must be the list of that "
                "question's annotator answers"
            )
        if len(question_answers) == 0:
            raise ValueError(f"question {index} has no answers (len(answers[{index}]) == 0)")
    if ok_vqa:
        predictions = [okvqa_stem(_cut_vqa_answer(p)) for p in predictions]
    total = sum(_vqa_question_accuracy(p, a) for p, a in zip(predictions, answers))
    return 100.0 * total / len(predictions)


# ---------------------------------------------------------------------------------------------------------------------
# OK-VQA stemming (open_flamingo/eval/ok_vqa_utils.py)
# ---------------------------------------------------------------------------------------------------------------------

# open_flamingo's `_MANUAL_MATCHES`, reproduced as data: words its automatic rules miss or get wrong, with the form the
# OK-VQA v1.1 stemming expects (found by comparing `raw_answers` with `answers` of the released data set).
_MANUAL_MATCHES: dict[str, str] = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
    "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn",
    "graves": "grave", "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath",
    "tenning": "ten", "wetness": "wet", "urinating": "urine", "sickness": "sick", "braves": "brave",
    "firefighting": "firefight", "lenses": "lens", "reflections": "reflect", "backpackers": "backpack",
    "eatting": "eat", "designers": "design", "curiousity": "curious", "playfulness": "play", "blindness": "blind",
    "hawke": "hawk", "tomatoe": "tomato", "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus",
    "skateboarders": "skateboard", "staring": "stare", "electronics": "electron", "electicity": "elect",
    "mountainous": "mountain", "socializing": "social", "hamburgers": "hamburg", "caves": "cave",
    "transitions": "transit", "wading": "wade", "creame": "cream", "toileting": "toilet", "sautee": "saute",
    "buildings": "build", "belongings": "belong", "stockings": "stock", "walle": "wall", "cumulis": "cumuli",
    "travelers": "travel", "conducter": "conduct", "browsing": "brows", "pooping": "poop",
    "haircutting": "haircut", "toppings": "top", "hearding": "heard", "sunblocker": "sunblock", "bases": "base",
    "markings": "mark", "mopeds": "mope", "kindergartener": "kindergarten", "pies": "pie",
    "scrapbooking": "scrapbook", "couponing": "coupon", "meetings": "meet", "elevators": "elev", "lowes": "low",
    "men's": "men", "childrens": "children", "shelves": "shelve", "paintings": "paint", "raines": "rain",
    "paring": "pare", "expressions": "express", "routes": "rout", "pease": "peas", "vastness": "vast",
    "awning": "awn", "boy's": "boy", "drunkenness": "drunken", "teasing": "teas", "conferences": "confer",
    "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn", "reporters": "report", "kid's": "kid",
    "containers": "contain", "corgie": "corgi", "porche": "porch", "microwaves": "microwave",
    "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen", "striping": "stripe",
    "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer",
    "potatoe": "potato", "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder",
    "propellers": "propel", "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill",
    "crepte": "crept", "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
    "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove",
    "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal",
    "minerals": "miner", "protesters": "protest", "controllers": "control", "weddings": "wed",
    "sometimes": "sometime", "earing": "ear",
}  # fmt: skip

_NLTK_DATA_HINT = (
    "OK-VQA stemming needs the NLTK data packages 'punkt_tab' (word_tokenize), 'averaged_perceptron_tagger_eng' "
    "(pos_tag) and 'wordnet' (WordNetLemmatizer), which are not on PyPI: install them on a machine with internet "
    "access with `python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet` (or copy an nltk_data "
    "folder and point NLTK_DATA at it)"
)


_Tokenize = Callable[[str], list[str]]
_PosTag = Callable[[list[str]], list[tuple[str, str]]]


@functools.lru_cache(maxsize=1)
def _load_nltk() -> tuple[_Tokenize, _PosTag, Callable[[str], str]]:
    """(word_tokenize, pos_tag, verb lemmatiser) of NLTK, checked once to have their data."""
    try:
        import nltk
        from nltk.corpus.reader import VERB
    except ImportError as error:
        raise RuntimeError(f"OK-VQA stemming needs nltk and inflection: {_EVAL_EXTRA_HINT}") from error
    lemmatizer = nltk.stem.WordNetLemmatizer()

    def lemmatize_verb(word: str) -> str:
        return lemmatizer.lemmatize(word, VERB)

    try:  # load every resource now, so a missing one fails here and not on the first word that needs it
        nltk.pos_tag(nltk.tokenize.word_tokenize("two dogs running"))
        lemmatize_verb("running")
    except LookupError as error:
        found = re.search(r"Resource '?([\w.]+)'? not found", str(error))
        missing = f" (missing: {found.group(1)})" if found else ""
        raise RuntimeError(f"{_NLTK_DATA_HINT}{missing}") from error
    return nltk.tokenize.word_tokenize, nltk.pos_tag, lemmatize_verb


def okvqa_stem(answer: str) -> str:
    """
    OK-VQA v1.1's answer stemming, as open_flamingo's `OKVQAStemmer.stem` (`open_flamingo/eval/ok_vqa_utils.py`)
    does it: the text is split with NLTK's `word_tokenize` and tagged with `pos_tag`; each token is then replaced by
    its entry in the manual-matches table if it has one, else lemmatised as a verb with WordNet if it ends in "ing",
    else singularised with `inflection.singularize` if tagged NNS; tokens are joined with single spaces.
    ("dogs" -> "dog", "riding" -> "ride", "christmas" -> "christmas" from the table.)

    Needs nltk and inflection (the `eval` extra) and NLTK's data 'punkt_tab', 'averaged_perceptron_tagger_eng' and
    'wordnet', which no PyPI package provides: without them this raises RuntimeError saying how to install them,
    rather than stemming differently. (open_flamingo used NLTK's older 'averaged_perceptron_tagger' and 'punkt',
    which NLTK >= 3.9 replaced by these.)
    """
    tokenize, pos_tag, lemmatize_verb = _load_nltk()
    try:
        import inflection
    except ImportError as error:
        raise RuntimeError(f"OK-VQA stemming needs nltk and inflection: {_EVAL_EXTRA_HINT}") from error
    stemmed = []
    for word, tag in pos_tag(tokenize(answer)):
        if word in _MANUAL_MATCHES:
            word = _MANUAL_MATCHES[word]
        elif word.endswith("ing"):
            word = lemmatize_verb(word)
        elif tag.startswith("NNS") or tag.startswith("NNPS"):  # as the original ("NNPS" never starts "NNS")
            word = inflection.singularize(word)
        stemmed.append(word)
    return " ".join(stemmed)


# ---------------------------------------------------------------------------------------------------------------------
# CIDEr (COCO caption evaluation)
# ---------------------------------------------------------------------------------------------------------------------

_JAVA_HINT = (
    "CIDEr's tokenizer (pycocoevalcap's PTBTokenizer, Stanford CoreNLP) needs Java, but no `java` was found on "
    "PATH: install a Java runtime, e.g. `apt-get install default-jre`"
)


def _few(ids: Sequence[object], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in sorted(ids, key=repr)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def compute_cider(predictions: Mapping[object, str], references: Mapping[object, Sequence[str] | str]) -> float:
    """
    CIDEr-D of the generated captions, in percent, computed as the COCO caption evaluation (`COCOEvalCap`) does:
    pycocoevalcap's `PTBTokenizer` (Stanford PTB tokenizer, lower-cased, punctuation removed) on the references and on
    the predictions, then `Cider().compute_score(references, predictions)`, times 100. As in COCO, document
    frequencies are taken over the references of the ids given, so the score depends on the whole set evaluated.

    Args:
        predictions: id -> generated caption.
        references: id -> its reference captions (a list, or a single caption as a str); the same ids.

    Raises:
        ValueError: no ids, ids that differ between the two, a prediction that is not a str, or an id with no
            references.
        RuntimeError: `java` is not on PATH (the tokenizer needs it).
        ImportError: pycocoevalcap is not installed (the `eval` extra).
    """
    if not predictions or not references:
        raise ValueError(
            f"compute_cider needs at least one caption (got {len(predictions)} predictions, "
            f"{len(references)} references)"
        )
    missing_refs = [i for i in predictions if i not in references]
    missing_preds = [i for i in references if i not in predictions]
    if missing_refs or missing_preds:
        parts = []
        if missing_refs:
            parts.append(f"ids with a prediction but no references: {_few(missing_refs)}")
        if missing_preds:
            parts.append(f"ids with references but no prediction: {_few(missing_preds)}")
        raise ValueError("compute_cider needs the same ids in predictions and references; " + "; ".join(parts))
    gts: dict[object, list[dict[str, str]]] = {}
    res: dict[object, list[dict[str, str]]] = {}
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(f"prediction for id {key!r} must be a str, got {type(prediction).__name__}")
        refs = references[key]
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"id {key!r} has no reference captions")
        gts[key] = [{"caption": ref} for ref in refs]
        res[key] = [{"caption": prediction}]
    if shutil.which("java") is None:
        raise RuntimeError(_JAVA_HINT)
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ImportError(f"compute_cider needs pycocoevalcap: {_EVAL_EXTRA_HINT}") from error
    tokenizer = PTBTokenizer()
    score, _ = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))
    return 100.0 * float(score)


# ---------------------------------------------------------------------------------------------------------------------
# ROC-AUC (Hateful Memes) and accuracy (ImageNet)
# ---------------------------------------------------------------------------------------------------------------------


def compute_roc_auc(labels: list[int] | list[bool], scores: list[float]) -> float:
    """
    Area under the ROC curve, in percent: scikit-learn's `roc_auc_score(labels, scores) * 100`, i.e. the probability
    that a random positive scores above a random negative (ties count half). As open_flamingo scores Hateful Memes.

    Args:
        labels: 1/True for the positive class (hateful), 0/False for the negative.
        scores: the model's score for the positive class, one per label; higher means more likely positive.

    Raises:
        ValueError: lengths differ, no examples, labels other than 0/1, or only one class present (AUC undefined).
        ImportError: scikit-learn is not installed (the `eval` extra).
    """
    if len(labels) != len(scores):
        raise ValueError(f"compute_roc_auc got {len(labels)} labels but {len(scores)} scores")
    if not labels:
        raise ValueError("compute_roc_auc got no examples")
    as_int = [int(label) for label in labels]
    if any(label not in (0, 1) or label != original for label, original in zip(as_int, labels)):
        values = sorted(set(labels), key=repr)[:5]
        raise ValueError(f"compute_roc_auc labels must be 0/1 or booleans, got values {values}")
    if len(set(as_int)) < 2:
        raise ValueError(
            f"ROC-AUC is undefined with only one class present (all {len(as_int)} labels are {as_int[0]})"
        )
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError as error:
        raise ImportError(f"compute_roc_auc needs scikit-learn: {_EVAL_EXTRA_HINT}") from error
    return 100.0 * float(roc_auc_score(as_int, [float(score) for score in scores]))


def compute_accuracy(predictions: list[str], labels: list[str]) -> float:
    """
    Top-1 accuracy in percent: the share of predictions exactly equal (as strings, no normalisation) to their label,
    times 100. As open_flamingo scores ImageNet (predicted class name against the true class name).

    Raises:
        ValueError: lengths differ or no examples.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"compute_accuracy got {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("compute_accuracy got no examples")
    return 100.0 * sum(1 for prediction, label in zip(predictions, labels) if prediction == label) / len(predictions)
