"""
The few-shot evaluation of the original OpenFlamingo (`open_flamingo/eval/evaluate.py`), on any model `AutoModelForImageTextToText` loads.

For each benchmark, shot count and trial seed: a demonstration pool (the train split, subsampled to
`query_set_size`) and the evaluation examples (the test split, subsampled to `num_samples`) are drawn with the seed;
each query gets its demonstrations (at random, or by RICES), the prompt is written by the processor
(`task_text` / `task_prompt`, "0-shot" = two text-only demonstrations), and the model answers by beam search
(captioning, VQA) or by ranking class names (Hateful Memes, ImageNet). Scores per trial, their mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .example import BenchmarkData, EvalExample
from .tasks import EVAL_TASKS, Benchmark

HATEFUL_MEMES_CLASSES = ["no", "yes"]


@dataclass
class EvalSettings:
    shots: tuple[int, ...] = (0, 4, 8, 16, 32)
    trial_seeds: tuple[int, ...] = (42,)
    num_samples: int | None = None
    query_set_size: int = 2048
    batch_size: int = 8
    num_beams: int = 3
    rices: object | None = None  # a `demonstrations.RICES` over the train split, or None for random
    ok_vqa_stemming: bool = True  # OK-VQA's answer stemming (needs NLTK data); False: plain VQA accuracy
    show_progress: bool = True


# ----------------------------------------------------------------------------------------------------------------------
# Prompts (the processor writes them)
# ----------------------------------------------------------------------------------------------------------------------


def example_fields(benchmark: Benchmark, example: EvalExample) -> dict[str, str]:
    """The template fields of an example besides its answer."""
    if benchmark.task == "vqa":
        return {"question": example.question or ""}
    if benchmark.task == "hateful_memes":
        return {"ocr": example.ocr or ""}
    return {}


def demonstration_answer(benchmark: Benchmark, example: EvalExample) -> str:
    """What a demonstration shows as its answer: the first caption, the first annotator answer, or the label."""
    if benchmark.task == "captioning":
        return example.captions[0]
    if benchmark.task == "vqa":
        return example.answers[0]
    return example.label


def build_prompt(processor, benchmark: Benchmark, demonstrations: list[EvalExample], query: EvalExample,
                 num_shots: int) -> tuple[list, str]:
    """The images and prompt of one query: `(images, text)`. With `num_shots == 0` the demonstrations are text only
    and only the query's image is given."""
    texts = [processor.task_text(benchmark.task, demonstration_answer(benchmark, d), **example_fields(benchmark, d))
             for d in demonstrations]
    prompt = processor.task_prompt(texts, processor.task_text(benchmark.task, **example_fields(benchmark, query)),
                                   text_only_demonstrations=num_shots == 0)
    images = ([d.image for d in demonstrations] if num_shots > 0 else []) + [query.image]
    return images, prompt


# ----------------------------------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------------------------------


def _demonstrations_for(batch: list[EvalExample], num_shots: int, settings: EvalSettings, sampler) -> list[list]:
    effective = num_shots if num_shots > 0 else 2  # "0-shot": two text-only demonstrations, as the original
    if settings.rices is not None:
        return settings.rices.find(batch, effective)
    return sampler.sample(len(batch), effective)


@torch.no_grad()
def _answer_batch(model, processor, benchmark: Benchmark, rows: list[tuple[list, str]], settings: EvalSettings,
                  class_names: list[str] | None) -> list:
    images, prompts = [r[0] for r in rows], [r[1] for r in rows]
    if benchmark.max_new_tokens:
        inputs = processor(images=images, text=prompts, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=benchmark.max_new_tokens, num_beams=settings.num_beams,
                                length_penalty=0.0, do_sample=False)
        texts = processor.post_process_generation(output, inputs["input_ids"])
        return [processor.postprocess_answer(benchmark.task, text) for text in texts]
    from .scoring import rank_class_names

    return rank_class_names(model, processor, images, prompts, class_names).cpu().tolist()


def run_trial(model, processor, benchmark: Benchmark, data: BenchmarkData, num_shots: int, seed: int,
              settings: EvalSettings) -> dict:
    """One (shots, seed) trial: `{"seed", "score", "predictions": [...]}`. Split across processes when launched
    with accelerate (each process answers its share; scores are computed on the gathered predictions)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .loaders import query_set, subsample
    from .demonstrations import RandomDemonstrations

    pool = query_set(data.train, settings.query_set_size, seed)
    queries = subsample(data.test, settings.num_samples, seed)
    sampler = RandomDemonstrations(pool, seed)
    class_names = _class_names(benchmark, data)
    state = PartialState()
    local_records = []
    with state.split_between_processes(queries) as local_queries:
        batches = range(0, len(local_queries), settings.batch_size)
        bar = tqdm(batches, desc=f"{benchmark.title} {num_shots}-shot seed {seed}", leave=False,
                   disable=not settings.show_progress or not state.is_local_main_process)
        for start in bar:
            batch = local_queries[start : start + settings.batch_size]
            demos = _demonstrations_for(batch, num_shots, settings, sampler)
            rows = [build_prompt(processor, benchmark, d, q, num_shots) for d, q in zip(demos, batch)]
            answers = _answer_batch(model, processor, benchmark, rows, settings, class_names)
            local_records.extend(_record(benchmark, q, a, class_names) for q, a in zip(batch, answers))
    records = gather_object(local_records) if state.num_processes > 1 else local_records
    stemming = settings.ok_vqa_stemming
    return {"seed": seed, "score": score(benchmark, records, data, ok_vqa_stemming=stemming), "predictions": records}


def _class_names(benchmark: Benchmark, data: BenchmarkData) -> list[str] | None:
    if benchmark.task == "hateful_memes":
        return HATEFUL_MEMES_CLASSES
    if benchmark.task == "classification":
        return data.class_names or sorted({e.label for e in data.train + data.test})
    return None


def _record(benchmark: Benchmark, query: EvalExample, answer, class_names: list[str] | None) -> dict:
    record = {"id": query.id}
    if class_names is None:
        record["prediction"] = answer
        return record
    if benchmark.task == "hateful_memes":
        from .scoring import class_probabilities

        record["p_yes"] = float(class_probabilities(torch.tensor([answer]))[0, 1])
        record["prediction"] = "yes" if record["p_yes"] >= 0.5 else "no"
    else:
        record["prediction"] = class_names[int(np.argmax(answer))]
    record["label"] = query.label
    return record


def score(benchmark: Benchmark, records: list[dict], data: BenchmarkData, ok_vqa_stemming: bool = True) -> float:
    """The benchmark's metric on a trial's predictions (the percentage the paper reports; OK-VQA without its
    stemming when `ok_vqa_stemming` is False)."""
    from . import metrics

    by_id = {e.id: e for e in data.test}
    if benchmark.metric == "cider":
        references = data.references or {e.id: e.captions for e in data.test}
        return metrics.compute_cider({r["id"]: r["prediction"] for r in records},
                                     {r["id"]: references[r["id"]] for r in records})
    if benchmark.metric == "vqa_accuracy":
        return metrics.compute_vqa_accuracy([r["prediction"] for r in records],
                                            [by_id[r["id"]].answers for r in records],
                                            ok_vqa=benchmark.ok_vqa and ok_vqa_stemming)
    if benchmark.metric == "roc_auc":
        return metrics.compute_roc_auc([int(r["label"] == "yes") for r in records], [r["p_yes"] for r in records])
    return metrics.compute_accuracy([r["prediction"] for r in records], [r["label"] for r in records])


# ----------------------------------------------------------------------------------------------------------------------
# A benchmark, all shots and trials
# ----------------------------------------------------------------------------------------------------------------------


def evaluate_benchmark(model, processor, benchmark: str | Benchmark, data: BenchmarkData,
                       settings: EvalSettings | None = None) -> list[dict]:
    """
    Every shot count of `settings.shots`, with one trial per seed: a list of
    `{"shots", "mean", "std", "trials": [{"seed", "score", "predictions"}]}`.
    """
    benchmark = EVAL_TASKS[benchmark] if isinstance(benchmark, str) else benchmark
    settings = settings or EvalSettings()
    _check_data(benchmark, data, settings)
    model.eval()
    results = []
    for num_shots in settings.shots:
        trials = [run_trial(model, processor, benchmark, data, num_shots, seed, settings)
                  for seed in settings.trial_seeds]
        scores = [t["score"] for t in trials]
        results.append({"shots": num_shots, "mean": float(np.mean(scores)), "std": float(np.std(scores)),
                        "trials": trials})
    return results


def _check_data(benchmark: Benchmark, data: BenchmarkData, settings: EvalSettings) -> None:
    if not data.test:
        raise ValueError(f"{benchmark.title}: the evaluation split is empty.")
    needed = max(max(settings.shots), 2)
    if len(data.train) < needed:
        raise ValueError(f"{benchmark.title}: {needed} demonstrations needed but the train split has "
                         f"{len(data.train)} examples; lower --shots or give a larger train split.")
    if benchmark.task == "vqa" and any(not e.answers for e in data.test):
        raise ValueError(f"{benchmark.title}: some evaluation questions have no answers; pass the annotations file "
                         "of the evaluation split.")


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


METRIC_NAMES = {"cider": "CIDEr", "vqa_accuracy": "VQA acc.", "roc_auc": "ROC-AUC", "accuracy": "top-1"}


def results_table(results: dict[str, list[dict]], published: dict[tuple[str, int], float] | None = None) -> str:
    """A markdown table of `{benchmark: evaluate_benchmark(...)}`: mean ± std per shot count, and the published
    figure beside it where `published` has one (`{(benchmark, shots): score}`)."""
    lines = ["| benchmark | metric | shots | score (mean ± std) | trials | published |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        benchmark = EVAL_TASKS[name]
        for row in rows:
            reference = (published or {}).get((name, row["shots"]))
            lines.append(
                f"| {benchmark.title} | {METRIC_NAMES[benchmark.metric]} | {row['shots']} | "
                f"{row['mean']:.1f} ± {row['std']:.1f} | {len(row['trials'])} | "
                f"{'-' if reference is None else f'{reference:.1f}'} |"
            )
    return "\n".join(lines)


__all__ = ["EVAL_TASKS", "Benchmark", "BenchmarkData", "EvalSettings", "build_prompt", "evaluate_benchmark",
           "results_table", "run_trial", "score"]
