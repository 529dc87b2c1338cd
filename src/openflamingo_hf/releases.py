"""The five released OpenFlamingo v2 models: where their parts live and their exact architecture, offline.

Every release combines OpenAI CLIP ViT-L/14 (224 px) with a pretrained causal language model into which gated
cross-attention blocks were inserted every N decoder layers. The hub repo `openflamingo/<name>` holds one file,
`checkpoint.pt`, with only what was trained plus the language model's embeddings; the language model and the vision
tower come from their own repos (see `openflamingo_hf.convert`).

Vocabulary and special-token ids
--------------------------------
All five use the GPT-NeoX-20B tokenizer (50277 entries). The original code added `<|endofchunk|>` and `<image>` as
additional special tokens (in that order), then `<PAD>` because the tokenizer has no pad token, and resized the
language model's embeddings to `len(tokenizer)` = 50280 with `lang_encoder.resize_token_embeddings(len(tokenizer))`.
So although the language models' own configs say `vocab_size` 50432 (a padded size), the released checkpoints hold
50280-row embeddings (`transformer.wte` for MPT/MosaicGPT, tied to the output; `gpt_neox.embed_in` and `embed_out`
for RedPajama-INCITE, untied), and `get_release_config` uses `vocab_size=50280`. The ids below (eoc 50277, image
50278, pad 50279) follow from that order; the converter takes the ids from the tokenizer at conversion time and
refuses to proceed if they differ from these, since the checkpoint's trained embedding rows sit at these ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, GPTNeoXConfig

from .modeling.configuration_mosaic_gpt import MosaicGPTConfig
from .modeling.configuration_openflamingo import CLIP_VIT_L_14, OpenFlamingoConfig

VISION_MODEL_REPO = "openai/clip-vit-large-patch14"
CHECKPOINT_FILE = "checkpoint.pt"

# GPT-NeoX-20B tokenizer: 50277 entries; the original appends <|endofchunk|>, <image>, <PAD> in this order.
GPT_NEOX_TOKENIZER_SIZE = 50277
RELEASE_EOC_TOKEN_ID = 50277
RELEASE_MEDIA_TOKEN_ID = 50278
RELEASE_PAD_TOKEN_ID = 50279
RELEASE_VOCAB_SIZE = 50280  # len(tokenizer) after adding the three tokens = embedding rows in the checkpoints
GPT_NEOX_EOS_TOKEN_ID = 0  # <|endoftext|>


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

    Its published scores (all benchmarks and shots) live in `openflamingo_hf.eval.published`; `coco_cider_4shot` and
    `vqav2_accuracy_4shot` read the two headline figures from there.
    """

    name: str
    language_model: str
    language_model_family: str
    cross_attn_every_n_layers: int
    description: str

    @property
    def coco_cider_4shot(self) -> float:
        """Published COCO captioning CIDEr, 4 shots."""
        from .eval.published import PUBLISHED

        return PUBLISHED[self.name]["coco"][4][0]

    @property
    def vqav2_accuracy_4shot(self) -> float:
        """Published VQAv2 accuracy (%), 4 shots."""
        from .eval.published import PUBLISHED

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


RELEASES: dict[str, OpenFlamingoRelease] = {
    release.name: release
    for release in (
        OpenFlamingoRelease(
            name="OpenFlamingo-3B-vitl-mpt1b",
            language_model="anas-awadalla/mpt-1b-redpajama-200b",
            language_model_family="mosaic_gpt",
            cross_attn_every_n_layers=1,
            description="CLIP ViT-L/14 + MPT-1B (RedPajama, 200B tokens), cross-attention in every layer.",
        ),
        OpenFlamingoRelease(
            name="OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            language_model="anas-awadalla/mpt-1b-redpajama-200b-dolly",
            language_model_family="mosaic_gpt",
            cross_attn_every_n_layers=1,
            description="CLIP ViT-L/14 + MPT-1B instruction-tuned on Dolly, cross-attention in every layer.",
        ),
        OpenFlamingoRelease(
            name="OpenFlamingo-4B-vitl-rpj3b",
            language_model="togethercomputer/RedPajama-INCITE-Base-3B-v1",
            language_model_family="gpt_neox",
            cross_attn_every_n_layers=2,
            description="CLIP ViT-L/14 + RedPajama-INCITE-Base-3B (GPT-NeoX), cross-attention every 2nd layer.",
        ),
        OpenFlamingoRelease(
            name="OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            language_model="togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
            language_model_family="gpt_neox",
            cross_attn_every_n_layers=2,
            description="CLIP ViT-L/14 + RedPajama-INCITE-Instruct-3B (GPT-NeoX), cross-attention every 2nd layer.",
        ),
        OpenFlamingoRelease(
            name="OpenFlamingo-9B-vitl-mpt7b",
            language_model="anas-awadalla/mpt-7b",
            language_model_family="mpt",
            cross_attn_every_n_layers=4,
            description="CLIP ViT-L/14 + MPT-7B, cross-attention every 4th layer.",
        ),
    )
}


def get_release(name: str) -> OpenFlamingoRelease:
    """The release called `name` (one of `RELEASES`); a `KeyError` lists the valid names."""
    try:
        return RELEASES[name]
    except KeyError:
        raise KeyError(f"Unknown OpenFlamingo release {name!r}. Known releases: {', '.join(RELEASES)}.") from None


def _text_config(family: str):
    """
    The language model's architecture as released, with the embedding resized to `RELEASE_VOCAB_SIZE` rows.

    Sources: the public `config.json` of each language model repo. MPT-1B (MosaicGPT): d_model 2048, 16 heads,
    24 layers, mlp_ratio 4, ALiBi (max 8), q/k LayerNorm, no biases, tied output. RedPajama-INCITE-3B (GPT-NeoX):
    hidden 2560, 32 layers, 32 heads, intermediate 10240, GELU, rotary_pct 1.0 (base 10000), sequential residual
    (`use_parallel_residual` false), untied output, max 2048 positions. MPT-7B: d_model 4096, 32 heads, 32 layers,
    expansion_ratio 4, ALiBi (max 8), no q/k LayerNorm, no biases, tied output; built as a `MosaicGPTConfig` (model
    type `"mosaic_gpt"`, `checkpoint_layout="mpt"`).
    """
    token_ids = dict(
        vocab_size=RELEASE_VOCAB_SIZE,
        bos_token_id=GPT_NEOX_EOS_TOKEN_ID,
        eos_token_id=GPT_NEOX_EOS_TOKEN_ID,
        pad_token_id=RELEASE_PAD_TOKEN_ID,
    )
    if family == "mosaic_gpt":
        return MosaicGPTConfig(
            d_model=2048,
            n_heads=16,
            n_layers=24,
            mlp_ratio=4,
            max_seq_len=2048,
            attn_qk_ln=True,
            alibi=True,
            alibi_bias_max=8,
            no_bias=True,
            tie_word_embeddings=True,
            **token_ids,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=10240,
            hidden_act="gelu",
            rotary_pct=1.0,
            rotary_emb_base=10000,
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            use_parallel_residual=False,
            tie_word_embeddings=False,
            **token_ids,
        )
    if family == "mpt":
        # MPT-7B is this package's MosaicGPT without q/k LayerNorm (one fast MPT implementation for both releases);
        # its checkpoints use MPT's parameter names, which the converter and `from_pretrained` map onto ours.
        return MosaicGPTConfig(
            d_model=4096,
            n_heads=32,
            n_layers=32,
            mlp_ratio=4,
            max_seq_len=2048,
            attn_qk_ln=False,
            attn_clip_qkv=None,
            alibi=True,
            alibi_bias_max=8,
            alibi_interleave_slopes=True,
            no_bias=True,
            layer_norm_epsilon=1e-5,
            checkpoint_layout="mpt",
            tie_word_embeddings=True,
            **token_ids,
        )
    raise ValueError(f"Unknown language-model family {family!r}; expected 'mosaic_gpt', 'gpt_neox' or 'mpt'.")


def get_release_config(name: str) -> OpenFlamingoConfig:
    """
    The exact architecture of a release, built offline (nothing is downloaded).

    Vision: CLIP ViT-L/14 at 224 px (width 1024, 24 layers, 16 heads, patch 14, 256 patch tokens). Perceiver and
    cross-attention sizes are the v2 defaults (Perceiver depth 6, 8 heads of 64, 64 latents; gated blocks 8 heads of
    64, ff x4). `media_token_id` / `eoc_token_id` are the ids the checkpoints were trained with (50278 / 50277, see
    the module docstring); the converter re-derives them from the tokenizer and checks they agree.

    Args:
        name: a key of `RELEASES`.
    Returns:
        `OpenFlamingoConfig`
    """
    release = get_release(name)
    # MosaicGPT lives in this package; make sure AutoConfig knows it before OpenFlamingoConfig resolves sub-configs.
    from .modeling.modeling_mosaic_gpt import register as register_mosaic_gpt

    register_mosaic_gpt()
    return OpenFlamingoConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_14),
        text_config=_text_config(release.language_model_family),
        cross_attn_every_n_layers=release.cross_attn_every_n_layers,
        media_token_id=RELEASE_MEDIA_TOKEN_ID,
        eoc_token_id=RELEASE_EOC_TOKEN_ID,
        only_attend_immediate_media=True,
    )


__all__ = [
    "CHECKPOINT_FILE",
    "GPT_NEOX_TOKENIZER_SIZE",
    "OpenFlamingoRelease",
    "RELEASES",
    "RELEASE_EOC_TOKEN_ID",
    "RELEASE_MEDIA_TOKEN_ID",
    "RELEASE_PAD_TOKEN_ID",
    "RELEASE_VOCAB_SIZE",
    "VISION_MODEL_REPO",
    "get_release",
    "get_release_config",
]
