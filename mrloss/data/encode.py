"""encode: RegionText + tokenizer -> token ids and token weights. The one token-weight rule of mrloss.

Rule (every tool that needs token weights calls this module):
- A token's character span is its tokenizer offsets, widened to the left over characters no token covers
  (tokenizers that trim a leading space from the offsets still learn that space), the last token also
  covering trailing uncovered characters.
- A token's weight is the highest weight among the characters of its span, so a byte-level BPE token that
  straddles a region border, or is half of a multi-byte character, is learned. Its region id is the
  region of the first such character inside a region, else -1.
- A token with an empty span (special tokens, an appended EOS) takes the weight and region of the token
  before it: a learned answer also learns to stop.
- ``token_weights[0] = 0`` after truncation: nothing predicts the first token.
"""
from __future__ import annotations

from collections import Counter

from mrloss.formats import FormatError, RegionText

TRUNCATION_MODES = ("right", "left", "error")


def encode(region_text: RegionText, tokenizer, *, max_length: int | None = None, truncation: str = "right",
           add_eos: bool = True, sample_id=None) -> dict:
    """Token ids and weights of one RegionText with a fast (offset-giving) tokenizer.

    Returns ``input_ids: list[int]``, ``token_weights: list[float]`` (weight of predicting each token;
    index 0 is 0), ``region_ids: list[int]`` (index into ``region_text.regions``, -1 outside),
    ``offsets: list[tuple[int, int]]`` (the character span each weight came from), ``region_types:
    list[str]``, ``truncated_regions: list[int]`` (learned regions that lost learned tokens to truncation)
    and ``untruncated_length: int``. ``truncation``: "right" keeps the first ``max_length`` tokens, "left"
    the last, "error" raises FormatError naming the sample and its length.
    """
    return encode_batch([region_text], tokenizer, max_length=max_length, truncation=truncation, add_eos=add_eos,
                        sample_ids=[sample_id])[0]


def encode_batch(region_texts: list[RegionText], tokenizer, *, max_length: int | None = None,
                 truncation: str = "right", add_eos: bool = True, sample_ids: list | None = None) -> list[dict]:
    """``encode`` of many RegionTexts with one (parallel) tokenizer call."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"encode needs a fast tokenizer that returns offsets, got {type(tokenizer).__name__}")
    eos_token_id = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    sample_ids = list(sample_ids) if sample_ids is not None else [None] * len(region_texts)
    if not region_texts:
        return []
    encodings = tokenizer([rt.text for rt in region_texts], return_offsets_mapping=True)
    return [_align(rt, ids, offsets, eos_token_id, max_length, truncation, sample_id)
            for rt, ids, offsets, sample_id in zip(region_texts, encodings["input_ids"], encodings["offset_mapping"],
                                                   sample_ids)]


def _align(region_text: RegionText, input_ids: list[int], offsets, eos_token_id, max_length, truncation,
           sample_id) -> dict:
    char_weights = region_text.char_weights()
    char_regions = region_text.char_region_ids()
    spans = _spans(offsets, len(region_text.text))
    input_ids = list(input_ids)
    if eos_token_id is not None and (not input_ids or input_ids[-1] != eos_token_id):
        input_ids.append(eos_token_id)
        spans.append((len(region_text.text), len(region_text.text)))
    token_weights, region_ids = [], []
    for start, end in spans:
        if end > start:
            weight = max(char_weights[start:end])
            region = next((char_regions[c] for c in range(start, end)
                           if char_regions[c] >= 0 and char_weights[c] == weight), -1)
        else:
            weight, region = (token_weights[-1], region_ids[-1]) if token_weights else (0.0, -1)
        token_weights.append(weight)
        region_ids.append(region)

    untruncated_length = len(input_ids)
    learned_before = _learned_per_region(token_weights, region_ids)
    if max_length is not None and untruncated_length > max_length:
        if truncation == "error":
            raise FormatError(f"{untruncated_length} tokens, more than max_length {max_length} (truncation='error')",
                              sample_id=sample_id, field="text")
        keep = slice(0, max_length) if truncation == "right" else slice(untruncated_length - max_length, None)
        input_ids, token_weights, region_ids, spans = (input_ids[keep], token_weights[keep], region_ids[keep],
                                                       spans[keep])
    learned_after = _learned_per_region(token_weights, region_ids)
    if token_weights:
        token_weights[0] = 0.0
    return {
        "input_ids": input_ids,
        "token_weights": token_weights,
        "region_ids": region_ids,
        "offsets": spans,
        "region_types": [region.type for region in region_text.regions],
        "truncated_regions": sorted(r for r, count in learned_before.items() if learned_after[r] < count),
        "untruncated_length": untruncated_length,
    }


def _spans(offsets, text_length: int) -> list[tuple[int, int]]:
    """Tokenizer offsets widened over uncovered characters (see the module docstring)."""
    spans, covered = [], 0
    for start, end in offsets:
        if end > start or start > covered:
            start = min(start, covered)
        spans.append((start, end))
        covered = max(covered, end)
    if covered < text_length:
        last = max((i for i, (start, end) in enumerate(spans) if end > start), default=None)
        if last is not None:
            spans[last] = (spans[last][0], text_length)
    return spans


def _learned_per_region(token_weights: list[float], region_ids: list[int]) -> Counter:
    """Learned tokens (weight > 0, not the first) per region id >= 0."""
    return Counter(r for w, r in zip(token_weights[1:], region_ids[1:]) if w > 0 and r >= 0)
