"""Trains the embedded OpenFlamingo from scratch on CPU, as the released models were trained, in miniature.

    python examples/train_embedded.py --output_dir ./embedded-run
    cp ./embedded-run/model/* src/openflamingo_hf/embedded/model/           # ship it (what the package holds)

    # or fine-tune the shipped model on freshly drawn shards (stages 4-6 only):
    python examples/train_embedded.py --init_from src/openflamingo_hf/embedded/model --flamingo_steps 150 \
        --learning_rate 5e-4 --warmup_steps 15 --num_pairs 2000 --num_documents 1500 --seed 1 --output_dir ./ft

1. A byte-level BPE tokenizer on the world's text.
2. A CLIP-style vision tower: transformers' `CLIPModel` (tiny), trained contrastively on world images and captions.
3. A tiny causal LM (Llama-style, tied embeddings) trained on image-free world documents.
4. Both frozen; the Perceiver, the gated cross-attention blocks and the `<image>` / `<|endofchunk|>` embedding rows
   trained by `openflamingo-train` on pair shards and interleaved-document shards of the world (the recipe).
5. The model and processor alone (no optimizer or trainer state, no local paths) saved to `OUTPUT_DIR/model`.
6. Held-out evaluation of that folder: exact captions (bare `<image>`, and the released models' `Output:` prompt zero-
   and few-shot), short VQA answers, and tag-format following with 4 vs 0 demonstrations
   (`openflamingo_hf.embedded.evaluate_embedded`).

With `--init_from MODEL_DIR` only stages 4-6 run, from that OpenFlamingo folder (its frozen backbones and tokenizer
kept): a fine-tune on freshly drawn shards, e.g. after a change of the documents' mix.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from openflamingo_hf.cpu_threads import THREADS_HELP, set_cpu_threads
from openflamingo_hf.embedded import evaluate_embedded
from openflamingo_hf.embedded.world import make_examples, text_corpus, write_world_shards

EOS = "<|endoftext|>"
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64,
              patch_size=8, projection_dim=64)
LANGUAGE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
FLAMINGO = dict(perceiver_depth=2, perceiver_num_latents=16, perceiver_num_heads=4, perceiver_head_dim=32,
                cross_attn_num_heads=4, cross_attn_head_dim=32)


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_input_names=["input_ids", "attention_mask"])


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask. The tokenizer has no pad token (the processor adds OpenFlamingo's `<PAD>` later, as
    the original did), so rows are padded here with eos, which the mask hides."""
    rows = [torch.tensor(ids[:max_length]) for ids in tokenizer(texts)["input_ids"]]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.eos_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
    return {"input_ids": input_ids, "attention_mask": mask}


def image_processor() -> CLIPImageProcessor:
    from openflamingo_hf.processing.processing_openflamingo import default_image_processor

    processor = default_image_processor()
    processor.size = {"shortest_edge": VISION["image_size"]}
    processor.crop_size = {"height": VISION["image_size"], "width": VISION["image_size"]}
    return processor


def train_vision_tower(tokenizer, num_examples: int, steps: int, batch_size: int, seed: int):
    """Contrastive image-caption training of a tiny CLIP; returns its vision tower (a `CLIPVisionModel`)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=32, projection_dim=64,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id),
        projection_dim=64,
    )
    clip = CLIPModel(config)
    examples = make_examples(num_examples, seed)
    pixels = image_processor()([e.image for e in examples], return_tensors="pt")["pixel_values"]
    # CLIP's text tower pools at the eos token: every caption ends with one.
    text = _encode(tokenizer, [e.caption + EOS for e in examples], max_length=32)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    clip.train()
    for step in (bar := tqdm(range(steps), desc="vision tower (contrastive)")):
        index = torch.randint(0, num_examples, (batch_size,))
        loss = clip(input_ids=text["input_ids"][index], attention_mask=text["attention_mask"][index],
                    pixel_values=pixels[index], return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return _vision_tower(clip)


def _vision_tower(clip: CLIPModel):
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(clip.config.vision_config)
    tower.load_state_dict(clip.vision_model.state_dict())  # the same modules, at the top level
    return tower.eval()


def train_language_model(tokenizer, num_documents: int, steps: int, batch_size: int, seed: int):
    """Next-token training of a tiny Llama on image-free world documents."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LANGUAGE)
    model = LlamaForCausalLM(config)
    documents = text_corpus(num_documents, seed + 7)
    ids = _encode(tokenizer, [d + EOS for d in documents], max_length=128)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in (bar := tqdm(range(steps), desc="language model")):
        index = torch.randint(0, len(documents), (batch_size,))
        loss = model(input_ids=ids["input_ids"][index], attention_mask=ids["attention_mask"][index],
                     labels=labels[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_openflamingo(output_dir: str, model_source: list[str], shards: dict, args) -> str:
    """Stage 4: the recipe through `openflamingo-train`, backbones frozen. `model_source` names what it starts from:
    the backbones (a new OpenFlamingo) or, to fine-tune, an OpenFlamingo folder (`--model_name_or_path`)."""
    from openflamingo_hf.cli.train import main as openflamingo_train

    run_dir = os.path.join(output_dir, "openflamingo")
    openflamingo_train([
        *model_source,
        "--laion_shards", shards["pairs"], "--mmc4_shards", shards["docs"],
        "--batch_size_laion", "32", "--batch_size_mmc4", "8", "--loss_multiplier_laion", "0.5",
        "--laion_max_length", "24", "--mmc4_max_length", "128", "--mmc4_max_num_images", "6",
        "--max_steps", str(args.flamingo_steps), "--learning_rate", str(args.learning_rate),
        "--warmup_steps", str(args.warmup_steps), "--lr_scheduler_type", "cosine", "--weight_decay", "0.1",
        "--logging_steps", "50", "--dataloader_num_workers", "1", "--seed", str(args.seed), "--use_cpu",
        "--report_to", "none", "--save_strategy", "no", "--output_dir", run_dir, "--disable_tqdm", "false",
    ])
    return run_dir


def backbones_source(vision_dir: str, lm_dir: str) -> list[str]:
    """`openflamingo-train` options for a new OpenFlamingo around the trained backbones."""
    return ["--vision_model", vision_dir, "--language_model", lm_dir, "--cross_attn_every_n_layers", "1",
            "--config_overrides", json.dumps(FLAMINGO)]


def export_model(run_dir: str, model_dir: str) -> str:
    """Stage 5: the trained model and its processor, as the package ships them: weights, configs, tokenizer, chat
    template; no trainer state, and no `_name_or_path` pointing at this machine's backbone folders."""
    import shutil

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(run_dir, dtype=torch.float32)
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._name_or_path = ""
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    AutoProcessor.from_pretrained(run_dir).save_pretrained(model_dir)
    return model_dir


def train_backbones(args, timings: dict) -> list[str]:
    """Stages 1-3: tokenizer, vision tower and language model; returns the `openflamingo-train` options that start
    from them."""
    tokenizer = train_tokenizer(text_corpus(3000, args.seed + 3) + [e.caption for e in make_examples(500, 5, False)],
                                vocab_size=320)
    lm_dir, vision_dir = os.path.join(args.output_dir, "lm"), os.path.join(args.output_dir, "vision")
    tokenizer.save_pretrained(lm_dir)

    stage = time.time()
    train_vision_tower(tokenizer, 4000, args.vision_steps, 128, args.seed).save_pretrained(vision_dir)
    image_processor().save_pretrained(vision_dir)
    timings["vision"] = time.time() - stage

    stage = time.time()
    train_language_model(tokenizer, 20000, args.lm_steps, 32, args.seed).save_pretrained(lm_dir)
    timings["language_model"] = time.time() - stage
    return backbones_source(vision_dir, lm_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="embedded-run")
    parser.add_argument("--init_from", default=None,
                        help="An OpenFlamingo folder (e.g. src/openflamingo_hf/embedded/model) to fine-tune: skips "
                             "stages 1-3 and runs the recipe from it, backbones frozen as before.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision_steps", type=int, default=1500)
    parser.add_argument("--lm_steps", type=int, default=1500)
    parser.add_argument("--flamingo_steps", type=int, default=1500)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--num_pairs", type=int, default=20000)
    parser.add_argument("--num_documents", type=int, default=6000)
    parser.add_argument("--eval_examples", type=int, default=200, help="Held-out examples of the final evaluation.")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.init_from and not os.path.isfile(os.path.join(args.init_from, "config.json")):
        parser.error(f"--init_from {args.init_from}: no config.json there; give an OpenFlamingo model folder.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_cpu_threads(args.threads)
    start, timings = time.time(), {}
    os.makedirs(args.output_dir, exist_ok=True)
    model_source = ["--model_name_or_path", args.init_from] if args.init_from else train_backbones(args, timings)

    stage = time.time()
    shards = write_world_shards(os.path.join(args.output_dir, "shards"), args.num_pairs, args.num_documents,
                                seed=args.seed + 100)
    timings["shards"] = time.time() - stage

    stage = time.time()
    run_dir = train_openflamingo(args.output_dir, model_source, shards, args)
    timings["openflamingo"] = time.time() - stage

    model_dir = export_model(run_dir, os.path.join(args.output_dir, "model"))
    scores = evaluate_embedded(model_dir, num_examples=args.eval_examples)  # held-out seeds: never in the training data
    timings["total"] = time.time() - start
    report = {"scores": scores, "seconds": {k: round(v) for k, v in timings.items()}}
    print(json.dumps(report, indent=1))
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
