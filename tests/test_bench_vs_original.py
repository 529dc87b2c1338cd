"""benchmarks/bench_vs_original.py: the table and ratios, the recipe's labels, our side of the weight path, the
stepped trainer, and (only where scripts/setup_original_env.sh has made .venv-original) one short run against the
original."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


bench = _load("bench_vs_original")
worker = sys.modules["_original_worker"]

META = {"eoc_token_id": 4093, "media_token_id": 4094, "pad_token_id": 4095, "vocab_size": 4096,
        "decoder_layers_attr_name": "model.layers"}


# ----------------------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------------------


def _case(kind="time", items=8, target=2.0, original=(0.4, 0.5, 0.6), ours=(0.2,), compiled=None, error=None):
    case = bench.CaseResult("greedy_b8", "greedy B=8 decode", kind, items, "tok/s" if items else "", target=target)
    case.systems[bench.ORIGINAL] = bench.SystemResult(list(original))
    case.systems[bench.OURS] = bench.SystemResult(list(ours))
    if compiled is not None or error is not None:
        case.systems[bench.OURS_COMPILED] = bench.SystemResult(list(compiled or []), error=error)
    return case


def test_ratios_are_original_time_over_ours_and_memory_ours_over_original():
    case = _case()
    assert bench.ratio(case, bench.OURS) == pytest.approx(0.5 / 0.2)
    assert bench.ratio(case, bench.OURS_COMPILED) is None
    memory = _case(kind="memory", items=0, target=1.0, original=(200.0,), ours=(100.0,))
    assert bench.ratio(memory, bench.OURS) == pytest.approx(0.5)
    assert bench.format_target(memory) == "≤ 1× (met)"


def test_cells_units_throughput_and_targets():
    case = _case(compiled=(0.1,))
    assert bench.format_value(case, case.systems[bench.ORIGINAL]) == "500.0 ms (16.0 tok/s)"
    assert bench.format_ratio(case, bench.OURS) == "2.50×"
    assert bench.format_target(case) == "≥ 2× (met)"  # the best of our configurations counts
    slow = _case(ours=(0.4,), compiled=(0.45,))
    assert bench.format_target(slow) == "≥ 2× (not met)"
    long = _case(items=40, original=(63.7,), ours=(19.9,))
    assert bench.format_value(long, long.systems[bench.ORIGINAL]) == "63.70 s (0.6 tok/s)"
    memory = _case(kind="memory", items=0, original=(3 * 2**20,), ours=(2**20,))
    assert bench.format_value(memory, memory.systems[bench.OURS]) == "1 MiB"


def test_failed_configuration_is_a_cell_not_a_crash():
    case = _case(error="TypeError: static cache is not supported")
    table = bench.markdown_table([case])
    lines = table.splitlines()
    assert lines[0].startswith("| case | original | ours |") and len(lines) == 3
    row = lines[2].split(" | ")
    assert row[4] == "failed: TypeError: static cache is not supported" and row[5] == "n/a"
    assert "2.50×" in lines[2]
    data = bench.results_json([case], {"date": "x"})
    json.dumps(data)  # serialisable as it is
    assert data["cases"][0]["ratios"] == {"ours": pytest.approx(2.5), "ours_compiled": None}


def test_pipes_in_error_messages_do_not_break_the_table():
    case = _case(error="ValueError: a | b")
    assert bench.markdown_table([case]).splitlines()[2].count("|") == 9


def test_interleaved_order_rotates():
    systems = ["original", "ours", "ours_compiled"]
    orders = [bench.interleaved_order(systems, rep) for rep in range(3)]
    assert orders[0] == systems and orders[1] == ["ours", "ours_compiled", "original"]
    assert {o[0] for o in orders} == set(systems)  # each system leads once


def test_generation_timing_splits_prefill_and_decode():
    timing = worker.generation_timing(10.0, [10.5, 10.6, 10.8, 10.9], 11.0)
    assert timing["prefill"] == pytest.approx(0.5) and timing["total"] == pytest.approx(1.0)
    assert timing["decode_step"] == pytest.approx(0.1) and timing["steps"] == 4


def _original_label_loop(input_ids, media, eoc, pad, stream):
    """open_flamingo/train/train_utils.py's label construction, as written there."""
    labels = input_ids.clone()
    labels[labels == pad] = -100
    if stream == "mmc4":
        for i in range(labels.shape[0]):
            label_idx = 0
            while label_idx < labels.shape[1] and labels[i][label_idx] != media:
                labels[i][label_idx] = -100
                label_idx += 1
            for endofchunk_idx in torch.where(labels[i] == eoc)[0]:
                token_idx = endofchunk_idx + 1
                while token_idx < labels.shape[1] and labels[i][token_idx] != media:
                    labels[i][token_idx] = -100
                    token_idx += 1
    labels[labels == media] = -100
    return labels


@pytest.mark.parametrize("stream", ["laion", "mmc4"])
def test_recipe_labels_match_the_original_loop(stream):
    g = torch.Generator().manual_seed(0)
    media, eoc, pad = 7, 8, 9
    ids = torch.randint(0, 12, (6, 40), generator=g)  # markers anywhere: eoc without a following image, pads, ...
    ids[0, :5] = torch.tensor([1, 2, media, 3, eoc])
    expected = _original_label_loop(ids, media, eoc, pad, stream)
    assert torch.equal(worker.recipe_labels(ids, media, eoc, pad, stream), expected)


def test_inputs_hold_one_marker_per_image():
    inputs = bench.make_inputs(bench.SHAPES["small"], META)
    assert inputs["gen_ids"].shape == (8, bench.GEN_PROMPT_TOKENS)
    assert ((inputs["gen_ids"] == META["media_token_id"]).sum(1) == bench.GEN_IMAGES).all()
    assert ((inputs["shots_ids"] == META["media_token_id"]).sum() == bench.SHOTS + 1).item()
    assert inputs["mmc4_pixels"].shape == (8, 5, 1, 3, 56, 56)
    text = inputs["gen_ids"][inputs["gen_ids"] < META["eoc_token_id"]]
    assert int(text.min()) >= 2  # never the tokenizer's unk / eos
    assert set(inputs["gen_ids"].unique().tolist()) - set(range(4093)) <= {META["eoc_token_id"], META["media_token_id"]}


@pytest.mark.parametrize("argv, message", [
    (["--cases", "greedy_b1,nope"], "unknown case(s) nope"),
    (["--reps", "0"], "at least 1"),
    (["--device", "cpu", "--bf16"], "--bf16 is for GPU runs"),
])
def test_command_line_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_settings(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_settings_defaults():
    settings, _ = bench.parse_settings(["--device", "cpu"])
    assert settings.shape.name == "small" and settings.cases == bench.ALL_CASES and settings.compiled
    assert settings.reps >= 1 and not settings.bf16 and settings.threads == 1  # one thread per side on CPU
    assert bench.parse_settings(["--device", "cpu", "--threads", "2"])[0].threads == 2


def test_missing_original_environment_names_the_setup_script(tmp_path):
    with pytest.raises(bench.BenchError, match="scripts/setup_original_env.sh"):
        bench.OriginalWorker(python=tmp_path / "missing" / "python")


# ----------------------------------------------------------------------------------------------------------------------
# Our side of the weight path and the training step, without the original
# ----------------------------------------------------------------------------------------------------------------------


def _small_model():
    from openflamingo_hf import OpenFlamingoForConditionalGeneration

    torch.manual_seed(0)
    model = OpenFlamingoForConditionalGeneration(bench.our_config(bench.SHAPES["small"], META)).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def test_our_config_has_the_originals_fixed_sizes():
    config = bench.our_config(bench.SHAPES["small"], META)
    assert (config.perceiver_depth, config.perceiver_num_heads, config.perceiver_head_dim,
            config.perceiver_num_latents) == (6, 8, 64, 64)
    assert (config.cross_attn_num_heads, config.cross_attn_head_dim) == (8, 64)
    assert config.vision_config.num_attention_heads == 2 and config.vision_config.hidden_act == "quick_gelu"
    assert config.text_config.vocab_size == 4096 and config.media_token_id == 4094


def test_an_original_layout_state_dict_converts_back_to_the_same_model():
    """The bench's conversion step on a full original-layout state dict (open_clip vision keys, wrapped layers)."""
    from openflamingo_hf.convert import export_original_state_dict

    model = _small_model()
    original = export_original_state_dict(model, full=True)
    assert "vision_encoder.transformer.resblocks.0.attn.in_proj_weight" in original
    converted, report = bench.convert_to_ours(original, bench.SHAPES["small"], META)
    reference = model.state_dict()
    for key, tensor in converted.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert converted.generation_config.eos_token_id == META["eoc_token_id"]
    assert "from the checkpoint" in report.summary()


def test_stepped_trainer_alternates_and_records_losses(tmp_path, monkeypatch):
    """Two steps of OpenFlamingoTrainer released one at a time, on tiny recipe batches."""
    monkeypatch.setattr(bench, "LAION", {"batch": 2, "images": 1, "tokens": 8})
    monkeypatch.setattr(bench, "MMC4", {"batch": 2, "images": 2, "tokens": 16})
    monkeypatch.setattr(bench, "GEN_PROMPT_TOKENS", 8)
    monkeypatch.setattr(bench, "SHOTS", 1)
    model = _small_model()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "laion_ids": bench.chunked_ids(g, 2, 8, 1, 4093, 4094, 4093), "laion_pixels": torch.randn(2, 1, 1, 3, 56, 56),
        "mmc4_ids": bench.chunked_ids(g, 2, 16, 2, 4093, 4094, 4093), "mmc4_pixels": torch.randn(2, 2, 1, 3, 56, 56),
    }
    trainer = bench.make_our_trainer(model, inputs, steps=2, device="cpu", bf16=False, workdir=tmp_path)
    stepped = bench.SteppedTrainer(trainer, "cpu")
    before = model.perceiver.latents.detach().clone()
    seconds = [stepped.step()]
    assert trainer.state.global_step == 1  # the second step waits for its release
    seconds.append(stepped.step())
    stepped.close()
    assert all(s > 0 for s in seconds) and trainer.state.global_step == 2
    assert not torch.equal(before, model.perceiver.latents)
    assert set(trainer._stream_losses) == {"laion", "mmc4"}


def test_stepped_trainer_closes_early(tmp_path, monkeypatch):
    """Closing with steps left (the original's side failed) stops training instead of hanging."""
    monkeypatch.setattr(bench, "LAION", {"batch": 2, "images": 1, "tokens": 8})
    monkeypatch.setattr(bench, "MMC4", {"batch": 2, "images": 2, "tokens": 16})
    g = torch.Generator().manual_seed(0)
    inputs = {
        "laion_ids": bench.chunked_ids(g, 2, 8, 1, 4093, 4094, 4093), "laion_pixels": torch.randn(2, 1, 1, 3, 56, 56),
        "mmc4_ids": bench.chunked_ids(g, 2, 16, 2, 4093, 4094, 4093), "mmc4_pixels": torch.randn(2, 2, 1, 3, 56, 56),
    }
    trainer = bench.make_our_trainer(_small_model(), inputs, steps=5, device="cpu", bf16=False, workdir=tmp_path)
    stepped = bench.SteppedTrainer(trainer, "cpu")
    stepped.step()
    stepped.close()
    assert trainer.state.global_step == 1  # no step after the close


def test_peak_memory_sees_an_allocation():
    meter = worker.PeakMemory("cpu")
    meter.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = meter.peak()
    del block
    if Path("/proc/self/clear_refs").exists():
        assert peak >= 48 * 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Against the original (only with .venv-original)
# ----------------------------------------------------------------------------------------------------------------------

needs_original = pytest.mark.skipif(not bench.ORIGINAL_PYTHON.exists(),
                                    reason=".venv-original missing: bash scripts/setup_original_env.sh")


@needs_original
def test_short_run_against_the_original(tmp_path):
    """Build, convert, the greedy token check, one timed B=1 rep per system: identical tokens and a table."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_vs_original.py"), "--cases", "greedy_b1", "--reps", "1",
         "--warmup", "0", "--no-compile", "--json", str(out), "--workdir", str(tmp_path / "work"), "--quiet"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "B=1: 1 x 32 new tokens identical" in result.stdout
    assert "B=8: 8 x 32 new tokens identical" in result.stdout
    assert "| greedy B=1 decode (per step) |" in result.stdout
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["ratios"]["ours"] > 0 and case["note"] == "same tokens"
    assert data["header"]["original"]["open_flamingo"] == "2.0.1"
