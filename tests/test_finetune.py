"""Fine-tuning data (JSONL -> samples with answer-only labels; `trainer.finetune`) and LoRA adapters (`trainer.lora`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.trainer.collator import OpenFlamingoDataCollator
from openflamingo_hf.trainer.finetune import IGNORE_INDEX, build_finetune_dataset, load_finetune_examples
from openflamingo_hf.trainer.lora import (
    apply_lora,
    load_lora,
    lora_config_for,
    lora_module_names,
    lora_target_modules,
    merge_lora,
)

peft = pytest.importorskip("peft")
pytest.importorskip("datasets")

# PEFT asks the model `is_gradient_checkpointing`, which transformers 5 deprecates; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# ---------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def processor():
    return build_tiny_model_and_processor("llama")[1]


@pytest.fixture
def image_dir(tmp_path):
    for seed in range(3):
        make_image(seed).save(tmp_path / f"{seed}.png")
    return tmp_path


def write_jsonl(folder, rows, name="data.jsonl"):
    """Writes rows (dicts, or raw strings written as they are) one per line."""
    path = folder / name
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def tok(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(processor, pieces):
    """
    input_ids and labels from (kind, text) pieces: kind 'image', 'prompt' (no loss), 'answer' (loss) or 'eoc'
    (`<|endofchunk|>`; with loss unless its text is "prompt").
    """
    ids, labels = [], []
    for kind, text in pieces:
        if kind == "image":
            piece, loss = [processor.image_token_id], False
        elif kind == "eoc":
            piece, loss = [processor.eoc_token_id], text != "prompt"
        else:
            piece, loss = tok(processor, text), kind == "answer"
        ids += piece
        labels += piece if loss else [IGNORE_INDEX] * len(piece)
    return ids, labels


def check_sample(sample, ids, labels, num_images):
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert sample["attention_mask"].tolist() == [1] * len(ids)
    if num_images:
        assert tuple(sample["pixel_values"].shape[:3]) == (num_images, 1, 3)
    else:
        assert sample["pixel_values"] is None


# ----------------------------------------------------------------------------------------------- labels per shape


def test_prompt_answer_labels_cover_answer_and_eoc_only(processor, image_dir):
    path = write_jsonl(
        image_dir, [{"images": ["0.png"], "prompt": "<image>Question: What is it? Short answer:", "answer": "a cat"}]
    )
    sample = build_finetune_dataset(path, processor)[0]
    ids, labels = expected(
        processor,
        [("image", ""), ("prompt", "Question: What is it? Short answer:"), ("answer", "a cat"), ("eoc", "")],
    )
    check_sample(sample, ids, labels, num_images=1)
    expected_pixels = processor(images=[make_image(0)], text="<image>", return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(sample["pixel_values"], expected_pixels)


def test_prompt_answer_with_in_prompt_demonstration_and_single_image_key(processor, image_dir):
    rows = [
        {
            "images": ["0.png", "1.png"],
            "prompt": "<image>Output:a cat<|endofchunk|><image>Output:",
            "answer": "a dog",
        },
        {"image": "2.png", "prompt": "Output:", "answer": "red"},  # no marker: the image goes in front
    ]
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    ids, labels = expected(
        processor,
        [
            ("image", ""), ("prompt", "Output:a cat"), ("eoc", "prompt"),  # the demonstration: no loss
            ("image", ""), ("prompt", "Output:"), ("answer", "a dog"), ("eoc", ""),
        ],
    )  # fmt: skip
    check_sample(dataset[0], ids, labels, num_images=2)

    ids, labels = expected(processor, [("image", ""), ("prompt", "Output:"), ("answer", "red"), ("eoc", "")])
    check_sample(dataset[1], ids, labels, num_images=1)


def test_caption_labels_with_and_without_prompt(processor, image_dir):
    rows = [{"image": "0.png", "caption": "a dog", "prompt": "Output:"}, {"image": "1.png", "caption": "a dog"}]
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    ids, labels = expected(processor, [("image", ""), ("prompt", "Output:"), ("answer", "a dog"), ("eoc", "")])
    check_sample(dataset[0], ids, labels, num_images=1)
    ids, labels = expected(processor, [("image", ""), ("answer", "a dog"), ("eoc", "")])
    check_sample(dataset[1], ids, labels, num_images=1)


def test_chat_labels_cover_every_assistant_turn(processor, image_dir):
    turn = [{"type": "image"}, {"type": "text", "text": "Output:"}]
    rows = [
        {
            "images": ["0.png", "1.png"],
            "messages": [
                {"role": "system", "content": "Describe."},
                {"role": "user", "content": turn},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": turn},
                {"role": "assistant", "content": [{"type": "text", "text": "a dog"}]},
            ],
        },
        {  # image blocks that name their own files
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": "2.png"}, {"type": "text", "text": "Output:"}]},
                {"role": "assistant", "content": "red"},
            ]
        },
    ]
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    ids, labels = expected(
        processor,
        [
            ("prompt", "Describe."),
            ("image", ""), ("prompt", "Output:"), ("answer", "a cat"), ("eoc", ""),
            ("image", ""), ("prompt", "Output:"), ("answer", "a dog"), ("eoc", ""),
        ],
    )  # fmt: skip
    check_sample(dataset[0], ids, labels, num_images=2)
    ids, labels = expected(processor, [("image", ""), ("prompt", "Output:"), ("answer", "red"), ("eoc", "")])
    check_sample(dataset[1], ids, labels, num_images=1)
    expected_pixels = processor(images=[make_image(2)], text="<image>", return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(dataset[1]["pixel_values"], expected_pixels)


def test_token_straddling_prompt_and_answer_counts_as_answer(processor):
    # "Output: " + "a cat": the byte-level token " a" spans the prompt's trailing space and the answer's "a".
    sample = build_finetune_dataset([{"prompt": "Output: ", "answer": "a cat"}], processor)[0]
    ids = sample["input_ids"].tolist()
    assert ids == tok(processor, "Output: a cat") + [processor.eoc_token_id]
    num_prompt_only = len(tok(processor, "Output:"))
    assert sample["labels"].tolist() == [IGNORE_INDEX] * num_prompt_only + ids[num_prompt_only:]
    assert sample["pixel_values"] is None  # a text-only example


def test_in_memory_examples_and_collator(processor, image_dir, monkeypatch):
    monkeypatch.chdir(image_dir)  # relative paths of in-memory examples are relative to the working directory
    examples = [
        {"images": ["0.png"], "prompt": "<image>Output:", "answer": "a cat"},
        {"image": "1.png", "caption": "a dog"},
        {"prompt": "Question: Hi? Short answer:", "answer": "yes"},
    ]
    dataset = build_finetune_dataset(examples, processor)
    batch = OpenFlamingoDataCollator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["pixel_values"].shape[:3] == (3, 1, 1)
    padding = batch["attention_mask"] == 0
    assert bool(padding.any()) and bool((batch["labels"][padding] == IGNORE_INDEX).all())
    # A loaded file gives the same samples (paths resolved against the file's folder).
    loaded = build_finetune_dataset(load_finetune_examples(write_jsonl(image_dir, examples)), processor)
    for index in range(3):
        assert loaded[index]["labels"].tolist() == dataset[index]["labels"].tolist()


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("row", "line_text", "field"),
    [
        ("{not json", "line 2", None),
        ('["a list"]', "line 2", None),
        ({"images": ["0.png"], "prompt": "<image>Q:"}, "line 2", "'answer'"),
        ({"images": "0.png", "prompt": "<image>Q:", "answer": "a"}, "line 2", "'images'"),
        ({"images": ["missing.png"], "prompt": "<image>Q:", "answer": "a"}, "line 2", "'images[0]'"),
        ({"images": ["0.png"], "prompt": "<image>Q:", "answer": 3}, "line 2", "'answer'"),
        ({"caption": "a cat"}, "line 2", "'image'"),
        ({"image": "0.png", "caption": ""}, "line 2", "'caption'"),
        ({"images": ["0.png"], "messages": [{"role": "bot", "content": "x"}]}, "line 2", "'messages[0].role'"),
        ({"images": ["0.png"], "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "line 2", "'messages'"),
        (
            {
                "images": [],
                "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}],
            },
            "line 2",
            "'images'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]},
            "line 2",
            "'messages[0].content[0]'",
        ),
        ({"image": "0.png", "caption": "a", "messages": []}, "line 2", "'caption'"),
        ({"text": "a cat"}, "line 2", None),
    ],
)
def test_malformed_line_names_file_line_and_field(processor, image_dir, row, line_text, field):
    path = write_jsonl(image_dir, [{"image": "0.png", "caption": "fine"}, row])
    with pytest.raises(ValueError) as info:
        build_finetune_dataset(path, processor)
    message = str(info.value)
    assert str(path) in message and line_text in message, message
    if field is not None:
        assert f"field {field}" in message, message


def test_prompt_markers_must_match_images(processor, image_dir):
    path = write_jsonl(image_dir, ["", {"images": ["0.png"], "prompt": "<image>a<image>b", "answer": "c"}])
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2, field 'prompt': has 2 `<image>` markers"):
        build_finetune_dataset(path, processor)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"image": "0.png", "caption": "<image>a cat"}, "caption"),
        ({"images": ["0.png"], "prompt": "<image>Q:", "answer": "a<image>"}, "answer"),
        (
            {"messages": [{"role": "user", "content": "<image>Q:"}, {"role": "assistant", "content": "a"}]},
            "messages[0].content",
        ),
        (
            {
                "images": ["0.png"],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>"}]},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "messages[0].content[1].text",
        ),
    ],
)
def test_markers_in_verbatim_text_are_refused(processor, image_dir, row, field):
    with pytest.raises(ValueError, match=rf"line 1, field '{re.escape(field)}': holds the image marker"):
        build_finetune_dataset(write_jsonl(image_dir, [row]), processor)


@pytest.mark.parametrize("token", ["<|endofchunk|>", "pad"])
def test_other_protocol_tokens_in_verbatim_text_are_refused(processor, image_dir, token):
    token = processor.tokenizer.pad_token if token == "pad" else token
    rows = [{"images": ["0.png"], "prompt": "<image>Q:", "answer": f"a{token} cat"}]
    with pytest.raises(ValueError, match=rf"line 1, field 'answer': holds the protocol token `{re.escape(token)}`"):
        build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    # In a prompt, `<|endofchunk|>` closes a demonstration: protocol text, accepted.
    rows = [{"images": ["0.png", "1.png"], "prompt": "<image>Q:a<|endofchunk|><image>Q:", "answer": "b"}]
    assert len(build_finetune_dataset(write_jsonl(image_dir, rows), processor)) == 1


def test_truncation_errors_name_the_line(processor, image_dir):
    rows = [
        {"image": "0.png", "caption": "fine"},
        {"images": ["0.png", "1.png"], "prompt": "<image>Output:a cat<|endofchunk|><image>Output:", "answer": "a dog"},
    ]
    path = write_jsonl(image_dir, rows)
    dataset = build_finetune_dataset(path, processor, max_length=4)
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: Truncation would cut sample 0"):
        dataset[1]
    # An image file that exists but does not decode: found when the example is encoded.
    (image_dir / "bad.png").write_bytes(b"not an image")
    rows.append({"image": "bad.png", "caption": "a cat"})
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    with pytest.raises(ValueError, match=r"data\.jsonl, line 3: Sample 0, image 0: .*bad\.png.* not a readable image"):
        dataset[2]
    # Truncation that keeps the markers but drops the whole answer: nothing to train on. (The first example is
    # encoded when the dataset is built, so this one fails at once.)
    example = {"images": [str(image_dir / "0.png")], "prompt": "<image>Question: What is it?", "answer": "a cat"}
    with pytest.raises(ValueError, match=r"<examples>, line 1: no answer token is left"):
        build_finetune_dataset([example], processor, max_length=4)


# -------------------------------------------------------------------------------------------------------------- LoRA


def _linear_names(module: nn.Module, prefix: str) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {
        f"{prefix}.{name}" for name, sub in module.named_modules() if isinstance(sub, (nn.Linear, Conv1D)) and name
    }


@pytest.mark.parametrize("family", ["llama", "opt"])  # opt's fc1 / fc2 share names with CLIP and the perceiver
@pytest.mark.parametrize(
    "targets",
    [
        ("language_model", "gated_cross_attn_layers"),
        ("language_model",),
        "gated_cross_attn_layers",
        ("gated_cross_attn_layers.1.ff",),
        ("language_model.model",),
    ],
)
def test_lora_never_touches_vision_tower_or_perceiver(family, targets):
    model, _ = build_tiny_model_and_processor(family)
    output_embeddings = model.language_model.get_output_embeddings()
    lm_head = next(f"language_model.{n}" for n, m in model.language_model.named_modules() if m is output_embeddings)
    chosen = (targets,) if isinstance(targets, str) else targets
    wanted = set()
    for target in chosen:
        wanted |= _linear_names(model.get_submodule(target), target)
    wanted.discard(lm_head)
    assert set(lora_target_modules(model, targets)) == wanted

    peft_model = apply_lora(model, targets=targets)
    adapted = set(lora_module_names(peft_model))
    assert adapted == wanted
    assert not any(name.startswith(("vision_model.", "perceiver.")) for name in adapted)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_lora_refuses_vision_side_targets_and_name_based_configs():
    model, _ = build_tiny_model_and_processor("opt")
    for target in ("vision_model", "perceiver", "perceiver.layers.0", "lm_head"):
        with pytest.raises(ValueError, match="LoRA"):
            lora_target_modules(model, target)
    with pytest.raises(ValueError, match="not a module"):
        lora_target_modules(model, "gated_cross_attn_layers.7")
    with pytest.raises(TypeError, match="targets"):
        lora_config_for(model, target_modules=["fc1"])
    # A config matching by short names catches CLIP's and the perceiver's fc1 / to_q too: refused.
    naive = peft.LoraConfig(r=2, target_modules=["fc1", "to_q"])
    with pytest.raises(ValueError, match="vision side stays frozen"):
        apply_lora(model, config=naive)


def _training_batch(processor, image_dir):
    rows = [
        {"images": ["0.png"], "prompt": "<image>Question: What is it? Short answer:", "answer": "a cat"},
        {"image": "1.png", "caption": "a dog", "prompt": "Output:"},
        {
            "images": ["0.png", "2.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Output:"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Output:"}]},
                {"role": "assistant", "content": "red"},
            ],
        },
    ]
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows), processor)
    collator = OpenFlamingoDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    return collator([dataset[i] for i in range(len(dataset))])


def test_lora_training_save_load_merge_generate(image_dir, tmp_path):
    model, processor = build_tiny_model_and_processor("llama")
    batch = _training_batch(processor, image_dir)
    prompt = processor(images=[make_image(0)], text="<image>Output:", return_tensors="pt")
    base_generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    peft_model = apply_lora(model, r=4, alpha=8)
    # A fresh adapter (B = 0) changes nothing, and generate takes OpenFlamingo's arguments (pixel_values included).
    assert torch.equal(peft_model.generate(**prompt, max_new_tokens=4, do_sample=False), base_generated)
    lora_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_B." in n}
    assert lora_b and all(not bool(p.any()) for p in lora_b.values())

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    assert losses[-1] < losses[0]

    after = {}
    for name, p in peft_model.get_base_model().named_parameters():
        if ".lora_" not in name:
            after[name.replace(".base_layer.", ".")] = p
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"
    for name, value in peft_model.named_parameters():
        if name in lora_b:
            assert not torch.equal(value, lora_b[name]), f"{name} did not train"

    with torch.no_grad():
        adapter_logits = peft_model(**batch).logits
    adapter_generated = peft_model.generate(**prompt, max_new_tokens=4, do_sample=False)

    # Save / reload onto a fresh base model: identical logits.
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = build_tiny_model_and_processor("llama")
    reloaded = load_lora(fresh, tmp_path / "adapter")
    assert isinstance(reloaded, peft.PeftModel)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, adapter_logits)
    fresh2, _ = build_tiny_model_and_processor("llama")
    plain = peft.PeftModel.from_pretrained(fresh2, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, adapter_logits)

    # Merge: a plain OpenFlamingo model with the same logits and generations.
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "OpenFlamingoForConditionalGeneration"
    assert not lora_module_names(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    merged_generated = merged.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(merged_generated, adapter_generated)
    assert torch.equal(reloaded.generate(**prompt, max_new_tokens=4, do_sample=False), adapter_generated)


def test_merge_lora_needs_a_peft_model():
    model, _ = build_tiny_model_and_processor("llama")
    with pytest.raises(TypeError, match="PeftModel"):
        merge_lora(model)


def test_lora_with_transformers_trainer(image_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = build_tiny_model_and_processor("llama")
    rows = [{"images": ["0.png"], "prompt": "<image>Output:", "answer": "a cat"}, {"image": "1.png", "caption": "a"}]
    dataset = build_finetune_dataset(write_jsonl(image_dir, rows * 2), processor)
    peft_model = apply_lora(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        remove_unused_columns=False,  # the stored columns are the transform's input, not the model's
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = OpenFlamingoDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    result = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collator).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(bool(p.any()) for n, p in peft_model.named_parameters() if ".lora_B." in n)
