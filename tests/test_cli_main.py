"""The `openflamingo` command: `generate` against `model.generate` + `post_process_generation`, its defaults and
one-line errors, `releases`, and the subcommands handed to `openflamingo-convert` / `-export` / `-train` (tiny models,
offline; the shipped model is used only when it is installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf.cli import main as cli_main
from openflamingo_hf.cli.main import build_generation_inputs, main
from openflamingo_hf.releases import RELEASES
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image

GENERATE = "openflamingo generate: error:"
PROMPT = "<image>Output:a<|endofchunk|><image>Output:"


def run_cli(argv: list[str], capsys) -> tuple[str, str]:
    """Runs `openflamingo ARGV` in-process; it must succeed. Returns (stdout, stderr)."""
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def usage_error(argv: list[str], capsys, prefix: str = GENERATE) -> str:
    """Runs `openflamingo ARGV`, which must stop with exit status 2 and one `prefix ...` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
    return err


def exits_with_help(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama OpenFlamingo saved as a model folder, its in-memory model and processor, and two PNG images."""
    folder = tmp_path_factory.mktemp("cli_main")
    model, processor = build_tiny_model_and_processor("llama")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    images = []
    for seed in range(3):
        path = folder / f"image{seed}.png"
        make_image(seed, size=(40, 32)).save(path)
        images.append(str(path))
    return SimpleNamespace(dir=str(folder / "model"), model=model, processor=processor, images=images, root=folder)


def reference_answers(tiny, rows: list[list[str]], prompts: list[str], **generate_kwargs) -> list[str]:
    inputs = tiny.processor(images=rows, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = tiny.model.generate(**inputs, do_sample=False, num_beams=1, **generate_kwargs)
    return [answer.strip() for answer in tiny.processor.post_process_generation(output, inputs["input_ids"])]


@pytest.fixture
def fake_embedded(monkeypatch, tiny):
    """Stands in for `openflamingo_hf.embedded` (sample images and their few-shot caption prompt), so the defaults
    are tested whether or not the shipped model is installed."""
    captions = ["Output:a cat.", "Output:a dog."]
    fake = SimpleNamespace(
        EMBEDDED_MODEL_DIR=tiny.dir,
        sample_image_paths=lambda: list(tiny.images),
        default_caption_prompt=lambda processor, n: processor.few_shot_prompt(captions[: n - 1], ""),
    )
    monkeypatch.setattr(cli_main, "_embedded", lambda: fake)
    return fake


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)


# ----------------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_matches_model_generate(tiny, capsys):
    argv = ["generate", "--model", tiny.dir, "--image", tiny.images[0], "--image", tiny.images[1],
            "--prompt", PROMPT, "--max_new_tokens", "3", "--device", "cpu"]
    out, err = run_cli(argv, capsys)
    (expected,) = reference_answers(tiny, [tiny.images[:2]], [PROMPT], max_new_tokens=3)
    assert out == expected + "\n"
    assert out.strip(), "the tiny model generated nothing to compare"
    assert "Loading" in err  # progress goes to stderr, the answer alone to stdout

    out_quiet, err_quiet = run_cli([*argv, "--quiet"], capsys)
    assert out_quiet == out and "Loading" not in err_quiet


def test_generate_beam_search_and_seeded_sampling(tiny, capsys):
    base = ["generate", "--model", tiny.dir, "--image", tiny.images[0], "--prompt", "<image>Output:",
            "--max_new_tokens", "4", "--device", "cpu", "-q"]
    out, _ = run_cli([*base, "--num_beams", "2"], capsys)
    inputs = tiny.processor(images=[[tiny.images[0]]], text=["<image>Output:"], return_tensors="pt")
    with torch.no_grad():
        output = tiny.model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    (expected,) = tiny.processor.post_process_generation(output, inputs["input_ids"])
    assert out == expected.strip() + "\n"

    sampled = [run_cli([*base, "--do_sample", "--temperature", "1.5", "--top_p", "0.9", "--seed", "3"], capsys)[0]
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_defaults_use_sample_images_and_caption_prompt(tiny, fake_embedded, capsys):
    # No --model, --image or --prompt: the (stand-in) shipped model, all sample images, the few-shot caption prompt.
    out, _ = run_cli(["generate", "--max_new_tokens", "3", "--device", "cpu"], capsys)
    prompt = fake_embedded.default_caption_prompt(tiny.processor, 3)
    assert prompt == "<image>Output:a cat.<|endofchunk|><image>Output:a dog.<|endofchunk|><image>"
    (expected,) = reference_answers(tiny, [tiny.images], [prompt], max_new_tokens=3)
    assert out == expected + "\n"

    # --image without --prompt: each image is the query in turn after the sample demonstrations; one line per image.
    query = tiny.root / "query.png"
    make_image(7).save(query)
    argv = ["generate", "--model", tiny.dir, "--image", str(query), "--image", tiny.images[0],
            "--max_new_tokens", "3", "--device", "cpu"]
    out, _ = run_cli(argv, capsys)
    rows = [tiny.images[:2] + [str(query)], tiny.images[:2] + [tiny.images[0]]]
    expected = reference_answers(tiny, rows, [prompt] * 2, max_new_tokens=3)
    assert out.splitlines() == [f"{query}: {expected[0]}", f"{tiny.images[0]}: {expected[1]}"]

    # --prompt without --image: as many sample images as the prompt has markers.
    out, _ = run_cli(["generate", "--prompt", PROMPT, "--max_new_tokens", "3", "--device", "cpu"], capsys)
    (expected,) = reference_answers(tiny, [tiny.images[:2]], [PROMPT], max_new_tokens=3)
    assert out == expected + "\n"


def test_build_generation_inputs(tiny, fake_embedded):
    processor = tiny.processor
    rows, prompts, labels = build_generation_inputs(processor, None, None)
    assert rows == [tiny.images] and labels is None
    assert prompts == [processor.few_shot_prompt(["Output:a cat.", "Output:a dog."], "")]
    rows, prompts, labels = build_generation_inputs(processor, ["q.png"], None)
    assert rows == [tiny.images[:2] + ["q.png"]] and labels == ["q.png"]
    rows, prompts, labels = build_generation_inputs(processor, None, "<image>Output:")
    assert rows == [tiny.images[:1]] and prompts == ["<image>Output:"]
    rows, prompts, labels = build_generation_inputs(processor, ["a.png", "b.png"], "x")
    assert rows == [["a.png", "b.png"]] and prompts == ["x"] and labels is None
    # A prompt without an <image> marker is text only: no sample image is added (the help says the first N, N = the
    # number of markers).
    rows, prompts, labels = build_generation_inputs(processor, None, "hello")
    assert rows == [[]] and prompts == ["hello"] and labels is None


def test_generate_text_only_prompt(tiny, fake_embedded, capsys):
    out, _ = run_cli(["generate", "--prompt", "Output:a cat", "--max_new_tokens", "3", "--device", "cpu"], capsys)
    (expected,) = reference_answers(tiny, [[]], ["Output:a cat"], max_new_tokens=3)
    assert out == expected + "\n"


def test_generate_marker_image_mismatch(tiny, capsys, no_model_loads):
    err = usage_error(["generate", "--model", tiny.dir, "--image", tiny.images[0], "--image", tiny.images[1],
                       "--prompt", "<image>Output:"], capsys)
    assert "1 `<image>` marker" in err and "2 images" in err


def test_generate_too_many_markers_for_the_samples(tiny, fake_embedded, capsys, no_model_loads):
    err = usage_error(["generate", "--prompt", "<image>" * 4], capsys)
    assert "4 <image> markers" in err and "--image" in err


def test_generate_missing_model_folder(tmp_path, tiny, capsys):
    err = usage_error(["generate", "--model", str(tmp_path / "no" / "such" / "model"), "--image", tiny.images[0],
                       "--prompt", "<image>"], capsys)
    assert "no such folder" in err
    (tmp_path / "empty").mkdir()
    err = usage_error(["generate", "--model", str(tmp_path / "empty"), "--image", tiny.images[0]], capsys)
    assert "no config.json" in err


def test_generate_bad_images(tmp_path, tiny, capsys, no_model_loads):
    err = usage_error(["generate", "--model", tiny.dir, "--image", str(tmp_path / "missing.png"),
                       "--prompt", "<image>"], capsys)
    assert "missing.png: no such file" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    err = usage_error(["generate", "--model", tiny.dir, "--image", tiny.images[0], "--image", str(broken),
                       "--prompt", "<image><image>"], capsys)
    # The user's argument (its path and position), not a slot of the prompt the command builds; nothing suggested
    # that the command refuses (URLs, PIL images).
    assert f"--image {broken} (--image number 2) is not a readable image file" in err
    assert "URL" not in err and "PIL" not in err and "Sample" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--num_beams", "0"], "--num_beams must be at least 1"),
        (["--temperature", "0.7"], "add --do_sample"),
        (["--do_sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--device", "tpu"], "--device tpu"),
        (["--max_new_tokens", "many"], "invalid int value"),
        (["--unknown"], "unrecognized arguments"),
    ],
)
def test_generate_argument_errors(flags, message, tiny, capsys, no_model_loads):
    err = usage_error(["generate", "--model", tiny.dir, "--image", tiny.images[0], "--prompt", "<image>", *flags],
                      capsys)
    assert message in err


def test_generate_help(capsys):
    out = exits_with_help(["generate", "--help"], capsys)
    for text in ("usage: openflamingo generate", "--model", "--image", "--prompt", "--max_new_tokens", "--num_beams",
                 "--do_sample", "--temperature", "--top_p", "--seed", "--device", "<|endofchunk|>"):
        assert text in out


def _embedded_model_installed() -> bool:
    try:
        from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR
    except ImportError:
        return False
    return os.path.isfile(os.path.join(EMBEDDED_MODEL_DIR, "config.json"))


@pytest.mark.skipif(not _embedded_model_installed(), reason="the shipped model folder has no config.json")
def test_generate_out_of_the_box(capsys):
    out, _ = run_cli(["generate", "--device", "cpu"], capsys)
    assert out.strip()


# ----------------------------------------------------------------------------------------------------------------------
# releases
# ----------------------------------------------------------------------------------------------------------------------


def test_releases_table(capsys):
    out, _ = run_cli(["releases"], capsys)
    lines = out.splitlines()
    assert len(lines) == 2 + len(RELEASES) == 7
    for release, line in zip(RELEASES.values(), lines[2:]):
        assert line.startswith(release.name)
        assert release.language_model in line and f"{release.coco_cider_4shot:.1f}" in line
        assert f"{release.vqav2_accuracy_4shot:.1f}" in line


def test_releases_json(capsys):
    out, _ = run_cli(["releases", "--json"], capsys)
    rows = json.loads(out)
    assert [row["name"] for row in rows] == list(RELEASES) and len(rows) == 5
    first = RELEASES[rows[0]["name"]]
    assert rows[0]["cross_attn_every_n_layers"] == first.cross_attn_every_n_layers
    assert rows[0]["coco_cider_4shot"] == first.coco_cider_4shot
    assert rows[0]["vqav2_accuracy_4shot"] == first.vqav2_accuracy_4shot
    assert rows[0]["checkpoint_repo"] == f"openflamingo/{first.name}"


# ----------------------------------------------------------------------------------------------------------------------
# The command and the subcommands handed over to the other CLIs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text",
    [
        ("convert", "Convert an original OpenFlamingo checkpoint"),
        ("export", "Load an OpenFlamingo model and its processor, write a Hub folder"),
        ("train", "--model_name_or_path"),
        ("eval", "--embedded_world"),
    ],
)
def test_passthrough_help(name, text, capsys):
    out = exits_with_help([name, "--help"], capsys)
    assert out.startswith(f"usage: openflamingo {name} ") and text in out


def test_passthrough_errors_and_standalone_names(capsys):
    from openflamingo_hf.cli.convert import build_parser as convert_parser
    from openflamingo_hf.cli.export import build_parser as export_parser

    err = usage_error(["export", "--model", "m"], capsys, prefix="openflamingo export: error:")
    assert "--output" in err
    usage_error(["convert", "--output", "x", "--bogus"], capsys, prefix="openflamingo convert: error:")
    # The standalone commands keep their own names.
    assert export_parser().prog == "openflamingo-export" and convert_parser().prog == "openflamingo-convert"


def test_top_level(capsys):
    out = exits_with_help(["--help"], capsys)
    for name in ("generate", "releases", "convert", "export", "train"):
        assert name in out
    err = usage_error(["frobnicate"], capsys, prefix="openflamingo: error:")
    assert "invalid choice" in err
    err = usage_error([], capsys, prefix="openflamingo: error:")
    assert "no command given" in err


def test_module_entry_point_and_light_import():
    """`python -m openflamingo_hf.cli` runs the command, and importing the command module loads no subcommand."""
    code = (
        "import sys, openflamingo_hf.cli.main; "
        "heavy = [m for m in ('openflamingo_hf.cli.convert', 'openflamingo_hf.cli.train', 'openflamingo_hf.releases', "
        "'openflamingo_hf.embedded', 'openflamingo_hf.trainer') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(openflamingo_hf.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    completed = subprocess.run(
        [sys.executable, "-m", "openflamingo_hf.cli", "releases", "--json"], capture_output=True, text=True, env=env
    )
    assert completed.returncode == 0, completed.stderr
    assert len(json.loads(completed.stdout)) == 5


def test_generate_with_videos(tiny, capsys):
    pytest.importorskip("av")
    from openflamingo_hf.embedded.world import make_clips, write_clip_file

    clips = [write_clip_file(clip, str(tiny.root / f"clip{i}.avi")) for i, clip in enumerate(make_clips(2, 3))]
    # Each video captioned alone (the zero-shot prompt `<video>`), one line per file.
    out, _ = run_cli(["generate", "--model", tiny.dir, "--video", clips[0], "--video", clips[1], "--num_frames", "3",
                      "--max_new_tokens", "4", "-q"], capsys)
    expected = []
    for path in clips:
        inputs = tiny.processor(videos=[path], text="<video>", num_frames=3, return_tensors="pt")
        with torch.no_grad():
            output = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(f"{path}: {tiny.processor.post_process_generation(output, inputs['input_ids'])[0].strip()}")
    assert out.splitlines() == expected
    # A prompt placing an image and a video.
    prompt = "<image>Output:a<|endofchunk|><video>Output:"
    out, _ = run_cli(["generate", "--model", tiny.dir, "--image", tiny.images[0], "--video", clips[0], "--prompt",
                      prompt, "--num_frames", "3", "--max_new_tokens", "4", "-q"], capsys)
    inputs = tiny.processor(images=[[tiny.images[0]]], videos=[[clips[0]]], text=[prompt], num_frames=3,
                            return_tensors="pt")
    with torch.no_grad():
        output = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.strip() == tiny.processor.post_process_generation(output, inputs["input_ids"])[0].strip()
    # Errors: a missing file; a video without num_frames on a processor that has none; images need a prompt.
    assert "--video nowhere.avi: no such file" in usage_error(["generate", "--model", tiny.dir, "--video", "nowhere.avi"],
                                                              capsys)
    assert "num_frames=N" in usage_error(["generate", "--model", tiny.dir, "--video", clips[0]], capsys)
    assert "needs a --prompt" in usage_error(["generate", "--model", tiny.dir, "--video", clips[0], "--image", tiny.images[0],
                                              "--num_frames", "2"], capsys)


def test_generate_captions_clip_files_with_the_shipped_video_variant(tmp_path, capsys):
    """Without --model, --video uses the embedded video variant: clip files (read with PyAV) are captioned as
    `caption_clips` captions the same clips in memory (the image model would never say "moving ...")."""
    pytest.importorskip("av")
    from openflamingo_hf.embedded import caption_clips
    from openflamingo_hf.embedded.world import HELD_OUT_SEED_START, make_clips, reverse_clip, write_clip_file

    clips = make_clips(2, HELD_OUT_SEED_START + 9100)
    clips += [reverse_clip(clip) for clip in clips]
    paths = [write_clip_file(clip, str(tmp_path / f"clip{i}.avi")) for i, clip in enumerate(clips)]
    out, _ = run_cli(["generate", *[arg for path in paths for arg in ("--video", path)], "-q"], capsys)
    expected = caption_clips(clips)
    assert out.splitlines() == [f"{path}: {text}" for path, text in zip(paths, expected)]
    assert all(" moving " in text for text in expected)
