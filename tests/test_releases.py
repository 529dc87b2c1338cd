"""The release facts as data (`openflamingo_hf.release_data`, `releases.json`) and the configs built from them
(`openflamingo_hf.releases.get_release_config`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import openflamingo_hf.release_data as release_data
from openflamingo_hf.modeling.configuration_openflamingo import CLIP_VIT_L_14
from openflamingo_hf.releases import RELEASES, _text_config, get_release_config

# Every field of `get_release_config(name).to_dict()` (but `transformers_version`) as the code produced it before the
# facts moved into releases.json, written out here so that the data must reproduce each of them exactly.
VISION_CONFIG_FIELDS = {'architectures': None,
 'output_hidden_states': False,
 'return_dict': True,
 'dtype': None,
 'chunk_size_feed_forward': 0,
 'is_encoder_decoder': False,
 'id2label': {'0': 'LABEL_0', '1': 'LABEL_1'},
 'label2id': {'LABEL_0': 0, 'LABEL_1': 1},
 'problem_type': None,
 'hidden_size': 1024,
 'intermediate_size': 4096,
 'projection_dim': 768,
 'num_hidden_layers': 24,
 'num_attention_heads': 16,
 'num_channels': 3,
 'image_size': 224,
 'patch_size': 14,
 'hidden_act': 'quick_gelu',
 'layer_norm_eps': 1e-05,
 'attention_dropout': 0.0,
 'initializer_range': 0.02,
 'initializer_factor': 1.0,
 '_name_or_path': '',
 'model_type': 'clip_vision_model',
 'output_attentions': False}

TEXT_CONFIG_FIELDS = {'mosaic_gpt': {'architectures': None,
                'output_hidden_states': False,
                'return_dict': True,
                'dtype': None,
                'chunk_size_feed_forward': 0,
                'is_encoder_decoder': False,
                'id2label': {'0': 'LABEL_0', '1': 'LABEL_1'},
                'label2id': {'LABEL_0': 0, 'LABEL_1': 1},
                'problem_type': None,
                'd_model': 2048,
                'n_heads': 16,
                'n_layers': 24,
                'mlp_ratio': 4,
                'max_seq_len': 2048,
                'vocab_size': 50280,
                'attn_pdrop': 0.0,
                'resid_pdrop': 0.0,
                'emb_pdrop': 0.0,
                'attn_qk_ln': True,
                'attn_clip_qkv': None,
                'softmax_scale': None,
                'alibi': True,
                'alibi_bias_max': 8,
                'alibi_interleave_slopes': False,
                'no_bias': True,
                'logit_scale': None,
                'embedding_fraction': 1.0,
                'init_std': 0.02,
                'init_device': 'cpu',
                'layer_norm_epsilon': 1e-05,
                'use_cache': True,
                'checkpoint_layout': 'mosaic_gpt',
                'tie_word_embeddings': True,
                'pad_token_id': 50279,
                'bos_token_id': 0,
                'eos_token_id': 0,
                '_name_or_path': '',
                'model_type': 'mosaic_gpt',
                'output_attentions': False},
 'gpt_neox': {'architectures': None,
              'output_hidden_states': False,
              'return_dict': True,
              'dtype': None,
              'chunk_size_feed_forward': 0,
              'is_encoder_decoder': False,
              'id2label': {'0': 'LABEL_0', '1': 'LABEL_1'},
              'label2id': {'LABEL_0': 0, 'LABEL_1': 1},
              'problem_type': None,
              'vocab_size': 50280,
              'hidden_size': 2560,
              'num_hidden_layers': 32,
              'num_attention_heads': 32,
              'intermediate_size': 10240,
              'hidden_act': 'gelu',
              'attention_dropout': 0.0,
              'hidden_dropout': 0.0,
              'classifier_dropout': 0.1,
              'max_position_embeddings': 2048,
              'initializer_range': 0.02,
              'layer_norm_eps': 1e-05,
              'use_cache': True,
              'bos_token_id': 0,
              'eos_token_id': 0,
              'pad_token_id': 50279,
              'tie_word_embeddings': False,
              'use_parallel_residual': False,
              'rope_parameters': {'rope_theta': 10000, 'partial_rotary_factor': 1.0, 'rope_type': 'default'},
              'attention_bias': True,
              'is_decoder': False,
              '_name_or_path': '',
              'model_type': 'gpt_neox',
              'output_attentions': False},
 'mpt': {'architectures': None,
         'output_hidden_states': False,
         'return_dict': True,
         'dtype': None,
         'chunk_size_feed_forward': 0,
         'is_encoder_decoder': False,
         'id2label': {'0': 'LABEL_0', '1': 'LABEL_1'},
         'label2id': {'LABEL_0': 0, 'LABEL_1': 1},
         'problem_type': None,
         'd_model': 4096,
         'n_heads': 32,
         'n_layers': 32,
         'mlp_ratio': 4,
         'max_seq_len': 2048,
         'vocab_size': 50280,
         'attn_pdrop': 0.0,
         'resid_pdrop': 0.0,
         'emb_pdrop': 0.0,
         'attn_qk_ln': False,
         'attn_clip_qkv': None,
         'softmax_scale': None,
         'alibi': True,
         'alibi_bias_max': 8,
         'alibi_interleave_slopes': True,
         'no_bias': True,
         'logit_scale': None,
         'embedding_fraction': 1.0,
         'init_std': 0.02,
         'init_device': 'cpu',
         'layer_norm_epsilon': 1e-05,
         'use_cache': True,
         'checkpoint_layout': 'mpt',
         'tie_word_embeddings': True,
         'pad_token_id': 50279,
         'bos_token_id': 0,
         'eos_token_id': 0,
         '_name_or_path': '',
         'model_type': 'mosaic_gpt',
         'output_attentions': False}}

OPENFLAMINGO_CONFIG_FIELDS = {'architectures': None,
 'output_hidden_states': False,
 'return_dict': True,
 'dtype': None,
 'chunk_size_feed_forward': 0,
 'is_encoder_decoder': False,
 'id2label': {'0': 'LABEL_0', '1': 'LABEL_1'},
 'label2id': {'LABEL_0': 0, 'LABEL_1': 1},
 'problem_type': None,
 'media_token_id': 50278,
 'eoc_token_id': 50277,
 'perceiver_depth': 6,
 'perceiver_num_heads': 8,
 'perceiver_head_dim': 64,
 'perceiver_num_latents': 64,
 'perceiver_ff_mult': 4,
 'perceiver_max_num_media': None,
 'perceiver_max_num_frames': None,
 'cross_attn_num_heads': 8,
 'cross_attn_head_dim': 64,
 'cross_attn_ff_mult': 4,
 'only_attend_immediate_media': True,
 'vision_feature_select_strategy': 'default',
 'decoder_layers_attr_name': None,
 '_name_or_path': '',
 'model_type': 'openflamingo',
 'output_attentions': False}

RELEASE_SPECIFIC_FIELDS = {'OpenFlamingo-3B-vitl-mpt1b': ('mosaic_gpt', 1, True),
 'OpenFlamingo-3B-vitl-mpt1b-langinstruct': ('mosaic_gpt', 1, True),
 'OpenFlamingo-4B-vitl-rpj3b': ('gpt_neox', 2, False),
 'OpenFlamingo-4B-vitl-rpj3b-langinstruct': ('gpt_neox', 2, False),
 'OpenFlamingo-9B-vitl-mpt7b': ('mpt', 4, True)}


def _expected_config(name: str) -> dict:
    family, interval, tied = RELEASE_SPECIFIC_FIELDS[name]
    return {**OPENFLAMINGO_CONFIG_FIELDS, "vision_config": VISION_CONFIG_FIELDS,
            "text_config": TEXT_CONFIG_FIELDS[family], "cross_attn_every_n_layers": interval,
            "tie_word_embeddings": tied}


def test_the_data_lists_the_five_releases_in_order():
    assert list(RELEASES) == list(RELEASE_SPECIFIC_FIELDS)


@pytest.mark.parametrize("name", list(RELEASE_SPECIFIC_FIELDS))
def test_release_config_reproduces_every_field(name):
    produced = json.loads(json.dumps(get_release_config(name).to_dict()))  # int keys of id2label as JSON writes them
    produced.pop("transformers_version")
    assert produced == _expected_config(name)


def test_release_vision_tower_is_the_default_vision_config():
    """The releases' vision tower is the one `OpenFlamingoConfig` builds when given none."""
    assert {k: v for k, v in release_data.VISION_CONFIG.items() if k != "model_type"} == CLIP_VIT_L_14


def test_unknown_language_model_family_names_the_known_ones():
    with pytest.raises(ValueError, match="'llama'.*'mosaic_gpt', 'gpt_neox', 'mpt'"):
        _text_config("llama")


def test_malformed_published_row_names_the_release_and_task():
    entry = {"name": "OpenFlamingo-X", "published_scores": {"coco": [[1.0, 0.1]] * 4}}
    with pytest.raises(ValueError, match="'OpenFlamingo-X'.*'coco'.*5 \\[mean, std\\] cells"):
        release_data._scores(entry)
    entry["published_scores"] = {"gqa": [[1.0, 0.1]] * 5}
    with pytest.raises(ValueError, match="'gqa' must be one of"):
        release_data._scores(entry)


def test_release_rows_need_neither_torch_nor_transformers():
    """`openflamingo releases` reads only the data module: loading that file alone and listing the releases leaves
    torch and transformers unimported. (The file is loaded by path because the package's `__init__` imports
    transformers.)"""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('release_data', {release_data.__file__!r})\n"
        "module = sys.modules['release_data'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "rows = module.release_rows()\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(json.dumps(rows))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": ""})
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)
    assert rows == release_data.release_rows()
    assert [row["name"] for row in rows] == list(RELEASES)
    assert rows[-1]["vqav2_accuracy_4shot"] == 54.8
    assert rows[-1]["checkpoint_repo"] == "openflamingo/OpenFlamingo-9B-vitl-mpt7b"
