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
- ``token_weights[0] = 0`` after truncation: nothing predicts the first token (`unlearn_first_token`, which
  the collator also applies to every item, so no packed sample has another sample's token as a target).
"""

from __future__ import annotations

import numpy as np

from mrloss.formats import FormatError, RegionText

TRUNCATION_MODES = ("right", "left", "error")


def unlearn_first_token(token_weights):
    """The first-token rule, in place: weight 0 for token 0 of a sample (nothing in the sample predicts it).
    ``token_weights``: a 1-D numpy array or torch tensor; returned."""
    token_weights[:1] = 0.0
    return token_weights


def encode(
    region_text: RegionText,
    tokenizer,
    *,
    max_length: int | None = None,
    truncation: str = "right",
    add_eos: bool = True,
    sample_id=None,
) -> dict:
    """Token ids and weights of one RegionText with a fast (offset-giving) tokenizer.

    Returns ``input_ids: list[int]``, ``token_weights: list[float]`` (weight of predicting each token;
    index 0 is 0), ``region_ids: list[int]`` (index into ``region_text.regions``, -1 outside),
    ``offsets: list[tuple[int, int]]`` (the character span each weight came from), ``region_types:
    list[str]``, ``truncated_regions: list[int]`` (learned regions that lost learned tokens to truncation)
    and ``untruncated_length: int``. ``truncation``: "right" keeps the first ``max_length`` tokens, "left"
    the last, "error" raises FormatError naming the sample and its length.
    """
    return encode_batch(
        [region_text], tokenizer, max_length=max_length, truncation=truncation, add_eos=add_eos, sample_ids=[sample_id]
    )[0]


def encode_batch(
    region_texts: list[RegionText],
    tokenizer,
    *,
    max_length: int | None = None,
    truncation: str = "right",
    add_eos: bool = True,
    sample_ids: list | None = None,
) -> list[dict]:
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
    return [
        _align(rt, ids, offsets, eos_token_id, max_length, truncation, sample_id)
        for rt, ids, offsets, sample_id in zip(
            region_texts, encodings["input_ids"], encodings["offset_mapping"], sample_ids
        )
    ]


def _align(
    region_text: RegionText, input_ids: list[int], offsets, eos_token_id, max_length, truncation, sample_id
) -> dict:
    text_length = len(region_text.text)
    # one sentinel character past the end, so that spans ending at the text's end are valid reduceat bounds
    char_weights = np.asarray(region_text.char_weights() + [0.0], dtype=np.float64)
    char_regions = np.asarray(region_text.char_region_ids() + [-1], dtype=np.int64)
    starts, ends = _spans(offsets, text_length)
    input_ids = list(input_ids)
    if eos_token_id is not None and (not input_ids or input_ids[-1] != eos_token_id):
        input_ids.append(eos_token_id)
        starts, ends = np.append(starts, text_length), np.append(ends, text_length)

    filled = ends > starts
    token_weights = np.zeros(len(input_ids), dtype=np.float64)
    region_ids = np.full(len(input_ids), -1, dtype=np.int64)
    if len(input_ids):
        span_maxima = np.maximum.reduceat(char_weights, np.stack([starts, ends], 1).ravel())[::2]
        token_weights[filled] = span_maxima[filled]
        # a span inside one region (or outside all) has one region id; spans crossing a border are looked up
        borders = np.concatenate([[0], np.cumsum(char_regions[1:] != char_regions[:-1])])
        uniform = filled & (borders[np.maximum(ends - 1, 0)] == borders[starts])
        region_ids[uniform] = char_regions[starts[uniform]]
        for k in np.flatnonzero(filled & ~uniform).tolist():
            span = range(starts[k], ends[k])
            region_ids[k] = next(
                (char_regions[c] for c in span if char_regions[c] >= 0 and char_weights[c] == token_weights[k]), -1
            )
        for k in np.flatnonzero(~filled).tolist():  # in order: a run of empty spans inherits from before it
            if k:
                token_weights[k], region_ids[k] = token_weights[k - 1], region_ids[k - 1]

    untruncated_length = len(input_ids)
    learned_before = _learned_per_region(token_weights, region_ids, len(region_text.regions))
    if max_length is not None and untruncated_length > max_length:
        if truncation == "error":
            raise FormatError(
                f"{untruncated_length} tokens, more than max_length {max_length} (truncation='error')",
                sample_id=sample_id,
                field="text",
            )
        keep = slice(0, max_length) if truncation == "right" else slice(untruncated_length - max_length, None)
        input_ids, token_weights, region_ids, starts, ends = (
            input_ids[keep],
            token_weights[keep],
            region_ids[keep],
            starts[keep],
            ends[keep],
        )
    learned_after = _learned_per_region(token_weights, region_ids, len(region_text.regions))
    unlearn_first_token(token_weights)
    return {
        "input_ids": input_ids,
        "token_weights": token_weights.tolist(),
        "region_ids": region_ids.tolist(),
        "offsets": list(zip(starts.tolist(), ends.tolist())),
        "region_types": [region.type for region in region_text.regions],
        "truncated_regions": np.flatnonzero(learned_after < learned_before).tolist(),
        "untruncated_length": untruncated_length,
    }


def _spans(offsets, text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64: tokenizer offsets widened over uncovered characters (see the module docstring)."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0].copy(), bounds[:, 1].copy()
    covered = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]) if len(ends) else ends
    widen = (ends > starts) | (starts > covered)
    starts[widen] = np.minimum(starts[widen], covered[widen])
    filled = np.flatnonzero(ends > starts)
    if len(filled) and ends.max() < text_length:
        ends[filled[-1]] = text_length
    return starts, ends


def _learned_per_region(token_weights: np.ndarray, region_ids: np.ndarray, region_count: int) -> np.ndarray:
    """[region_count] number of learned tokens (weight > 0, not the first token) in each region."""
    learned = (token_weights[1:] > 0) & (region_ids[1:] >= 0)
    return np.bincount(region_ids[1:][learned], minlength=region_count)
