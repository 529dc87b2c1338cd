"""`openflamingo-eval` (also `openflamingo eval`): the original's few-shot evaluation on any OpenFlamingo folder.

    openflamingo-eval --model ./OpenFlamingo-3B-hf --eval_coco --coco_karpathy_json_path dataset_coco.json \\
        --coco_train_image_dir_path train2014 --coco_val_image_dir_path val2014 --shots 0 4 8 --num_trials 3 \\
        --results_file results.json
    openflamingo-eval --embedded_world ./world-benchmarks --shots 0 4    # all eight, on the shipped model's world

Results: a JSON file (benchmark -> shots -> trials with score and per-sample predictions) and a markdown table
(beside the JSON, `.md`), printed too. Split across processes with `accelerate launch -m openflamingo_hf.cli.eval`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

# The benchmarks' facts as plain data: `--help` and argument errors load no torch (`eval.evaluate` is imported when a
# run starts).
from ..eval.data import load_benchmark_data
from ..eval.tasks import EVAL_TASKS, PATH_FLAGS, missing_paths
from ..cpu_threads import THREADS_HELP, set_cpu_threads
from .parsing import check_hub_reachable, check_model_source, require_extra

PROG = "openflamingo-eval"


@dataclass
class EvalArguments:
    model: str | None = field(default=None, metadata={
        "help": "Model folder or Hub id that AutoModelForImageTextToText and AutoProcessor load (default: the model "
                "shipped with the package)."})
    results_file: str | None = field(default=None, metadata={
        "help": "JSON file for the results (a markdown table is written beside it, .md)."})
    shots: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32], metadata={"help": "Shot counts."})
    num_trials: int = field(default=1, metadata={"help": "Trials per shot count (the first N of --trial_seeds)."})
    trial_seeds: list[int] = field(default_factory=lambda: [42, 43, 44], metadata={
        "help": "Seed of each trial: picks the demonstration pool, the evaluation subset and random demonstrations."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on this many examples of the evaluation split (seeded subsample); default: all."})
    query_set_size: int = field(default=2048, metadata={"help": "Size of the demonstration pool (train split)."})
    batch_size: int = field(default=8, metadata={"help": "Queries per batch."})
    num_beams: int = field(default=3, metadata={"help": "Beam search width for captioning and VQA (3 as the paper)."})
    rices: bool = field(default=False, metadata={
        "help": "Pick demonstrations by RICES (most similar train images by CLIP embedding) instead of at random."})
    rices_vision_encoder_path: str = field(default="openai/clip-vit-large-patch14", metadata={
        "help": "CLIP model (folder or Hub id) for RICES embeddings."})
    cached_demonstration_features: str | None = field(default=None, metadata={
        "help": "Folder where RICES embeddings are cached and reused."})
    compare_to_release: str | None = field(default=None, metadata={
        "help": "Release name whose published scores the table shows beside yours (see openflamingo releases)."})
    embedded_world: str | None = field(default=None, metadata={
        "help": "Write the shipped model's world as the eight benchmarks into this folder and evaluate on them (all "
                "eight, or those named by --eval_<name>)."})
    ok_vqa_stemming: bool = field(default=True, metadata={
        "help": "Stem OK-VQA predictions as the original (needs NLTK's punkt_tab, averaged_perceptron_tagger_eng and "
                "wordnet data); --ok_vqa_stemming false scores OK-VQA with plain VQA accuracy (not comparable to the "
                "paper). Off with --embedded_world, whose answers are base forms already."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda if available)."})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})


def _dataset_arguments_class():
    """The per-benchmark flags as a dataclass (data: `PATH_FLAGS`): `--eval_<name>`, its paths, `--<name>_dataset`."""
    fields = []
    for name, flags in PATH_FLAGS.items():
        title = EVAL_TASKS[name].title
        fields.append((f"eval_{name}", bool, field(default=False, metadata={"help": f"Evaluate on {title}."})))
        fields.extend((flag.name, str | None, field(default=None, metadata={"help": flag.help})) for flag in flags)
        fields.append((f"{name}_dataset", str | None, field(default=None, metadata={
            "help": f"{title} as a datasets folder or Hub dataset repo with train and test splits, instead of "
                    "files."})))
    return dataclasses.make_dataclass("DatasetArguments", fields)


DatasetArguments = _dataset_arguments_class()


def build_parser():
    from .parsing import OneLineErrorParser

    return OneLineErrorParser((EvalArguments, DatasetArguments), prog=PROG, description=__doc__.split("\n\n")[0])


def selected_benchmarks(args: EvalArguments, datasets) -> list[str]:
    values = dataclasses.asdict(datasets)
    names = [name for name in PATH_FLAGS if values[f"eval_{name}"]]
    if not names:
        raise ValueError("no benchmark selected: add --eval_coco, --eval_vqav2, ... (see --help) or --embedded_world.")
    for name in names:
        missing = missing_paths(name, values)
        if missing:
            raise ValueError(f"--eval_{name} needs {', '.join(missing)} (or --{name}_dataset).")
    return names


def check_trial_flags(args: EvalArguments) -> None:
    """Refuses shot and trial counts no run can use, before the embedded world is written or any file is read."""
    if args.num_trials < 1 or args.num_trials > len(args.trial_seeds):
        raise ValueError(f"--num_trials must be between 1 and the number of --trial_seeds ({len(args.trial_seeds)}).")
    if any(shots < 0 for shots in args.shots):
        raise ValueError(f"--shots must be >= 0, got {args.shots}.")


def _use_embedded_world(args: EvalArguments, datasets) -> None:
    from ..embedded.eval_world import write_world_benchmarks

    chosen = [name for name in PATH_FLAGS if getattr(datasets, f"eval_{name}")]
    for option, path in write_world_benchmarks(args.embedded_world).items():
        setattr(datasets, option, path)
    for name in chosen or PATH_FLAGS:  # the --eval_<name> flags given, else all eight
        setattr(datasets, f"eval_{name}", True)
    args.ok_vqa_stemming = False


def _load_model(args: EvalArguments):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import register_auto_classes

    register_auto_classes()
    source = args.model
    if source is None:
        from ..embedded import EMBEDDED_MODEL_DIR

        source = EMBEDDED_MODEL_DIR
    from accelerate import PartialState

    # Launched on several processes, each evaluates on its own device; alone, --device or accelerate's choice
    # (cuda when available, else cpu).
    state = PartialState()
    device = state.device if state.num_processes > 1 or args.device is None else args.device
    model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto").to(device).eval()
    return model, AutoProcessor.from_pretrained(source)


def run(args: EvalArguments, datasets) -> dict:
    """Evaluates every selected benchmark; writes and returns `{benchmark: results}` (see `evaluate_benchmark`)."""
    from ..release_data import published_scores

    check_trial_flags(args)
    if args.embedded_world:
        _use_embedded_world(args, datasets)
    names = selected_benchmarks(args, datasets)
    if args.model is not None:
        check_model_source("--model", args.model)
        check_hub_reachable("--model", args.model)
    published = published_scores(args.compare_to_release) if args.compare_to_release else None
    # torch is imported only once the flags hold, so that an argument error answers at once.
    set_cpu_threads(args.threads)
    from ..eval.evaluate import EvalSettings, evaluate_benchmark, results_table
    values = dataclasses.asdict(datasets)
    loaded = {name: load_benchmark_data(name, values) for name in names}  # malformed files fail before the model
    model, processor = _load_model(args)
    results = {}
    for name in names:
        rices = None
        if args.rices:
            from ..eval.demonstrations import RICES

            rices = RICES(loaded[name].train, args.rices_vision_encoder_path,
                          cache_dir=args.cached_demonstration_features, device=model.device)
        settings = EvalSettings(shots=tuple(args.shots), trial_seeds=tuple(args.trial_seeds[: args.num_trials]),
                                num_samples=args.num_samples, query_set_size=args.query_set_size,
                                batch_size=args.batch_size, num_beams=args.num_beams, rices=rices,
                                ok_vqa_stemming=args.ok_vqa_stemming)
        results[name] = evaluate_benchmark(model, processor, name, loaded[name], settings)
        for row in results[name]:
            print(f"{EVAL_TASKS[name].title} {row['shots']}-shot: {row['mean']:.2f} ± {row['std']:.2f}", flush=True)
    table = results_table(results, published)
    print(table)
    if args.results_file:
        _write_results(args.results_file, results, table)
    return results


def _write_results(path: str, results: dict, table: str) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w", encoding="utf-8") as file:
        file.write(table + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, datasets = parser.parse_command_line(argv)
    try:
        if args.results_file and os.path.isdir(args.results_file):
            raise ValueError(f"--results_file {args.results_file} is a folder; give a file name (results.json).")
        # CIDEr, ROC-AUC and OK-VQA's stemming: checked before the data (or the embedded world) and the model.
        require_extra("eval", ["pycocoevalcap", "sklearn", "nltk", "inflection"], PROG)
        run(args, datasets)  # checks the flags before it imports torch, loads any file or the model
    except (ValueError, OSError, RuntimeError) as error:  # bad files or flags, missing Java / NLTK data
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
