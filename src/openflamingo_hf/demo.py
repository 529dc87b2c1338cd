"""Few-shot captioning with OpenFlamingo, end to end: processor -> generate -> decoded text, and the same through
`pipeline("image-text-to-text")`.

    python -m openflamingo_hf.demo                                   # tiny random model built in-process, no download
    python -m openflamingo_hf.demo --model path/or/hub-id --images cat.jpg dog.jpg query.jpg \\
        --captions "a cat." "a dog."                                 # a converted release (see openflamingo-convert)

The embedded default is a tiny model with random weights, so its captions are noise: it shows the machinery (special
tokens, interleaved prompt, padding, cached generation with beam search, decoding) without any download.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, pipeline

from .testing_utils import build_tiny_model_and_processor, make_image


@dataclass
class DemoArguments:
    model: str | None = field(
        default=None,
        metadata={"help": "Converted OpenFlamingo folder or Hub id. Default: a tiny random model built in-process."},
    )
    images: list[str] = field(
        default_factory=list,
        metadata={"help": "Demonstration images followed by the query image (paths or URLs). Default: synthetic."},
    )
    captions: list[str] = field(
        default_factory=lambda: ["a cat sitting on a red mat.", "a dog running in the park."],
        metadata={"help": "One caption per demonstration image (all images but the last)."},
    )
    prompt_prefix: str = field(default="Output:", metadata={"help": "Text after each <image> (the original's)."})
    num_beams: int = field(default=3, metadata={"help": "Beam search width (the evaluation protocol uses 3)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens to generate at most."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    if args.model is None:
        print("Building a tiny random OpenFlamingo (Llama-style LM, CLIP-style vision tower) in-process ...")
        model, processor = build_tiny_model_and_processor("llama")
    else:
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    model.to(args.device)

    num_shots = len(args.captions)
    if args.images:
        if len(args.images) != num_shots + 1:
            raise ValueError(
                f"--images needs one image per caption plus the query image: got {len(args.images)} images for "
                f"{num_shots} captions."
            )
        images = list(args.images)  # the processor reads the files (16-bit images included)
    else:
        images = [make_image(seed, size=(64, 48)) for seed in range(num_shots + 1)]

    prompt = processor.few_shot_prompt([f"{args.prompt_prefix}{caption}" for caption in args.captions], args.prompt_prefix)
    print(f"\nPrompt ({num_shots}-shot): {prompt!r}")
    inputs = processor(images=[images], text=[prompt], return_tensors="pt").to(args.device)
    print(
        f"input_ids {tuple(inputs['input_ids'].shape)}, pixel_values {tuple(inputs['pixel_values'].shape)}, "
        f"<image> id {processor.image_token_id}, <|endofchunk|> id {processor.eoc_token_id}"
    )

    rows = []
    for name, kwargs in (
        ("greedy", dict(do_sample=False)),
        (f"beam search ({args.num_beams} beams)", dict(num_beams=args.num_beams, do_sample=False)),
    ):
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kwargs)
        seconds = time.perf_counter() - start
        text = processor.post_process_generation(output, inputs["input_ids"])[0]
        rows.append((name, output.shape[1] - inputs["input_ids"].shape[1], seconds, text))

    pipe = pipeline("image-text-to-text", model=model, processor=processor, device=model.device)
    start = time.perf_counter()
    result = pipe(images=images, text=prompt, return_full_text=False,
                  generate_kwargs=dict(max_new_tokens=args.max_new_tokens, do_sample=False))
    rows.append(("pipeline, greedy", None, time.perf_counter() - start, result[0]["generated_text"]))

    print(f"\n{'decoding':<24} {'new tokens':>10} {'seconds':>8}  caption")
    for name, new_tokens, seconds, text in rows:
        print(f"{name:<24} {new_tokens if new_tokens is not None else '-':>10} {seconds:>8.3f}  {text!r}")
    if rows[0][3] != rows[2][3]:
        raise SystemExit("The pipeline's greedy caption differs from model.generate's: this is a bug.")


if __name__ == "__main__":
    main()
