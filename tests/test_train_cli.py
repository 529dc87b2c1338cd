"""`openflamingo-train` end to end: tiny backbones saved to folders, generated shards of both kinds, a learnable task."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf.cli.train import main
from openflamingo_hf.testing_utils import save_tiny_backbones
from openflamingo_hf.trainer.shard_writing import encode_image_base64, write_interleaved_shard, write_pair_shard

# A task that only the image can solve: the caption names the colour of a noisy square.
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
NAMES = list(COLORS)
SMALL = json.dumps(dict(perceiver_depth=1, perceiver_num_latents=4, perceiver_num_heads=2, perceiver_head_dim=16,
                        cross_attn_num_heads=2, cross_attn_head_dim=16))


def colour_image(name, rng):
    # Noise keeps the PNG above the recipe's 10 KB minimum for interleaved images.
    pixels = np.array(COLORS[name], dtype=np.int16) + rng.integers(-60, 61, size=(80, 80, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def document(names, rng):
    return {
        "text_list": ["A page."] + [f"a {name} square." for name in names],
        "image_info": [{"image_base64": encode_image_base64(colour_image(name, rng))} for name in names],
        "similarity_matrix": [[0.1] + [0.9 if j == i else 0.2 for j in range(len(names))] for i in range(len(names))],
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_cli")
    rng = np.random.default_rng(0)
    pairs = [{"image": colour_image(NAMES[i % 4], rng), "caption": f"a {NAMES[i % 4]} square"} for i in range(128)]
    write_pair_shard(folder / "pairs-0.tar", pairs[:64])
    write_pair_shard(folder / "pairs-1.tar", pairs[64:])
    write_interleaved_shard(folder / "docs-0.tar", [document([NAMES[i % 4], NAMES[(i + 1) % 4]], rng)
                                                    for i in range(64)])
    save_tiny_backbones(folder)
    return folder


def common_args(folder, output_dir, max_steps):
    return [
        "--vision_model", str(folder / "vision"), "--language_model", str(folder / "lm"),
        "--cross_attn_every_n_layers", "1", "--config_overrides", SMALL,
        "--batch_size_laion", "16", "--batch_size_mmc4", "8", "--laion_max_length", "16", "--mmc4_max_length", "32",
        "--max_steps", str(max_steps), "--learning_rate", "3e-3", "--warmup_steps", "10", "--logging_steps", "10",
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--seed", "0",
    ]


def test_recipe_learns_a_task_only_the_images_can_solve(workdir, tmp_path):
    output_dir = tmp_path / "run"
    main(common_args(workdir, output_dir, 120) + [
        "--laion_shards", str(workdir / "pairs-{0..1}.tar"), "--mmc4_shards", str(workdir / "docs-*.tar"),
    ])
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logs = [entry for entry in history if "loss_laion" in entry]
    assert len(logs) == 12
    for stream in ("loss_laion", "loss_mmc4"):
        assert logs[-1][stream] < logs[0][stream] - 0.5, (stream, logs[0][stream], logs[-1][stream])

    # The saved folder is a model and processor as any other; held-out images get their own colour.
    model = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    rng = np.random.default_rng(123)
    truth = [NAMES[i % 4] for i in range(24)]
    inputs = processor(images=[[colour_image(name, rng)] for name in truth], text=["<image>"] * 24,
                       return_tensors="pt")
    answers = processor.post_process_generation(model.generate(**inputs, max_new_tokens=12), inputs["input_ids"])
    correct = sum(answer.startswith(f"a {name} square") for answer, name in zip(answers, truth))
    assert correct / len(truth) >= 0.5, answers  # chance: 0.25


def _corrupt_shards(folder):
    rng = np.random.default_rng(1)
    good = [{"image": colour_image(NAMES[i % 4], rng), "caption": f"a {NAMES[i % 4]} square"} for i in range(16)]
    bad_image = {"image": b"this is not an image", "caption": "broken", "image_ext": "jpg"}
    write_pair_shard(folder / "pairs-bad-0.tar", [bad_image] + good[:3])
    # A truncated tar: written whole, then cut in the middle of a member.
    write_pair_shard(folder / "pairs-bad-1.tar", good[8:])
    data = (folder / "pairs-bad-1.tar").read_bytes()
    (folder / "pairs-bad-1.tar").write_bytes(data[: len(data) * 2 // 3])
    docs = [document([NAMES[i % 4], NAMES[(i + 1) % 4]], rng) for i in range(6)]
    missing_fields = {"text_list": ["no images here"]}
    write_interleaved_shard(folder / "docs-bad-0.tar", docs[:2] + ["{not json", missing_fields] + docs[2:])


def test_bad_shards_train_to_the_end_and_report_what_was_skipped(workdir, tmp_path):
    _corrupt_shards(tmp_path)
    output_dir = tmp_path / "run"
    main(common_args(workdir, output_dir, 6) + [
        "--laion_shards", str(tmp_path / "pairs-bad-*.tar"), "--mmc4_shards", str(tmp_path / "docs-bad-0.tar"),
        "--batch_size_laion", "2", "--batch_size_mmc4", "1", "--mmc4_min_num_images", "1", "--logging_steps", "1",
        "--gradient_checkpointing",  # exercised here too: frozen LM, trainable blocks
    ])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    final = state["log_history"][-1]
    # Every shard was read at least once (several epochs of these small shards); each problem is counted.
    for reason in ("undecodable_image", "truncated_tar", "bad_json", "missing_fields"):
        assert final[f"skipped_{reason}"] >= 1, final


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "not both or neither"),
        (["--model_name_or_path", "x", "--vision_model", "v"], "not both or neither"),
        (["--vision_model", "v"], "both --vision_model and --language_model"),
        (["--vision_model", "v", "--language_model", "l"], "--laion_shards and --mmc4_shards"),
        (["--vision_model", "v", "--language_model", "l", "--laion_shards", "a"], "on both streams"),
        (["--vision_model", "v", "--language_model", "l", "--laion_shards", "a", "--mmc4_shards", "b"],
         "--max_steps"),
        (["--vision_model", "v", "--language_model", "l", "--laion_shards", "a", "--mmc4_shards", "b",
          "--max_steps", "5", "--dataset_resampled"], "--dataset_resampled draws forever"),
        (["--vision_model", "v", "--language_model", "l", "--laion_shards", "a", "--mmc4_shards", "b",
          "--max_steps", "5", "--shuffle_buffer_size", "-1"], "--shuffle_buffer_size must be >= 0"),
        (["--vision_model", "v", "--language_model", "l", "--finetune_data", "f", "--config_overrides", "{"],
         "not valid JSON"),
        (["--vision_model", "v", "--language_model", "l", "--finetune_data", "f", "--config_overrides",
          '{"perceiver_detph": 2}'], "unknown OpenFlamingoConfig fields"),
        (["--bogus", "1"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("openflamingo-train: error:") and message in err


def test_finetuning_with_lora_from_the_cli(workdir, tmp_path):
    # Start from a trained-shaped OpenFlamingo folder: build one from the backbones and save it.
    base = tmp_path / "base"
    from openflamingo_hf.cli.train import ModelArguments, load_model_and_processor

    model, processor = load_model_and_processor(ModelArguments(
        vision_model=str(workdir / "vision"), language_model=str(workdir / "lm"), config_overrides=SMALL,
    ))
    model.save_pretrained(base)
    processor.save_pretrained(base)
    rng = np.random.default_rng(2)
    lines = []
    for i in range(8):
        colour_image(NAMES[i % 4], rng).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {NAMES[i % 4]} square"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    output_dir = tmp_path / "ft"
    main([
        "--model_name_or_path", str(base), "--finetune_data", str(tmp_path / "data.jsonl"), "--lora",
        "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-3", "--warmup_steps", "0",
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no",
    ])
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(output_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.fixture(scope="module")
def finetune_base(workdir, tmp_path_factory):
    """An OpenFlamingo folder (built from the tiny backbones) to fine-tune, and a folder of images."""
    from openflamingo_hf.cli.train import ModelArguments, load_model_and_processor

    folder = tmp_path_factory.mktemp("finetune_base")
    model, processor = load_model_and_processor(ModelArguments(
        vision_model=str(workdir / "vision"), language_model=str(workdir / "lm"), config_overrides=SMALL,
    ))
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    colour_image("red", np.random.default_rng(0)).save(folder / "red.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


BAD_JSONL = {
    "missing image": ('{"image": "nowhere.png", "caption": "x"}', "no image file"),
    "invalid json": ('{"image": "red.png", "caption": ', "not valid JSON"),
    "unknown shape": ('{"image": "red.png", "text": "x"}', "line 1"),
    "marker mismatch": ('{"images": ["red.png"], "prompt": "<image><image>Output:", "answer": "x"}', "<image>"),
    "unreadable image": ('{"image": "broken.png", "caption": "x"}', "broken.png"),
    "empty file": ("", "no examples"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_finetuning_data_is_one_line_before_the_model_loads(case, finetune_base, tmp_path, capsys, monkeypatch):
    from openflamingo_hf.cli import train as train_cli

    line, message = BAD_JSONL[case]
    data = finetune_base / f"{case.replace(' ', '_')}.jsonl"
    data.write_text(line + ("\n" if line else ""))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train_cli, "load_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", str(finetune_base / "model"), "--finetune_data", str(data),
              "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("openflamingo-train: error: --finetune_data") and message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_name_or_path", "./nonexistent"], "no such folder, and not a Hub repo id"),
        (["--finetune_data", "missing.jsonl"], "--finetune_data missing.jsonl: no such file"),
        (["--lora", "--lora_targets", "vision_model"], "--lora_targets vision_model:"),
    ],
)
def test_bad_model_and_lora_arguments_are_one_line(argv, message, finetune_base, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": str(finetune_base / "red.png"), "caption": "x"}) + "\n")
    defaults = {"--model_name_or_path": str(finetune_base / "model"), "--finetune_data": str(tmp_path / "data.jsonl")}
    for option, value in defaults.items():
        if option not in argv:
            argv = [option, value] + argv
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("openflamingo-train: error:") and message in err, err


def test_the_last_line_says_where_the_model_went(finetune_base, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": str(finetune_base / "red.png"), "caption": "x"}) + "\n")
    main(["--model_name_or_path", str(finetune_base / "model"), "--finetune_data", str(tmp_path / "data.jsonl"),
          "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--max_steps", "1",
          "--per_device_train_batch_size", "1", "--disable_tqdm", "true", "--save_strategy", "no"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"openflamingo-train: wrote the model and processor to {tmp_path / 'out'}."


@pytest.mark.parametrize("run", ["pretraining", "lora"])
def test_saved_tokenizer_keeps_no_training_padding_or_truncation(run, workdir, finetune_base, tmp_path):
    # Training tokenizes with padding / truncation to max_length, which transformers leaves on the tokenizer's
    # backend; the saved folders (checkpoints too) must not carry them into later use.
    output_dir = tmp_path / "run"
    if run == "pretraining":
        main(common_args(workdir, output_dir, 2) + [
            "--laion_shards", str(workdir / "pairs-0.tar"), "--mmc4_shards", str(workdir / "docs-0.tar"),
            "--save_strategy", "steps", "--save_steps", "2",
        ])
        folders = [output_dir, output_dir / "checkpoint-2"]
    else:
        (tmp_path / "data.jsonl").write_text(
            json.dumps({"image": str(finetune_base / "red.png"), "caption": "a red square"}) + "\n")
        main(["--model_name_or_path", str(finetune_base / "model"), "--finetune_data", str(tmp_path / "data.jsonl"),
              "--lora", "--finetune_max_length", "24", "--output_dir", str(output_dir), "--use_cpu",
              "--report_to", "none", "--max_steps", "1", "--per_device_train_batch_size", "1",
              "--disable_tqdm", "true", "--save_strategy", "no"])
        folders = [output_dir]
    for folder in folders:
        saved = json.loads((folder / "tokenizer.json").read_text())
        assert saved["padding"] is None and saved["truncation"] is None, (folder, saved["padding"], saved["truncation"])

    processor = AutoProcessor.from_pretrained(output_dir)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = processor(images=[[colour_image("red", rng)], [colour_image("blue", rng)]],
                           text=["<image>", "<image>a long prompt of several more words"], padding=True,
                           return_tensors="pt")
    assert not [str(warning.message) for warning in caught if "max_length" in str(warning.message)]
    assert inputs["input_ids"].shape[0] == 2


def test_the_last_line_names_the_default_output_folder(finetune_base, tmp_path, capsys, monkeypatch):
    """Without --output_dir the model goes to TrainingArguments' default folder, relative to the working folder: the
    last line gives its absolute path, and the model is there."""
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": str(finetune_base / "red.png"), "caption": "x"}) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    main(["--model_name_or_path", str(finetune_base / "model"), "--finetune_data", str(tmp_path / "data.jsonl"),
          "--use_cpu", "--report_to", "none", "--max_steps", "1", "--per_device_train_batch_size", "1",
          "--disable_tqdm", "true", "--save_strategy", "no"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    (written,) = [path for path in run_dir.iterdir() if (path / "config.json").is_file()]
    assert last == f"openflamingo-train: wrote the model and processor to {written}."
