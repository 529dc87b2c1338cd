"""The few-shot evaluation: prompts as the original wrote them, the runner, and openflamingo-eval end to end."""

import json
import os
import subprocess
import sys

import pytest

from openflamingo_hf.cli.eval import main
from openflamingo_hf.eval.evaluate import EVAL_TASKS, build_prompt, results_table
from openflamingo_hf.eval.example import EvalExample
from openflamingo_hf.testing_utils import build_tiny_model_and_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


DEMOS = [
    EvalExample("1", "a.png", captions=["A cat.", "A kitten."], question="What is it?", answers=["cat", "kitten"],
                label="yes", ocr="hello"),
    EvalExample("2", "b.png", captions=["A dog."], question="What color?", answers=["red"], label="no", ocr="bye"),
]
QUERY = EvalExample("3", "q.png", captions=["A bird."], question="How many?", answers=["2"], label="no", ocr="hi")


@pytest.mark.parametrize(
    "benchmark, expected",
    [
        ("coco", "<image>Output:A cat.<|endofchunk|><image>Output:A dog.<|endofchunk|><image>Output:"),
        ("vqav2", "<image>Question:What is it? Short answer:cat<|endofchunk|><image>Question:What color? Short "
                  "answer:red<|endofchunk|><image>Question:How many? Short answer:"),
        ("hateful_memes", "<image>is an image with: 'hello' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                          "<image>is an image with: 'bye' written on it. Is it hateful? Answer:no<|endofchunk|>"
                          "<image>is an image with: 'hi' written on it. Is it hateful? Answer:"),
        ("imagenet", "<image>Output:yes<|endofchunk|><image>Output:no<|endofchunk|><image>Output:"),
    ],
)
def test_prompts_equal_the_originals(processor, benchmark, expected):
    images, prompt = build_prompt(processor, EVAL_TASKS[benchmark], DEMOS, QUERY, num_shots=2)
    assert prompt == expected
    assert images == ["a.png", "b.png", "q.png"]


def test_zero_shot_uses_two_text_only_demonstrations(processor):
    images, prompt = build_prompt(processor, EVAL_TASKS["vqav2"], DEMOS, QUERY, num_shots=0)
    assert prompt == ("Question:What is it? Short answer:cat<|endofchunk|>Question:What color? Short answer:red"
                      "<|endofchunk|><image>Question:How many? Short answer:")
    assert images == ["q.png"]


@pytest.mark.parametrize(
    "task, generated, answer",
    [
        ("captioning", ' a "cat" on a mat. Output: a dog', "a cat on a mat."),
        ("vqa", "yes, it is Question: why", "yes"),
        ("vqa", "two Short answer: three", "two"),
        ("vqa", " blue Answer:", "blue"),
    ],
)
def test_answers_are_cut_as_the_original_cut_them(processor, task, generated, answer):
    assert processor.postprocess_answer(task, generated) == answer


def test_results_table_shows_published_scores():
    results = {"coco": [{"shots": 4, "mean": 80.0, "std": 1.0, "trials": [{}, {}]}]}
    table = results_table(results, {("coco", 4): 77.3})
    assert "| COCO | CIDEr | 4 | 80.0 ± 1.0 | 2 | 77.3 |" in table


def _world_args(tmp_path, *extra):
    return ["--embedded_world", str(tmp_path / "world"), "--shots", "0", "4", "--num_samples", "16",
            "--batch_size", "16", "--results_file", str(tmp_path / "results.json"), *extra]


def test_all_eight_benchmarks_on_the_embedded_world(tmp_path, capsys):
    main(_world_args(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(EVAL_TASKS)
    for name, rows in results.items():
        assert [row["shots"] for row in rows] == [0, 4]
        for row in rows:
            assert len(row["trials"]) == 1 and len(row["trials"][0]["predictions"]) == 16
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + 16 and table.strip() in capsys.readouterr().out
    four_shot = {name: rows[1]["mean"] for name, rows in results.items()}
    # Well above chance on the world the model was trained on (36 captions, 3-4 answers per question kind).
    assert four_shot["coco"] > 100 and four_shot["flickr30"] > 100, four_shot
    for name in ("vqav2", "ok_vqa", "textvqa", "vizwiz"):
        assert four_shot[name] > 80, four_shot
    assert four_shot["imagenet"] > 30, four_shot  # chance: 1/36


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no benchmark selected"),
        (["--eval_coco"], "--eval_coco needs --coco_karpathy_json_path, --coco_train_image_dir_path"),
        (["--eval_vqav2", "--vqav2_dataset", "x", "--num_trials", "4"], "--num_trials must be between 1 and"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openflamingo-eval: error:") and message in err and "\n" not in err


def test_malformed_file_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "questions.json"
    bad.write_text(json.dumps({"questions": [{"image_id": 1, "question_id": 5}]}))
    (tmp_path / "images").mkdir()
    paths = [f"--vqav2_{split}_{kind}" for split in ("train", "test") for kind in ("image_dir_path",
                                                                                   "questions_json_path")]
    argv = ["--eval_vqav2"]
    for option in paths:
        argv += [option, str(tmp_path / "images") if "image_dir" in option else str(bad)]
    argv += ["--vqav2_train_annotations_json_path", str(bad), "--vqav2_test_annotations_json_path", str(bad)]
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "questions.json" in err and "question" in err and err.count("\n") == 1


def test_two_processes_give_the_predictions_of_one(tmp_path):
    """accelerate splits the queries across processes and gathers them: the same predictions and scores."""
    single = tmp_path / "single"
    main(["--embedded_world", str(tmp_path / "world"), "--shots", "4", "--num_samples", "12", "--batch_size", "4",
         "--results_file", str(single / "results.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
         "openflamingo_hf.cli.eval", "--embedded_world", str(tmp_path / "world2"), "--shots", "4",
         "--num_samples", "12", "--batch_size", "4", "--results_file", str(tmp_path / "double" / "results.json")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((single / "results.json").read_text())
    two = json.loads((tmp_path / "double" / "results.json").read_text())
    for name in one:
        first, second = one[name][0]["trials"][0], two[name][0]["trials"][0]
        assert [r["id"] for r in first["predictions"]] == [r["id"] for r in second["predictions"]]
        assert [r["prediction"] for r in first["predictions"]] == [r["prediction"] for r in second["predictions"]]
        assert first["score"] == pytest.approx(second["score"], abs=1e-6)


def test_rices_from_the_cli_with_a_local_clip_and_cached_embeddings(tmp_path, monkeypatch):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from openflamingo_hf.eval import demonstrations

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    argv = ["--embedded_world", str(tmp_path / "world"), "--eval_coco", "--shots", "2", "--num_samples", "8",
            "--batch_size", "8", "--rices", "--rices_vision_encoder_path", str(tmp_path / "clip"),
            "--cached_demonstration_features", str(tmp_path / "cache"), "--results_file", str(tmp_path / "r.json")]
    found = []
    original_find = demonstrations.RICES.find
    monkeypatch.setattr(demonstrations.RICES, "find",
                        lambda self, queries, k: found.append(k) or original_find(self, queries, k))
    main(argv)
    assert found and set(found) == {2}
    assert list((tmp_path / "cache").glob("*.safetensors"))  # the pool's embeddings, reused by the next run
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results) == ["coco"] and results["coco"][0]["mean"] > 50


def test_imagenet_wordnet_folders_need_class_names(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split / "n01440764").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(["--eval_imagenet", "--imagenet_root", str(tmp_path)])
    assert "--imagenet_class_names_path" in capsys.readouterr().err
