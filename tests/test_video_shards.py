"""Videos in training shards: pair tars / JSONL / folders and MMC4 documents, frame sampling, skips, one CLI run."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds

from openflamingo_hf.embedded.world import Clip, make_clips, write_clip_file
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.trainer.collator import SKIPPED_KEY, OpenFlamingoDataCollator
from openflamingo_hf.trainer.data import build_interleaved_dataset, build_pair_dataset, preprocess_interleaved
from openflamingo_hf.trainer.shard_reading import VideoSetupError, shard_rng
from openflamingo_hf.trainer.shard_writing import (
    encode_image,
    encode_image_base64,
    encode_video_base64,
    write_interleaved_shard,
    write_pair_shard,
)

pytest.importorskip("av")

NUM_FRAMES = 3
MAX_LENGTH = 16
SEED = 0


class NoFlip:
    """An rng whose draws are all 0.9: no flip, and a single-image document is kept."""

    @staticmethod
    def random() -> float:
        return 0.9


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


@pytest.fixture(scope="module")
def long_clip() -> Clip:
    """An 8-frame clip (two world clips one after the other): 3 of its frames are sampled, frames 0, 2 and 5."""
    first, second = make_clips(2, seed=5)
    return Clip(first.frames + second.frames, first.shape, first.color, first.direction)


def _clip_bytes(clip: Clip, path) -> bytes:
    """The clip as a lossless video file's bytes."""
    write_clip_file(clip, str(path))
    return path.read_bytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_tar(path, samples: list[dict]) -> str:
    """A webdataset tar written member by member (independently of `write_pair_shard`)."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _reference(processor, frames, caption: str, flip: bool) -> dict[str, torch.Tensor]:
    """What the processor itself makes of the video and caption: `<video>` where the pair's media goes."""
    text = processor.pair_text(caption).replace(processor.image_token, "<video>", 1)
    batch = processor(videos=[[frames]], text=[text], num_frames=NUM_FRAMES, return_tensors="pt",
                      padding="max_length", max_length=MAX_LENGTH, truncation=True, padding_side="right")
    expected = {key: value[0] for key, value in batch.items()}
    expected["labels"] = processor.pretraining_labels(batch["input_ids"], batch["attention_mask"])[0]
    if flip:
        expected["pixel_values"] = expected["pixel_values"].flip(-1)
    return expected


def _frames_alone(processor, frames) -> torch.Tensor:
    """(T, 3, H, W): the frames processed as separate images."""
    return processor.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("layout", ["avi", "numbered frames", "frames.npy"])
def test_tar_video_pair_equals_the_processor_on_the_decoded_frames(processor, long_clip, tmp_path, layout):
    frames, caption = long_clip.frames, long_clip.caption
    if layout == "avi":
        media = {"avi": _clip_bytes(long_clip, tmp_path / "clip.avi")}
    elif layout == "numbered frames":  # 0, 5, 10, ...: the number orders the frames, not the tar ("10" < "5")
        media = {f"{5 * index}.png": encode_image(frame) for index, frame in enumerate(frames)}
    else:
        media = {"frames.npy": _npy(np.stack([np.asarray(frame) for frame in frames]))}
    shard = _write_tar(tmp_path / "pairs.tar", [{"__key__": "clip", **media, "txt": caption.encode()}])
    (sample,) = build_pair_dataset(shard, processor, max_length=MAX_LENGTH, seed=SEED, num_frames=NUM_FRAMES)

    flip = shard_rng(SEED, shard).random() < 0.5
    expected = _reference(processor, frames, caption, flip)
    assert sample["pixel_values"].shape[:2] == (1, NUM_FRAMES)
    for key in ("pixel_values", "frame_mask", "input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(sample[key], expected[key], rtol=0, atol=0, msg=key)
    # Uniform sampling of 3 out of 8 frames keeps frames 0, 2 and 5 (arange(3) * 8 // 3).
    alone = _frames_alone(processor, [frames[index] for index in (0, 2, 5)])
    torch.testing.assert_close(sample["pixel_values"][0], alone.flip(-1) if flip else alone)


def test_jsonl_and_folder_videos(processor, long_clip, tmp_path):
    frames = long_clip.frames
    write_clip_file(long_clip, str(tmp_path / "clip.avi"))
    # Frame files named 0, 5, 10, ..., 35: in text order "10.png" would come before "5.png".
    names = [f"{5 * index}.png" for index in range(len(frames))]
    for folder in (tmp_path / "frames", tmp_path / "folder" / "b"):
        folder.mkdir(parents=True)
        for name, frame in zip(names, frames):
            frame.save(folder / name)
    lines = [
        {"video": "clip.avi", "caption": "a file"},
        {"video": [f"frames/{name}" for name in names], "caption": "a frame list"},
        {"video": "nowhere.avi", "caption": "missing"},
    ]
    jsonl, folder = tmp_path / "pairs.jsonl", tmp_path / "folder"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (folder / "a.avi").write_bytes((tmp_path / "clip.avi").read_bytes())
    for stem in ("a", "b"):
        (folder / f"{stem}.txt").write_text(f"clip {stem}")

    samples = list(build_pair_dataset([str(jsonl), str(folder)], processor, max_length=MAX_LENGTH, seed=SEED,
                                      num_frames=NUM_FRAMES, shuffle=False))
    assert len(samples) == 4
    assert sum(sample[SKIPPED_KEY].get("missing_video_file", 0) for sample in samples) == 1
    alone = _frames_alone(processor, [frames[index] for index in (0, 2, 5)])
    draws = {shard: shard_rng(SEED, str(shard)) for shard in (jsonl, folder)}  # one flip draw per sample
    for sample, shard in zip(samples, [jsonl, jsonl, folder, folder]):
        flip = draws[shard].random() < 0.5
        torch.testing.assert_close(sample["pixel_values"][0], alone.flip(-1) if flip else alone, rtol=0, atol=0)
        assert sample["frame_mask"].tolist() == [[True] * NUM_FRAMES]


def test_mixed_image_and_video_batch_collates_with_padded_frames_masked(processor, tmp_path):
    clip = make_clips(1, seed=7)[0]  # 4 frames
    shard = write_pair_shard(tmp_path / "pairs.tar", [
        {"video": write_clip_file(clip, str(tmp_path / "clip.avi")), "caption": "four frames"},
        {"video": clip.frames[:2], "caption": "two frames"},
        {"image": make_image(3, (40, 40)), "caption": "an image"},
    ])
    assert shard == 3
    samples = list(build_pair_dataset(str(tmp_path / "pairs.tar"), processor, max_length=MAX_LENGTH, num_frames=4,
                                      shuffle=False))
    batch = OpenFlamingoDataCollator(processor.tokenizer.pad_token_id)(samples)

    assert batch["pixel_values"].shape == (3, 1, 4, 3, 30, 30)
    assert batch["frame_mask"].tolist() == [[[True] * 4], [[True, True, False, False]], [[True, False, False, False]]]
    # Padding frames are zeros; real frames are each sample's own pixels.
    assert not batch["pixel_values"][1, 0, 2:].any() and not batch["pixel_values"][2, 0, 1:].any()
    for row, sample in enumerate(samples):
        count = sample["pixel_values"].shape[1]
        torch.testing.assert_close(batch["pixel_values"][row, 0, :count], sample["pixel_values"][0])
    assert "frame_mask" not in samples[2]  # an image pair stays as it was without videos
    assert samples[2]["pixel_values"].shape == (1, 1, 3, 30, 30)


def _document(clip: Clip, tmp_path) -> dict:
    """
    Four sentences; `image_info` in another order than the text: an image for sentence 3, a video file for
    sentence 2, an image for sentence 0 and a frame list for sentence 1.
    """
    video_file = write_clip_file(clip, str(tmp_path / "doc.avi"))
    info = [
        {"image_base64": encode_image_base64(make_image(11, (64, 64)))},
        {"video_base64": encode_video_base64(video_file)},
        {"image_base64": encode_image_base64(make_image(12, (64, 64)))},
        {"frames_base64": [encode_image_base64(frame) for frame in clip.frames[:2]]},
    ]
    sentences = ["first words.", "a short clip.", "a moving shape.", "last words."]
    slots = [3, 2, 0, 1]
    similarity = [[0.9 if column == slot else 0.1 for column in range(4)] for slot in slots]
    return {"text_list": sentences, "image_info": info, "similarity_matrix": similarity}


def test_interleaved_document_puts_each_video_in_its_text_slot(processor, tmp_path):
    clip = make_clips(1, seed=8)[0]
    document = _document(clip, tmp_path)
    sample = preprocess_interleaved(document, processor, max_length=48, rng=NoFlip(), num_frames=4)

    # Text order: image (sentence 0), frames (1), video file (2), image (3).
    text = processor.interleaved_text(document["text_list"], [0, 1, 2, 3])
    ids = processor.tokenizer(text, max_length=48, padding="max_length", truncation=True, return_tensors="pt")
    torch.testing.assert_close(sample["input_ids"], ids["input_ids"][0])
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 4
    assert sample["pixel_values"].shape == (4, 4, 3, 30, 30)
    assert sample["frame_mask"].tolist() == [[True, False, False, False], [True, True, False, False],
                                             [True] * 4, [True, False, False, False]]
    images = _frames_alone(processor, [make_image(12, (64, 64)), make_image(11, (64, 64))])
    torch.testing.assert_close(sample["pixel_values"][0, 0], images[0])
    torch.testing.assert_close(sample["pixel_values"][1, :2], _frames_alone(processor, clip.frames[:2]))
    torch.testing.assert_close(sample["pixel_values"][2], _frames_alone(processor, clip.frames))
    torch.testing.assert_close(sample["pixel_values"][3, 0], images[1])
    assert not sample["pixel_values"][0, 1:].any() and not sample["pixel_values"][1, 2:].any()


def test_corrupt_videos_are_skipped_and_counted(processor, tmp_path):
    clip = make_clips(1, seed=9)[0]
    avi = _clip_bytes(clip, tmp_path / "clip.avi")
    shard = _write_tar(tmp_path / "bad.tar", [
        {"__key__": "garbage", "mp4": b"not a video" * 2000, "txt": b"x"},
        {"__key__": "truncated", "avi": avi[: len(avi) // 2], "txt": b"x"},
        {"__key__": "array", "frames.npy": b"not an array", "txt": b"x"},
        {"__key__": "frame", "0.png": encode_image(clip.frames[0]), "1.png": b"not an image", "txt": b"x"},
        {"__key__": "good", "avi": avi, "txt": b"a good clip"},
    ])
    samples = list(build_pair_dataset(shard, processor, max_length=MAX_LENGTH, num_frames=2))
    assert len(samples) == 1 and samples[0]["frame_mask"].shape == (1, 2)
    assert samples[0][SKIPPED_KEY] == {"undecodable_video": 4}

    # In a document, an undecodable video is dropped (like an undecodable image) and the rest is used.
    document = _document(clip, tmp_path)
    document["image_info"][1] = {"video_base64": encode_video_base64(b"not a video" * 2000)}
    write_interleaved_shard(tmp_path / "docs.tar", [document])
    (sample,) = build_interleaved_dataset(str(tmp_path / "docs.tar"), processor, max_length=48, num_frames=4)
    assert sample[SKIPPED_KEY] == {"video_undecodable": 1}
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 3

    # Without a frame count the run cannot read any video: raised, not skipped.
    assert processor.num_frames is None
    with pytest.raises(VideoSetupError, match="num_frames"):
        list(build_pair_dataset(shard, processor, max_length=MAX_LENGTH))


def test_openflamingo_train_on_shards_with_videos(tmp_path):
    from transformers import AutoProcessor

    from openflamingo_hf.cli.train import main
    from openflamingo_hf.testing_utils import save_tiny_backbones

    save_tiny_backbones(tmp_path)
    clips = make_clips(4, seed=10)
    write_pair_shard(tmp_path / "pairs.tar", [
        {"video": write_clip_file(clips[0], str(tmp_path / "c0.avi")), "caption": clips[0].caption},
        {"video": clips[1].frames[:3], "caption": clips[1].caption},
        {"image": make_image(4, (40, 40)), "caption": "an image"},
        {"video": np.stack([np.asarray(frame) for frame in clips[2].frames]), "caption": clips[2].caption},
    ])
    write_interleaved_shard(tmp_path / "docs.tar", [_document(clips[3], tmp_path)] * 2)
    small = {"perceiver_depth": 1, "perceiver_num_latents": 4, "perceiver_num_heads": 2, "perceiver_head_dim": 16,
             "cross_attn_num_heads": 2, "cross_attn_head_dim": 16, "perceiver_max_num_frames": 4}
    output_dir = tmp_path / "run"
    main([
        "--vision_model", str(tmp_path / "vision"), "--language_model", str(tmp_path / "lm"),
        "--config_overrides", json.dumps(small), "--laion_shards", str(tmp_path / "pairs.tar"),
        "--mmc4_shards", str(tmp_path / "docs.tar"), "--num_frames", "4", "--batch_size_laion", "2",
        "--batch_size_mmc4", "1", "--laion_max_length", "16", "--mmc4_max_length", "48", "--max_steps", "2",
        "--logging_steps", "1", "--warmup_steps", "0", "--output_dir", str(output_dir), "--use_cpu",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
    ])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [entry[key] for entry in state["log_history"] for key in ("loss_laion", "loss_mmc4") if key in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), state["log_history"]
    assert AutoProcessor.from_pretrained(output_dir).num_frames == 4  # the saved processor samples videos alike


def test_num_frames_flag_is_checked_and_explained(tmp_path, capsys):
    from openflamingo_hf.cli.train import build_parser, main

    assert "Frames sampled uniformly from each video" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        main(["--vision_model", "v", "--language_model", "l", "--laion_shards", "a", "--mmc4_shards", "b",
              "--max_steps", "1", "--num_frames", "0", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--num_frames must be at least 1" in err, err
