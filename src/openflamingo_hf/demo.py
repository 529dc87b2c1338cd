"""OpenFlamingo's main job end to end, offline: interleaved images and text in, text out.

    python -m openflamingo_hf.demo                        # the embedded model on the bundled sample images
    python -m openflamingo_hf.demo --model path/or/hub-id --images a.jpg b.jpg query.jpg --captions "a cat." "a dog."

With the embedded model (a tiny OpenFlamingo trained by this package's recipe on a procedural world, see
`openflamingo_hf.embedded`): zero-shot captions and short VQA answers with the released models' prompts, and a tag task whose format only the few-shot
demonstrations give (in-context learning), each checked against the truth; then the same few-shot prompt through
`pipeline("image-text-to-text")`, which must agree with `model.generate`; and the embedded video variant captioning
generated clips of a moving shape, forwards and reversed. With `--model`: few-shot captioning of the given images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, pipeline

from .cpu_threads import THREADS_HELP, set_cpu_threads


@dataclass
class DemoArguments:
    model: str | None = field(
        default=None, metadata={"help": "Converted OpenFlamingo folder or Hub id. Default: the embedded model."}
    )
    images: list[str] = field(
        default_factory=list,
        metadata={"help": "With --model: demonstration images followed by the query image (paths or URLs)."},
    )
    captions: list[str] = field(
        default_factory=list, metadata={"help": "With --model: one caption per demonstration image."}
    )
    prompt_prefix: str = field(default="Output:", metadata={"help": "With --model: text after each <image>."})
    num_beams: int = field(default=3, metadata={"help": "Beam search width (the evaluation protocol uses 3)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens to generate at most."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})


def _mark(ok: bool) -> str:
    return "ok" if ok else "WRONG"


def run_embedded(args: DemoArguments) -> None:
    from .embedded import answer, caption, load_embedded_model, sample_examples, sample_image_paths
    from .embedded.world import output_caption_text, tag_text

    model, processor = load_embedded_model(args.device)
    paths, examples = sample_image_paths(), sample_examples()
    print(f"The embedded OpenFlamingo ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on "
          f"{len(paths)} bundled images ({paths[0].rsplit('/', 1)[0]}).\n")

    # The released models' zero-shot caption prompt, as `openflamingo generate --prompt` and the README show it.
    print(f"Captions (prompt '<image>{output_caption_text()}'):")
    for path, example, text in zip(paths, examples, caption(paths, model, processor, output_caption_text())):
        print(f"  {path.rsplit('/', 1)[-1]:<14} {text!r:<28} [{_mark(text == example.caption)}]")

    print("\nQuestions (prompt '<image>Question:... Short answer:'):")
    for path, example, text in zip(paths, examples, answer(paths, [e.question for e in examples], model, processor)):
        print(f"  {path.rsplit('/', 1)[-1]:<14} {example.question:<28} {text!r:<10} [{_mark(text == example.answer)}]")

    # In-context learning: the tag format is given only by the demonstrations.
    demonstrations, query = examples[:-1], examples[-1]
    prompt = processor.few_shot_prompt([tag_text(e.tag("slash")) for e in demonstrations], tag_text())
    print(f"\nFew-shot ({len(demonstrations)} demonstrations, format shown only by them):\n  {prompt!r}")
    pipe = pipeline("image-text-to-text", model=model, processor=processor, device=model.device)
    result = pipe(images=paths, text=prompt, return_full_text=False,
                  generate_kwargs=dict(max_new_tokens=args.max_new_tokens, do_sample=False))
    piped = result[0]["generated_text"].strip()
    print(f"  pipeline -> {piped!r} [{_mark(piped == query.tag('slash'))}] (truth {query.tag('slash')!r})")
    inputs = processor(images=[paths], text=[prompt], return_tensors="pt").to(model.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    beams = processor.post_process_generation(generated, inputs["input_ids"])[0].strip()
    print(f"  generate, beam search ({args.num_beams} beams) -> {beams!r}")
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if processor.post_process_generation(greedy, inputs["input_ids"])[0].strip() != piped:
        raise SystemExit("The pipeline's greedy answer differs from model.generate's: this is a bug.")
    run_embedded_clips(args)


def run_embedded_clips(args: DemoArguments) -> None:
    """The video variant on generated held-out clips: only the order of the frames tells the direction, so playing a
    clip backwards must reverse the caption's direction."""
    from .embedded import caption_clips, load_embedded_video_model
    from .embedded.world import CLIP_FRAMES, HELD_OUT_SEED_START, make_clips, reverse_clip

    model, processor = load_embedded_video_model(args.device)
    clips = make_clips(4, seed=HELD_OUT_SEED_START + 9000)
    backward = [reverse_clip(clip) for clip in clips]
    print(f"\nClips (the video variant: frame embeddings; prompt '<video>', {CLIP_FRAMES} frames each, then reversed):")
    for clip, back, text, back_text in zip(clips, backward, caption_clips(clips, model, processor),
                                           caption_clips(backward, model, processor)):
        print(f"  {text!r:<36} [{_mark(text == clip.caption)}]  reversed -> {back_text!r:<36} "
              f"[{_mark(back_text == back.caption)}]")


def run_model(args: DemoArguments) -> None:
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).to(args.device).eval()
    if len(args.images) != len(args.captions) + 1:
        raise SystemExit(
            f"--images needs one image per caption plus the query image: got {len(args.images)} images for "
            f"{len(args.captions)} captions."
        )
    prompt = processor.few_shot_prompt([f"{args.prompt_prefix}{c}" for c in args.captions], args.prompt_prefix)
    inputs = processor(images=[list(args.images)], text=[prompt], return_tensors="pt").to(args.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    print(f"Prompt: {prompt!r}\nCaption: {processor.post_process_generation(output, inputs['input_ids'])[0]!r}")


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    set_cpu_threads(args.threads)
    if args.model is None:
        run_embedded(args)
    else:
        run_model(args)


if __name__ == "__main__":
    main()
