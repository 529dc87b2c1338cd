"""TRL's `SFTTrainer` and `DPOTrainer` train the embedded OpenFlamingo from an images + messages dataset (issue 18).

TRL computes the loss of vision-language models through a fused LM head: `model.base_model(...)` (the headless
`OpenFlamingoModel`) for the final hidden states, then `model.get_output_embeddings()` in tiles. A few CPU steps on
the embedded world: the loss falls, and the saved model reloads with the Auto classes and generates what the
trained model generates.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import openflamingo_hf  # noqa: E402, F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoForConditionalGeneration, OpenFlamingoModel  # noqa: E402
from openflamingo_hf.embedded import EMBEDDED_MODEL_DIR, make_examples  # noqa: E402

# A colour swap that turns a true caption into a wrong one (the rejected answer of a preference pair).
OTHER_COLOR = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}
SEED = 2_000_000  # training seeds of the world, away from the held-out ones


@pytest.fixture(scope="module")
def examples():
    return make_examples(8, seed=SEED)


def _user_turn(text: str = "") -> dict:
    return {"role": "user", "content": [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])}


def _assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _common_args(output_dir, **overrides) -> dict:
    """A few deterministic fp32 CPU steps, nothing written before `save_model`."""
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, dataloader_num_workers=0, max_length=None, seed=0, disable_tqdm=True, **overrides,
    )


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _greedy_answer(model, processor, image, prompt: str) -> torch.Tensor:
    inputs = processor(images=[[image]], text=[f"<image>{prompt}"], return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=8, do_sample=False)


def _check_reload(trainer, processor, output_dir, example, prompt):
    """The saved folder loads with the Auto classes, holds the trained weights and generates what the trained model
    generates (stopping at <|endofchunk|>, as the shipped model does); the headless model loads from it too."""
    trainer.save_model(str(output_dir))
    trained = trainer.model.eval()
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    reloaded_processor = AutoProcessor.from_pretrained(output_dir)
    assert type(reloaded) is OpenFlamingoForConditionalGeneration
    trained_state = trained.state_dict()
    assert all(torch.equal(trained_state[k], v) for k, v in reloaded.state_dict().items())
    # (TRL adds the tokenizer's eos token to the stop tokens; <|endofchunk|> stays one.)
    eos = reloaded.generation_config.eos_token_id
    assert processor.eoc_token_id in (eos if isinstance(eos, list) else [eos])
    generated = _greedy_answer(reloaded, reloaded_processor, example.image, prompt)
    assert generated.shape[1] > 0
    assert torch.equal(generated, _greedy_answer(trained, processor, example.image, prompt))
    assert type(AutoModel.from_pretrained(output_dir)) is OpenFlamingoModel


def test_sft_trainer_trains_the_embedded_model_from_images_and_messages(examples, tmp_path):
    """A format the embedded model was never trained on ("Colour:" -> "<colour> <shape>"), learnt with TRL's
    defaults for gradient checkpointing (on) and its fused LM head."""
    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    rows = [
        {"images": [e.image], "messages": [_user_turn("Colour:"), _assistant_turn(f"{e.color} {e.shape}")]}
        for e in examples
    ]
    args = trl.SFTConfig(**_common_args(tmp_path / "run", max_steps=8, learning_rate=1e-3))
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor
    )
    assert isinstance(trainer.model.base_model, OpenFlamingoModel)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    _check_reload(trainer, processor, tmp_path / "saved", examples[0], "Colour:")


def test_dpo_trainer_trains_the_embedded_model_from_image_preference_pairs(examples, tmp_path):
    """Preference pairs: the true caption over the same caption with another colour. The policy starts as the
    reference (loss log 2); a few steps move the implicit reward towards the chosen answers."""
    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED_MODEL_DIR)
    # TRL builds the reference model itself only for classes it can name from the config (transformers' own, or
    # remote code with an `auto_map`); for a model registered in-process it is passed in.
    reference = AutoModelForImageTextToText.from_pretrained(EMBEDDED_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    rows = [
        {
            "images": [e.image],
            "prompt": [_user_turn()],  # the embedded model's caption prompt: the image alone
            "chosen": [_assistant_turn(e.caption)],
            "rejected": [_assistant_turn(e.caption.replace(e.color, OTHER_COLOR[e.color]))],
        }
        for e in examples
    ]
    args = trl.DPOConfig(**_common_args(tmp_path / "run", max_steps=8, learning_rate=2e-4, beta=0.5))
    trainer = trl.DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
    )
    trainer.train()
    losses = _losses(trainer)
    accuracies = [entry["rewards/accuracies"] for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert sum(losses[-3:]) / 3 < losses[0] - 0.03, losses
    assert accuracies[-1] >= 0.75, accuracies
    _check_reload(trainer, processor, tmp_path / "saved", examples[0], "")
