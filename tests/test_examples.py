"""The example training scripts run end to end (a few steps each), so that the shipped models stay reproducible."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig

import openflamingo_hf  # noqa: F401  (registers the Auto classes)

ROOT = Path(__file__).resolve().parents[1]


def test_train_embedded_video_runs_its_stages_and_reports(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "train_embedded_video.py"), "--output_dir", str(tmp_path),
               "--warmup_steps", "3", "--warmup_clips", "100", "--warmup_images", "100", "--steps", "2",
               "--batch_size", "2", "--probe_every", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stage 0 step 3:" in completed.stdout and "stage mix: 2 steps" in completed.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"clip_caption_exact", "clip_direction", "clip_reversed_direction", "caption_exact"} <= set(report["scores"])
    assert AutoConfig.from_pretrained(tmp_path / "model").perceiver_max_num_frames == 4


def test_train_embedded_fine_tunes_from_a_model_folder(tmp_path):
    """`--init_from` runs only the recipe stage, from an OpenFlamingo folder, and exports and evaluates the result."""
    from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR

    command = [sys.executable, str(ROOT / "examples" / "train_embedded.py"), "--output_dir", str(tmp_path),
               "--init_from", EMBEDDED_MODEL_DIR, "--flamingo_steps", "2", "--warmup_steps", "1",
               "--num_pairs", "40", "--num_documents", "10", "--eval_examples", "3"]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"caption_exact", "caption_output_exact", "caption_output_exact_4shot", "vqa_exact"} <= set(report["scores"])
    assert set(report["seconds"]) == {"shards", "openflamingo", "total"}  # no backbone stages
    assert AutoConfig.from_pretrained(tmp_path / "model").text_config.vocab_size == AutoConfig.from_pretrained(
        EMBEDDED_MODEL_DIR).text_config.vocab_size


def test_train_embedded_refuses_a_folder_without_a_model(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "train_embedded.py"), "--init_from", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 2 and "no config.json" in completed.stderr
