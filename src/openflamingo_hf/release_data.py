"""
The five released OpenFlamingo v2 models as data: `releases.json` beside this file, read with the standard library.

This module imports neither torch nor transformers, so that listing the releases (`openflamingo releases`) stays
light; `openflamingo_hf.releases.get_release_config` builds the transformers configs from the same data.

What `releases.json` holds
--------------------------
- `checkpoint_file`, `vision_model`, `vision_config`: every release combines OpenAI CLIP ViT-L/14 (224 px) with a
  pretrained causal language model into which gated cross-attention blocks were inserted every N decoder layers. The
  hub repo `openflamingo/<name>` holds one file, `checkpoint.pt`, with only what was trained plus the language
  model's embeddings; the language model and the vision tower come from their own repos (see
  `openflamingo_hf.convert`).
- `language_model_families`: the language model's architecture per family, from the public `config.json` of each
  language model repo. MPT-1B (MosaicGPT): d_model 2048, 16 heads, 24 layers, mlp_ratio 4, ALiBi (max 8), q/k
  LayerNorm, no biases, tied output. RedPajama-INCITE-3B (GPT-NeoX): hidden 2560, 32 layers, 32 heads, intermediate
  10240, GELU, rotary_pct 1.0 (base 10000), sequential residual (`use_parallel_residual` false), untied output, max
  2048 positions. MPT-7B: d_model 4096, 32 heads, 32 layers, expansion_ratio 4, ALiBi (max 8), no q/k LayerNorm, no
  biases, tied output; built as this package's MosaicGPT (model type `"mosaic_gpt"`, `checkpoint_layout="mpt"`: one
  fast MPT implementation for both MPT releases, its checkpoints keep MPT's parameter names, which the converter and
  `from_pretrained` map onto ours).
- `tokens`: the vocabulary and special-token ids (below), the same for all five.
- `releases`: per release its name, language model repo (also the tokenizer repo, as in the original README) and
  family, cross-attention interval, a one-line description, and its published scores with their source.

Vocabulary and special-token ids
--------------------------------
All five use the GPT-NeoX-20B tokenizer (50277 entries). The original code added `<|endofchunk|>` and `<image>` as
additional special tokens (in that order), then `<PAD>` because the tokenizer has no pad token, and resized the
language model's embeddings to `len(tokenizer)` = 50280 with `lang_encoder.resize_token_embeddings(len(tokenizer))`.
So although the language models' own configs say `vocab_size` 50432 (a padded size), the released checkpoints hold
50280-row embeddings (`transformer.wte` for MPT/MosaicGPT, tied to the output; `gpt_neox.embed_in` and `embed_out`
for RedPajama-INCITE, untied), and the release configs use `vocab_size=50280`. The ids (eoc 50277, image 50278,
pad 50279) follow from that order; the converter takes the ids from the tokenizer at conversion time and refuses to
proceed if they differ from these, since the checkpoint's trained embedding rows sit at these ids.

Published scores
----------------
Every score is transcribed from Table 11 ("Full evaluation results using demonstrations sampled uniformly at random
across seven vision-language datasets using 0, 4, 8, 16, and 32 in-context examples. Results are averaged across 3
evaluation seeds and reported with standard deviations.") of the OpenFlamingo technical report, Awadalla et al.
2023, arXiv:2308.01390, https://arxiv.org/abs/2308.01390 (HTML: https://ar5iv.labs.arxiv.org/html/2308.01390).
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
are the ones quoted here.

Metrics: COCO and Flickr-30K are CIDEr; VQAv2, OK-VQA, TextVQA and VizWiz are VQA accuracy (%); Hateful Memes is ROC
AUC (x100). The report gives no ImageNet figures for these releases, so no release has an "imagenet" entry; a cell
that is not in the source is left out rather than filled in. In the file each task's row is one `[mean, std]` cell
per entry of `published.shots`, the std over 3 seeds (`null` where not published).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("releases.json")
_DATA: dict[str, Any] = json.loads(DATA_FILE.read_text(encoding="utf-8"))

CHECKPOINT_FILE: str = _DATA["checkpoint_file"]
VISION_MODEL_REPO: str = _DATA["vision_model"]
#: The vision tower's config fields (with its `model_type`), the same for all five releases.
VISION_CONFIG: dict[str, Any] = _DATA["vision_config"]
#: language-model family -> its config fields (with its `model_type`), before the vocabulary resize.
LANGUAGE_MODEL_CONFIGS: dict[str, dict[str, Any]] = _DATA["language_model_families"]
ONLY_ATTEND_IMMEDIATE_MEDIA: bool = _DATA["only_attend_immediate_media"]

GPT_NEOX_TOKENIZER_SIZE: int = _DATA["tokens"]["tokenizer_size"]
RELEASE_EOC_TOKEN_ID: int = _DATA["tokens"]["eoc_token_id"]
RELEASE_MEDIA_TOKEN_ID: int = _DATA["tokens"]["media_token_id"]
RELEASE_PAD_TOKEN_ID: int = _DATA["tokens"]["pad_token_id"]
RELEASE_VOCAB_SIZE: int = _DATA["tokens"]["vocab_size"]  # len(tokenizer) after adding the three tokens
GPT_NEOX_EOS_TOKEN_ID: int = _DATA["tokens"]["eos_token_id"]  # <|endoftext|>

#: The evaluation tasks a release's published scores may name.
PUBLISHED_TASKS: tuple[str, ...] = tuple(_DATA["published"]["tasks"])
#: The numbers of in-context examples the published tables report.
SHOTS: tuple[int, ...] = tuple(_DATA["published"]["shots"])


@dataclass(frozen=True)
class OpenFlamingoRelease:
    """
    One released OpenFlamingo v2 model.

    Attributes:
        name: release name; the checkpoint lives in the hub repo `openflamingo/<name>`.
        language_model: hub repo of the language model (also the tokenizer repo, as in the original README).
        language_model_family: `"mosaic_gpt"` (MPT-1B remote code), `"gpt_neox"` or `"mpt"` (MPT-7B). Both MPT
            families are built as this package's `MosaicGPTForCausalLM` (with and without q/k LayerNorm); they differ
            in the parameter names of their checkpoints.
        cross_attn_every_n_layers: a gated cross-attention block before every N-th decoder layer.
        description: one line for the model card.

    Its published scores (all tasks and shots) are `PUBLISHED[name]`; `coco_cider_4shot` and `vqav2_accuracy_4shot`
    read the two headline figures from there.
    """

    name: str
    language_model: str
    language_model_family: str
    cross_attn_every_n_layers: int
    description: str

    @property
    def coco_cider_4shot(self) -> float:
        """Published COCO captioning CIDEr, 4 shots."""
        return PUBLISHED[self.name]["coco"][4][0]

    @property
    def vqav2_accuracy_4shot(self) -> float:
        """Published VQAv2 accuracy (%), 4 shots."""
        return PUBLISHED[self.name]["vqav2"][4][0]

    @property
    def checkpoint_repo(self) -> str:
        return f"openflamingo/{self.name}"

    @property
    def checkpoint_file(self) -> str:
        return CHECKPOINT_FILE

    @property
    def tokenizer(self) -> str:
        return self.language_model

    @property
    def vision_model(self) -> str:
        return VISION_MODEL_REPO


def _scores(entry: dict[str, Any]) -> dict[str, dict[int, tuple[float, float | None]]]:
    """One release's `published_scores` as {task: {shots: (mean, std)}}, checked against the file's tasks and
    shots (a malformed entry names itself, since every figure downstream would be silently wrong otherwise)."""
    table = {}
    for task, cells in entry["published_scores"].items():
        if task not in PUBLISHED_TASKS or len(cells) != len(SHOTS):
            raise ValueError(
                f"{DATA_FILE}: release {entry['name']!r}, published task {task!r} must be one of {PUBLISHED_TASKS} "
                f"with {len(SHOTS)} [mean, std] cells (one per shot count {SHOTS}); fix the entry."
            )
        table[task] = {shots: (cell[0], cell[1]) for shots, cell in zip(SHOTS, cells)}
    return table


_RELEASE_FIELDS = [field.name for field in fields(OpenFlamingoRelease)]

RELEASES: dict[str, OpenFlamingoRelease] = {
    entry["name"]: OpenFlamingoRelease(**{key: entry[key] for key in _RELEASE_FIELDS}) for entry in _DATA["releases"]
}

#: release name -> task -> shots -> (mean, standard deviation over 3 seeds, or None if not published).
PUBLISHED: dict[str, dict[str, dict[int, tuple[float, float | None]]]] = {
    entry["name"]: _scores(entry) for entry in _DATA["releases"]
}

#: release name -> URL of the table its scores were transcribed from.
SOURCES: dict[str, str] = {entry["name"]: entry["published_source"] for entry in _DATA["releases"]}

#: release name -> its Hugging Face model card (not the transcription source; see the module docstring).
MODEL_CARDS: dict[str, str] = {name: f"https://huggingface.co/{release.checkpoint_repo}" for name, release in
                               RELEASES.items()}


def get_release(name: str) -> OpenFlamingoRelease:
    """The release called `name` (one of `RELEASES`); a `KeyError` lists the valid names."""
    try:
        return RELEASES[name]
    except KeyError:
        raise KeyError(f"Unknown OpenFlamingo release {name!r}. Known releases: {', '.join(RELEASES)}.") from None


def published_scores(release_name: str) -> dict[tuple[str, int], float]:
    """
    The published mean scores of one release, as {(task, shots): mean}.

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
    return {(task, shots): mean for task, row in table.items() for shots, (mean, _std) in row.items()}


def release_rows() -> list[dict[str, Any]]:
    """One dict per release, as `openflamingo releases --json` prints them."""
    return [
        {**asdict(release), "coco_cider_4shot": release.coco_cider_4shot,
         "vqav2_accuracy_4shot": release.vqav2_accuracy_4shot, "checkpoint_repo": release.checkpoint_repo}
        for release in RELEASES.values()
    ]


__all__ = [
    "CHECKPOINT_FILE",
    "GPT_NEOX_EOS_TOKEN_ID",
    "GPT_NEOX_TOKENIZER_SIZE",
    "LANGUAGE_MODEL_CONFIGS",
    "MODEL_CARDS",
    "ONLY_ATTEND_IMMEDIATE_MEDIA",
    "OpenFlamingoRelease",
    "PUBLISHED",
    "PUBLISHED_TASKS",
    "RELEASES",
    "RELEASE_EOC_TOKEN_ID",
    "RELEASE_MEDIA_TOKEN_ID",
    "RELEASE_PAD_TOKEN_ID",
    "RELEASE_VOCAB_SIZE",
    "SHOTS",
    "SOURCES",
    "VISION_CONFIG",
    "VISION_MODEL_REPO",
    "get_release",
    "published_scores",
    "release_rows",
]
