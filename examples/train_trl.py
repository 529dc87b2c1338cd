"""Fine-tunes an OpenFlamingo with TRL: `SFTTrainer` on images + chat messages, or `DPOTrainer` on image preference
pairs.

    python examples/train_trl.py sft --output_dir ./of-sft                         # embedded model, embedded world
    python examples/train_trl.py dpo --output_dir ./of-dpo
    python examples/train_trl.py sft --model ./OpenFlamingo-3B-vitl-mpt1b-hf --data train.jsonl \\
        --output_dir ./of3b-sft --max_steps 2000 --per_device_train_batch_size 8 --bf16 --learning_rate 1e-5

`--model` is any OpenFlamingo folder (converted release, `openflamingo-train` output, the embedded model by
default). `--data` is a JSON Lines file whose rows are what TRL reads, with images as file paths:

    sft: {"images": ["a.jpg"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
          "text": "Output:"}]}, {"role": "assistant", "content": [{"type": "text", "text": "a cat."}]}]}
    dpo: {"images": ["a.jpg"], "prompt": [<user turn as above>], "chosen": [<assistant turn>],
          "rejected": [<assistant turn>]}

Without `--data` the rows come from the embedded world (`openflamingo_hf.embedded`): for SFT a format the embedded
model never saw ("Colour:" -> "<colour> <shape>"), for DPO the true caption of an image preferred to the same caption
with another colour.
The processor's chat template writes `<image>` for image blocks and closes each assistant turn with
`<|endofchunk|>`, OpenFlamingo's end of an answer. By default the OpenFlamingo parts train (Perceiver, gated
cross-attention blocks), as in the pretraining recipe; `--train_language_model` trains the language model too.
The model and processor are saved to `OUTPUT_DIR` and load with `AutoModelForImageTextToText` / `AutoProcessor`.
"""

from __future__ import annotations

import argparse
import json
import os

from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR, make_examples

OTHER_COLOR = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}


def world_rows(kind: str, num_examples: int, seed: int) -> list[dict]:
    """Rows of the embedded world in TRL's vision formats."""

    def user(text: str) -> dict:
        return {"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])}

    def assistant(text: str) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    rows = []
    for example in make_examples(num_examples, seed=seed):
        if kind == "sft":
            rows.append({"images": [example.image],
                         "messages": [user("Colour:"), assistant(f"{example.color} {example.shape}")]})
        else:
            wrong = example.caption.replace(example.color, OTHER_COLOR[example.color])
            # The embedded model's caption prompt is the image alone (the recipe's pair text).
            rows.append({"images": [example.image], "prompt": [user("")],
                         "chosen": [assistant(example.caption)], "rejected": [assistant(wrong)]})
    return rows


def jsonl_rows(path: str) -> list[dict]:
    """Rows of a JSON Lines file, image paths (relative to the file) opened as RGB images."""
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("images"), list):
                raise SystemExit(f"{path}:{number}: every row needs an 'images' list of image paths.")
            row["images"] = [Image.open(os.path.join(folder, p)).convert("RGB") for p in row["images"]]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", choices=["sft", "dpo"])
    parser.add_argument("--model", default=EMBEDDED_MODEL_DIR, help="OpenFlamingo folder (default: the embedded one)")
    parser.add_argument("--data", help="JSON Lines training rows (default: the embedded world)")
    parser.add_argument("--num_examples", type=int, default=64, help="rows of the embedded world, without --data")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-3 (SFT), 1e-4 (DPO)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--train_language_model", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    if not args.train_language_model:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(("perceiver.", "gated_cross_attn_layers."))
    rows = jsonl_rows(args.data) if args.data else world_rows(args.trainer, args.num_examples, seed=2_000_000)
    dataset = Dataset.from_list(rows)
    common = dict(
        output_dir=args.output_dir, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, logging_steps=1, save_strategy="no", report_to=[], bf16=args.bf16, seed=args.seed, max_length=None,
        # Only the OpenFlamingo parts train by default: the frozen vision tower and LM need no recomputation.
        gradient_checkpointing=args.train_language_model,
    )
    if args.trainer == "sft":
        config = SFTConfig(learning_rate=args.learning_rate or 1e-3, **common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    else:
        config = DPOConfig(learning_rate=args.learning_rate or 1e-4, beta=args.beta, **common)
        # TRL builds a reference model itself only for classes it can name from the config: pass it.
        reference = AutoModelForImageTextToText.from_pretrained(args.model)
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=processor)
    trainer.train()
    trainer.save_model(args.output_dir)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {"steps": len(logged), "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"]}
    if "rewards/accuracies" in logged[-1]:
        summary["last_reward_accuracy"] = logged[-1]["rewards/accuracies"]
    print(json.dumps({**summary, "output_dir": args.output_dir}))


if __name__ == "__main__":
    main()
