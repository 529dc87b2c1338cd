"""Classification by ranking: the log-likelihood of each class name after a shared prompt (ImageNet, Hateful Memes)."""

from __future__ import annotations

import copy

import torch


@torch.no_grad()
def rank_class_names(
    model,
    processor,
    images: list[list],
    prompts: list[str],
    class_names: list[str],
    normalize_length: bool = True,
    use_cache: bool = True,
) -> torch.Tensor:
    """
    Scores every class name as the continuation of every prompt, as the original's `get_rank_classifications`:
    the log-probabilities of the name's tokens (tokenized alone, no special tokens) after the prompt, averaged over
    the tokens (`normalize_length`) or summed.

    With `use_cache` the prompt and its images are encoded once per batch (the LM cache and the gated blocks'
    image keys/values), and each class name is scored from that state: a class costs a forward of its own tokens
    only. Without it every (prompt, class) pair is recomputed from scratch (the reference the cached path equals).

    Args:
        images: one list of images per prompt.
        prompts: (batch,) evaluation prompts ending where the class name goes (e.g. "...<image>Output:").
        class_names: (num_classes,) names to score.
    Returns:
        (batch, num_classes) float32 scores; higher is more likely.
    """
    inputs = processor(images=images, text=prompts, return_tensors="pt").to(model.device)
    name_ids = [processor.tokenizer(name, add_special_tokens=False)["input_ids"] for name in class_names]
    for name, ids in zip(class_names, name_ids):
        if not ids:
            raise ValueError(f"Class name {name!r} has no tokens; remove it or give it a name.")
    if not use_cache:
        scores = [_score_without_cache(model, inputs, ids, normalize_length) for ids in name_ids]
        return torch.stack(scores, dim=1)

    prefix = model(**inputs, use_cache=True)
    last_logits = prefix.logits[:, -1:].float()
    prefix_length = inputs["input_ids"].shape[1]
    scores = []
    for ids in name_ids:
        cache = _cache_at_prefix(prefix.cache, prefix_length)
        tokens = torch.tensor([ids] * len(prompts), device=model.device)
        continuation = model(
            input_ids=tokens,
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1),
            cache=cache,
            use_cache=True,
            media_cache=prefix.media_cache,
            media_index=_continuation_media_index(model, inputs["input_ids"], tokens),
        )
        # Logit t predicts token t + 1: the prompt's last logit predicts the name's first token.
        logits = torch.cat([last_logits, continuation.logits[:, :-1].float()], dim=1)
        scores.append(_aggregate(logits, tokens, normalize_length))
    return torch.stack(scores, dim=1)


def _score_without_cache(model, inputs, ids: list[int], normalize_length: bool) -> torch.Tensor:
    batch = inputs["input_ids"].shape[0]
    tokens = torch.tensor([ids] * batch, device=model.device)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    logits = model(**full, use_cache=False).logits[:, -len(ids) - 1 : -1].float()
    return _aggregate(logits, tokens, normalize_length)


def _aggregate(logits: torch.Tensor, tokens: torch.Tensor, normalize_length: bool) -> torch.Tensor:
    """(batch, n, vocab) logits predicting (batch, n) tokens -> (batch,) mean or summed log-probability."""
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    return log_probs.mean(dim=1) if normalize_length else log_probs.sum(dim=1)


def _continuation_media_index(model, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The image each appended token attends to: the same as the prompt's last token (names hold no <image>)."""
    return model.get_media_index(torch.cat([prompt_ids, tokens], dim=1))[:, -tokens.shape[1] :]


def _cache_at_prefix(cache, prefix_length: int):
    """The prompt's cache, for one class to extend: cropped back to the prompt where the cache can be (what the last
    class appended is dropped), else a copy."""
    if hasattr(cache, "crop") and hasattr(cache, "get_seq_length"):
        extra = cache.get_seq_length() - prefix_length
        if extra > 0:
            cache.crop(-extra)  # transformers 5: a negative count removes that many tokens from the end
        return cache
    return copy.deepcopy(cache)


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """
    (batch, num_classes) scores -> (batch, num_classes) float32 probabilities over the classes, e.g. P("yes") for
    Hateful Memes.

    With two classes they are derived as open_flamingo's `evaluate_classification` derives its Hateful Memes score:
    the top class (`torch.topk`, as there) gets exp(score - logsumexp(scores)), the other class one minus that. This
    is not always the softmax to the last bit: a class the model all but rules out gets a multiple of 2**-24 (0 below
    about 3e-8), so such examples tie in ROC-AUC as they did in the original (tests/test_eval_vs_original.py). (One
    minus the top probability is exact in float32 whenever that is at least 0.5; only for two equal scores can the
    original's float64 figure be 2**-25 away.) With any other number of classes: the softmax.
    """
    scores = scores.float()
    if scores.shape[-1] != 2:
        return torch.softmax(scores, dim=-1)
    top_score, top = torch.topk(scores, k=1, dim=-1)
    top_probability = torch.exp(top_score - torch.logsumexp(scores, dim=-1, keepdim=True))
    return (1 - top_probability).expand_as(scores).clone().scatter_(-1, top, top_probability)
