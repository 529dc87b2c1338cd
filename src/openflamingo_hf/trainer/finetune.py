"""
Fine-tuning data for OpenFlamingo (LoRA adapters: `openflamingo_hf.trainer.lora`).

`build_finetune_dataset(path_or_examples, processor)` reads a JSONL file (one JSON object per line; blank lines are
skipped) into a map-style `datasets.Dataset` whose items are training samples for `OpenFlamingoDataCollator`:

- `input_ids`, `attention_mask`, `labels`: `(seq_len,)` long tensors; `labels` is `IGNORE_INDEX` everywhere
  except on the answer tokens and the `<|endofchunk|>` that closes each answer;
- `pixel_values`: `(num_images, 1, 3, H, W)` float tensor, or `None` for an example without images.

Every example goes through one code path: `processor.finetune_sample` encodes its chat messages (or its prompt and
answer) with `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`. The processor's chat template
writes an image block as `<image>`, text verbatim, and closes every assistant turn with `<|endofchunk|>`; the
assistant turns are what carries loss. Three shapes are accepted (other keys, e.g. ids, are ignored):

1. **Prompt + answer** (VQA, instructions)::

       {"images": ["a.jpg"], "prompt": "<image>Question: What is it? Short answer:", "answer": "a cat"}

   The text is `prompt + answer + <|endofchunk|>`; loss on `answer<|endofchunk|>` only. The prompt holds one
   `<image>` per image, in order (a prompt without markers gets them all in front, as the processor does), and may
   hold few-shot demonstrations (`<image>Question: ... Short answer:yes<|endofchunk|><image>...`), which carry no
   loss. `"image": "a.jpg"` may stand for `"images": ["a.jpg"]`. The answer is raw text: it may not hold protocol
   tokens (`<image>`, `<|endofchunk|>`, the pad token).

2. **Chat messages** (several turns, few-shot demonstrations as earlier turns)::

       {"images": ["a.jpg", "b.jpg"],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Output:"}]},
                     {"role": "assistant", "content": "a cat"},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Output:"}]},
                     {"role": "assistant", "content": "a dog"}]}

   Roles are `user`, `assistant` and `system` (written like `user`); content is a string or a list of
   `{"type": "image"}` / `{"type": "text", "text": ...}` blocks (raw text: no protocol tokens). Loss on every
   assistant turn and its `<|endofchunk|>`. The `{"type": "image"}` blocks take the `images` in order; instead of the
   `images` list, every image block may name its own file (`{"type": "image", "path": "a.jpg"}`, or `"url"`). Images
   go in user / system turns only.

3. **Captioning**::

       {"image": "a.jpg", "caption": "a cat", "prompt": "Output:"}

   The text is `<image>` + `prompt` (optional, default empty) + `caption` + `<|endofchunk|>`; loss on
   `caption<|endofchunk|>`. Prompt and caption are raw text (no protocol tokens).

Image paths are relative to the JSONL file's folder (absolute paths, `http(s)://` URLs and `data:image/...` base64
data are used as they are); local files must exist when the file is loaded. Malformed lines raise a `ValueError`
that names the file, the line and the field.

Tokenization is lazy (`datasets.Dataset.with_transform`): the dataset stores each example as JSON text and encodes
it (reads its images, runs the processor) when an item is accessed. Images are never held in memory or on disk as
pixel arrays (a 224 px image is 600 KB of float32), preprocessing runs in the `DataLoader` workers, and the dataset
builds at once. The structure of every line (fields, image files, `<image>` markers against images) is checked up
front, and the first example is encoded as a smoke test; what needs an example's images or tokens (truncation,
unreadable image files) is checked when it is encoded, and raises naming the file and line. Use
`TrainingArguments(remove_unused_columns=False)`: the stored columns are not model inputs, the transform makes them.

Token boundaries: a token that straddles the end of the prompt and the start of the answer (e.g. `" a"` in
`"Output: " + "a cat"`) counts as an answer token, so that no answer character is without loss. Write prompts
without a trailing space (`"Output:"`, `"Short answer:"`) and the boundary falls between tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..processing.processing_openflamingo import IGNORE_INDEX

_ROLES = ("system", "user", "assistant")
_IMAGE_SOURCE_KEYS = ("path", "url", "image")
# Keys that select the shape of an example.
_SHAPE_KEYS = ("messages", "caption", "prompt", "answer")
# Keys of a checked example that the encoding reads.
_STORED_KEYS = ("messages", "images", "image", "caption", "prompt", "answer", "source", "line")


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking examples
# ----------------------------------------------------------------------------------------------------------------


class _Where:
    """Location of an example, for error messages: `file.jsonl, line 3`."""

    def __init__(self, source: str, line: int):
        self.source, self.line = source, line

    def __str__(self) -> str:
        return f"{self.source}, line {self.line}"

    def error(self, field: str | None, message: str) -> ValueError:
        at = f", field {field!r}" if field else ""
        return ValueError(f"{self}{at}: {message}")


def load_finetune_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """
    Reads and checks a fine-tuning JSONL file (shapes: see the module docstring).

    Each returned example is the line's JSON object with its image sources resolved (relative paths joined to the
    JSONL's folder) and two keys added: `"source"` (the file's path) and `"line"` (1-based line number), which
    later error messages name. Blank lines are skipped.

    Raises:
        `FileNotFoundError` if the file does not exist; `ValueError` naming the file, the line and the field for
        invalid JSON, an unknown or ambiguous shape, a missing / mistyped field, or a missing image file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No fine-tuning JSONL file at {path!r}.")
    base_dir = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = _Where(path, line_number)
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise where.error(None, f"not valid JSON ({error.msg} at column {error.colno}).") from None
            examples.append(_check_example(example, where, base_dir))
    if not examples:
        raise ValueError(f"{path}: the file has no examples (one JSON object per line).")
    return examples


def _check_example(example: Any, where: _Where, base_dir: str | None) -> dict[str, Any]:
    """Checks one example's structure, resolves its image sources; returns a copy with `source` / `line`."""
    if not isinstance(example, Mapping):
        raise where.error(None, f"an example must be a JSON object, got {type(example).__name__}.")
    example = dict(example)
    shape = _shape_of(example, where)
    if shape == "messages":
        _check_messages(example, where, base_dir)
    elif shape == "caption":
        _check_string(example, "caption", where)
        if "prompt" in example:
            _check_string(example, "prompt", where, allow_empty=True)
        if "images" in example:
            raise where.error("images", "a captioning example has one image, given as \"image\": \"path\".")
        example["image"] = _resolve_image(example.get("image"), "image", where, base_dir)
    else:
        _check_string(example, "prompt", where, allow_empty=True)
        _check_string(example, "answer", where)
        example["images"] = _resolve_image_list(example, where, base_dir)
        example.pop("image", None)
    example["source"], example["line"] = where.source, where.line
    return example


def _shape_of(example: dict[str, Any], where: _Where) -> str:
    present = [key for key in _SHAPE_KEYS if key in example]
    if "messages" in present:
        others = [key for key in present if key != "messages"]
        if others:
            raise where.error(
                others[0], f"an example with \"messages\" cannot also have {others}: use one shape per example."
            )
        return "messages"
    if "caption" in present:
        if "answer" in present:
            raise where.error("answer", "an example has either \"caption\" or \"answer\", not both.")
        return "caption"
    if "prompt" in present or "answer" in present:
        for key in ("prompt", "answer"):
            if key not in example:
                raise where.error(key, "missing: a prompt/answer example needs both \"prompt\" and \"answer\".")
        return "prompt_answer"
    raise where.error(
        None,
        f"unknown example shape (keys {sorted(example)}). Use {{\"images\", \"prompt\", \"answer\"}}, "
        "{\"images\", \"messages\"} or {\"image\", \"caption\"}.",
    )


def _check_string(example: dict[str, Any], key: str, where: _Where, allow_empty: bool = False) -> None:
    value = example.get(key)
    if not isinstance(value, str):
        raise where.error(key, f"must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise where.error(key, "is empty: there is nothing to train on.")


def _is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "data:image/"))


def _resolve_image(source: Any, field: str, where: _Where, base_dir: str | None) -> str:
    """An image source as the processor reads it: a checked local path (joined to `base_dir`), URL or data URL."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise where.error(field, f"must be an image path or URL (a non-empty string), got {source!r}.")
    if _is_remote(source):
        return source
    path = source if base_dir is None or os.path.isabs(source) else os.path.join(base_dir, source)
    if not os.path.isfile(path):
        shown = f"{source!r}" if path == source else f"{source!r} (looked for {path!r})"
        relative = " relative to the JSONL file's folder" if base_dir is not None else ""
        raise where.error(field, f"no image file {shown}. Image paths are{relative or ' used as given'}.")
    return path


def _resolve_image_list(example: dict[str, Any], where: _Where, base_dir: str | None) -> list[str]:
    if "images" in example and "image" in example:
        raise where.error("image", "give either \"image\" (one path) or \"images\" (a list), not both.")
    if "image" in example:
        return [_resolve_image(example["image"], "image", where, base_dir)]
    images = example.get("images", [])
    if not isinstance(images, list):
        raise where.error("images", f"must be a list of image paths, got {type(images).__name__}.")
    return [_resolve_image(source, f"images[{i}]", where, base_dir) for i, source in enumerate(images)]


def _check_messages(example: dict[str, Any], where: _Where, base_dir: str | None) -> None:
    """Checks roles and content blocks; moves inline image sources into `images`; copies the messages."""
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise where.error("messages", "must be a non-empty list of {\"role\", \"content\"} objects.")
    checked, inline_images, num_image_blocks, has_answer = [], [], 0, False
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise where.error(field, f"must be an object with \"role\" and \"content\", got {type(message).__name__}.")
        role = message.get("role")
        if role not in _ROLES:
            raise where.error(f"{field}.role", f"must be one of {list(_ROLES)}, got {role!r}.")
        content = message.get("content")
        if isinstance(content, str):
            checked.append({"role": role, "content": content})
            has_answer |= role == "assistant" and bool(content.strip())
            continue
        if not isinstance(content, list):
            raise where.error(
                f"{field}.content", f"must be a string or a list of content blocks, got {type(content).__name__}."
            )
        blocks = []
        for block_index, block in enumerate(content):
            block_field = f"{field}.content[{block_index}]"
            block_type = block.get("type") if isinstance(block, Mapping) else None
            if block_type == "text":
                if not isinstance(block.get("text"), str):
                    raise where.error(f"{block_field}.text", "a text block needs a string \"text\".")
                blocks.append({"type": "text", "text": block["text"]})
                has_answer |= role == "assistant" and bool(block["text"].strip())
            elif block_type == "image":
                if role == "assistant":
                    raise where.error(block_field, "images go in user turns; an assistant turn is text only.")
                sources = [key for key in _IMAGE_SOURCE_KEYS if key in block]
                if len(sources) > 1:
                    raise where.error(block_field, f"an image block names one source, got {sources}.")
                if sources:
                    inline_images.append(
                        _resolve_image(block[sources[0]], f"{block_field}.{sources[0]}", where, base_dir)
                    )
                num_image_blocks += 1
                blocks.append({"type": "image"})
            else:
                raise where.error(
                    block_field,
                    'a content block is {"type": "text", "text": ...} or {"type": "image"}, got ' f"{block!r}.",
                )
        checked.append({"role": role, "content": blocks})
    if not has_answer:
        raise where.error("messages", "no non-empty assistant turn: there is nothing to train on.")

    if inline_images:
        if len(inline_images) != num_image_blocks:
            raise where.error(
                "messages", f"{len(inline_images)} of {num_image_blocks} image blocks name a file: either every image "
                "block names its file, or none does and \"images\" lists them."
            )
        if "images" in example or "image" in example:
            raise where.error("images", "the image blocks already name their files; drop \"images\".")
        images = inline_images
    else:
        images = _resolve_image_list(example, where, base_dir)
        example.pop("image", None)
    if len(images) != num_image_blocks:
        raise where.error(
            "images", f"{len(images)} images for {num_image_blocks} {{\"type\": \"image\"}} blocks in \"messages\": "
            "give one image per image block, in order."
        )
    example["messages"], example["images"] = checked, images


# ----------------------------------------------------------------------------------------------------------------
# Examples -> chat messages -> samples
# ----------------------------------------------------------------------------------------------------------------


def example_to_messages(example: Mapping[str, Any], processor) -> tuple[list[dict[str, Any]], list[str]]:
    """
    The chat messages and image sources of a checked example (any shape, see the module docstring), as
    `processor.apply_chat_template` takes them. Prompt-answer and captioning examples become one user turn and one
    assistant turn (`processor.prompt_messages`).

    Raises:
        `ValueError` naming the example's file, line and field if the prompt's `<image>` markers do not match its
        images, or if a raw text holds a protocol token.
    """
    where = _Where(example.get("source", "<examples>"), example.get("line", 0))
    _check_raw_texts(example, processor, where)
    prompt, answer, images = _prompt_and_answer(example)
    if prompt is None:
        return [dict(message) for message in example["messages"]], images
    return processor.prompt_messages(prompt, answer, len(images), where=f"{where}, field 'prompt':"), images


def _prompt_and_answer(example: Mapping[str, Any]) -> tuple[str | None, str | None, list[str]]:
    """(prompt, answer, images) of a prompt-answer or captioning example; (None, None, images) for messages."""
    if "messages" in example:
        return None, None, list(example["images"])
    if "caption" in example:
        # A captioning prompt holds no marker (checked), so its one image goes in front.
        return example.get("prompt", ""), example["caption"], [example["image"]]
    return example["prompt"], example["answer"], list(example["images"])


def _check_raw_texts(example: Mapping[str, Any], processor, where: _Where) -> None:
    """Refuses protocol tokens written in the example's raw texts (see the processor's docstring)."""
    for field, text in _free_texts(example):
        for token in processor.protocol_tokens_in(text):
            if token == processor.image_token:
                problem = (
                    f"holds the image marker `{token}`, which only a prompt or a {{\"type\": \"image\"}} block may "
                    "place."
                )
            else:
                problem = f"holds the protocol token `{token}`, which raw text may not contain: remove it."
            raise where.error(field, problem)


def _free_texts(example: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(field, text) of the texts that are written verbatim and may not place images."""
    if "messages" in example:
        for index, message in enumerate(example["messages"]):
            content = message["content"]
            if isinstance(content, str):
                yield f"messages[{index}].content", content
                continue
            for block_index, block in enumerate(content):
                if block.get("type") == "text":
                    yield f"messages[{index}].content[{block_index}].text", block["text"]
    elif "caption" in example:
        yield from ((key, example[key]) for key in ("caption", "prompt") if key in example)
    else:
        yield "answer", example["answer"]


def _with_location(error: Exception, where: _Where) -> Exception:
    """The same kind of error, its message prefixed with the example's file and line."""
    message = f"{where}: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception type whose constructor takes other arguments
        return ValueError(message)


def encode_finetune_example(
    example: Mapping[str, Any], processor, max_length: int | None = 512
) -> dict[str, torch.Tensor | None]:
    """
    Encodes one checked example into a training sample (`processor.finetune_sample`): `input_ids`, `attention_mask`,
    `labels` (`(seq_len,)`; `IGNORE_INDEX` except on assistant tokens) and `pixel_values` (`(num_images, 1, 3, H,
    W)`, `None` without images).

    Args:
        example: an example as `load_finetune_examples` returns it.
        processor: the model's `OpenFlamingoProcessor`.
        max_length: truncate longer texts to this many tokens (`None`: never truncate). Truncation that would cut an
            `<image>` marker, or leave no answer token, is an error.
    """
    where = _Where(example.get("source", "<examples>"), example.get("line", 0))
    # One processor call per example; its raw texts and markers were checked when the dataset was built.
    prompt, answer, images = _prompt_and_answer(example)
    messages = None if prompt is not None else [dict(message) for message in example["messages"]]
    try:
        sample = processor.finetune_sample(messages, images, max_length, prompt=prompt, answer=answer)
    except (ValueError, TypeError, OSError) as error:
        raise _with_location(error, where) from error
    return dict(sample)


class FinetuneTransform:
    """
    The `datasets` transform of `build_finetune_dataset`: decodes the stored JSON examples of a batch and encodes
    them with `encode_finetune_example`. A picklable class (not a closure), so that `DataLoader` workers can use it.
    """

    def __init__(self, processor, max_length: int | None = 512):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        samples = [
            encode_finetune_example(json.loads(text), self.processor, self.max_length) for text in batch["example"]
        ]
        keys = ("input_ids", "attention_mask", "labels", "pixel_values")
        return {key: [sample[key] for sample in samples] for key in keys}


def build_finetune_dataset(
    path_or_examples: str | os.PathLike | Iterable[Mapping[str, Any]],
    processor,
    max_length: int | None = 512,
):
    """
    A map-style `datasets.Dataset` of fine-tuning samples (see the module docstring for the JSONL shapes).

    Args:
        path_or_examples: a JSONL file, or examples (dicts in the same shapes; relative image paths are relative to
            the working directory, or as `load_finetune_examples` resolved them).
        processor: the model's `OpenFlamingoProcessor`.
        max_length: truncate longer texts to this many tokens (`None`: never truncate).

    Returns:
        `datasets.Dataset` with stored columns `example` (JSON text), `source` and `line`, and a transform that
        makes each item `{"input_ids", "attention_mask", "labels", "pixel_values"}` (tensors; `pixel_values` is
        `None` for an example without images). Batch it with `OpenFlamingoDataCollator` (its `pad_token_id`: the
        pad id of the processor's tokenizer); with `transformers.Trainer` use `remove_unused_columns=False`.
    """
    import datasets

    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = load_finetune_examples(path_or_examples)
    else:
        examples = []
        for index, example in enumerate(path_or_examples):
            if isinstance(example, Mapping) and "source" in example and "line" in example:
                where = _Where(example["source"], example["line"])
                already_resolved = True
            else:
                where, already_resolved = _Where("<examples>", index + 1), False
            examples.append(_check_example(example, where, None if already_resolved else os.getcwd()))
        if not examples:
            raise ValueError("`path_or_examples` holds no examples.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"`max_length` must be a positive number of tokens or None, got {max_length!r}.")
    # Marker / image mismatches are found now, before training, not when the item is first read; so are setup
    # problems (e.g. a slow tokenizer, which cannot mark assistant tokens), by encoding the first example.
    for example in examples:
        example_to_messages(example, processor)
    encode_finetune_example(examples[0], processor, max_length)

    stored = {
        # Only the fields the encoding reads (other keys, e.g. ids, need not be JSON-serializable).
        "example": [
            json.dumps({key: example[key] for key in _STORED_KEYS if key in example}, ensure_ascii=False)
            for example in examples
        ],
        "source": [example["source"] for example in examples],
        "line": [example["line"] for example in examples],
    }
    dataset = datasets.Dataset.from_dict(stored)
    return dataset.with_transform(FinetuneTransform(processor, max_length))


__all__ = [
    "FinetuneTransform",
    "IGNORE_INDEX",
    "build_finetune_dataset",
    "encode_finetune_example",
    "example_to_messages",
    "load_finetune_examples",
]
