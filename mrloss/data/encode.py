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
- A text rendered by a chat template (``RegionText.has_special_tokens``) holds its own special tokens: it is
  tokenized without added ones and gets no appended EOS (the template's end of turn is in the text).

``encode_batch`` aligns the whole batch at once (numpy over every token's offsets and every region, nothing
per character), so it costs little beyond the tokenizer call (``python -m bench.encode``).
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from mrloss.formats import FormatError, RegionText

TRUNCATION_MODES = ("right", "left", "error")
DEFAULT_MAX_LENGTH = 512  # tokens per sample of `mrloss train` (data.max_length) unless configured


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
    """``encode`` of many RegionTexts with one (parallel) tokenizer call; the alignment runs on the whole
    batch at once (numpy over the concatenated offsets). A RegionText with ``has_special_tokens`` (a
    rendered chat template) is tokenized without added special tokens and gets no appended EOS."""
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
    input_ids, offsets = _tokenize(region_texts, tokenizer)
    aligned = _align_batch(region_texts, input_ids, offsets, eos_token_id)
    return [
        _sample_encoding(region_text, *sample, max_length, truncation, sample_id)
        for region_text, sample, sample_id in zip(region_texts, aligned, sample_ids)
    ]


def _tokenize(region_texts: list[RegionText], tokenizer) -> tuple[list[list[int]], list]:
    """Token ids and offsets of every text: one tokenizer call per kind (plain texts get the tokenizer's special
    tokens, rendered chat templates hold their own)."""
    input_ids: list = [None] * len(region_texts)
    offsets: list = [None] * len(region_texts)
    for has_special_tokens in (False, True):
        indices = [i for i, rt in enumerate(region_texts) if rt.has_special_tokens == has_special_tokens]
        if not indices:
            continue
        encodings = tokenizer(
            [region_texts[i].text for i in indices],
            return_offsets_mapping=True,
            add_special_tokens=not has_special_tokens,
        )
        for i, ids, spans in zip(indices, encodings["input_ids"], encodings["offset_mapping"]):
            input_ids[i], offsets[i] = ids, spans
    return input_ids, offsets


def _align_batch(region_texts: list[RegionText], input_ids: list[list[int]], offsets: list, eos_token_id):
    """Per sample ``(input_ids, offsets, token_weights [T] f64, region_ids [T] i64)``; ``input_ids`` and
    ``offsets`` are the tokenizer's own lists (this call's), extended by the appended EOS and patched where a
    span was widened.

    All samples are laid end to end: sample i's characters sit at ``base_i + c`` with one character between
    texts (``base_{i+1} = base_i + len(text_i) + 1``), so one pass of numpy over the tokens covers the batch.
    Work is linear in tokens and regions (nothing per character)."""
    count = len(region_texts)
    text_lengths = np.fromiter((len(rt.text) for rt in region_texts), np.int64, count)
    bases = np.concatenate([[0], np.cumsum(text_lengths + 1)[:-1]])
    # the appended EOS: an empty span at the end of the text
    for region_text, ids, spans in zip(region_texts, input_ids, offsets):
        if eos_token_id is not None and not region_text.has_special_tokens and (not ids or ids[-1] != eos_token_id):
            ids.append(eos_token_id)
            spans.append((len(region_text.text), len(region_text.text)))
    token_counts = np.fromiter((len(ids) for ids in input_ids), np.int64, count)
    bounds = np.concatenate([[0], np.cumsum(token_counts)])
    token_bases = np.repeat(bases, token_counts)
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), np.int64, 2 * int(bounds[-1]))
    raw_starts, raw_ends = flat[0::2] + token_bases, flat[1::2] + token_bases
    starts, ends = _spans(raw_starts, raw_ends, token_counts, bases, bases + text_lengths)

    filled = ends > starts
    token_defaults = np.repeat(np.fromiter((rt.default_weight for rt in region_texts), np.float64, count), token_counts)
    token_weights, region_ids = _span_weights(starts, ends, filled, token_defaults, _batch_regions(region_texts, bases))
    if len(starts):
        # an empty span takes weight and region of the closest filled token before it in its sample, if any
        source = np.maximum.accumulate(np.where(filled, np.arange(len(starts)), -1))
        inherits = ~filled & (source >= np.repeat(bounds[:-1], token_counts))
        token_weights[inherits] = token_weights[source[inherits]]
        region_ids[inherits] = region_ids[source[inherits]]
    for k in np.flatnonzero((starts != raw_starts) | (ends != raw_ends)).tolist():
        i = int(np.searchsorted(bounds, k, side="right")) - 1
        offsets[i][k - bounds[i]] = (int(starts[k] - bases[i]), int(ends[k] - bases[i]))
    return [
        (input_ids[i], offsets[i], token_weights[bounds[i] : bounds[i + 1]], region_ids[bounds[i] : bounds[i + 1]])
        for i in range(count)
    ]


def _spans(starts, ends, token_counts, text_starts, text_ends) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 of the batch's tokens: offsets widened over uncovered characters (see the module
    docstring). ``starts`` / ``ends`` are global character positions, ``token_counts`` [B] tokens per sample,
    ``text_starts`` / ``text_ends`` [B] each text's global bounds."""
    starts, ends = starts.copy(), ends.copy()
    sample_text_starts = np.repeat(text_starts, token_counts)
    # covered: the end of the text covered before each token (within its sample; earlier samples end before)
    covered = np.maximum(np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]), sample_text_starts)
    widen = (ends > starts) | (starts > covered)
    starts[widen] = np.minimum(starts[widen], covered[widen])
    # the last token with a non-empty span also covers the uncovered characters at the end of its text
    last = np.cumsum(token_counts) - 1
    has_tokens = token_counts > 0
    last_filled = np.maximum.accumulate(np.where(ends > starts, np.arange(len(ends)), -1))[last[has_tokens]]
    reached = np.maximum.accumulate(ends)[last[has_tokens]] if len(ends) else last[has_tokens]
    sample_starts = (last + 1 - token_counts)[has_tokens]
    extend = (last_filled >= sample_starts) & (reached < text_ends[has_tokens])
    ends[last_filled[extend]] = text_ends[has_tokens][extend]
    return starts, ends


def _batch_regions(region_texts: list[RegionText], bases: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every region of the batch in global positions, sorted: (starts i64, ends i64, weights f64, index of the
    region in its sample i64)."""
    rows = [
        (base + region.start, base + region.end, region.weight, index)
        for base, region_text in zip(bases.tolist(), region_texts)
        for index, region in enumerate(region_text.regions)
    ]
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return tuple(
        np.asarray(column, dtype=dtype) for column, dtype in zip(columns, (np.int64, np.int64, float, np.int64))
    )


def _span_weights(starts, ends, filled, defaults, regions) -> tuple[np.ndarray, np.ndarray]:
    """(token_weights [T] f64, region_ids [T] i64) of the tokens with a non-empty span (``filled``; the others
    get 0 and -1): the highest character weight of the span (a region's weight inside it, ``defaults`` [T]
    outside every region), and the region of the first character in a region with that weight, else -1."""
    region_starts, region_ends, region_weights, region_index = regions
    first = np.searchsorted(region_ends, starts, side="right")  # first region ending after the span's start
    overlapping = np.searchsorted(region_starts, ends, side="left") - first  # regions meeting the span
    weights = np.where(filled, defaults, 0.0)
    region_ids = np.full(len(starts), -1, dtype=np.int64)
    one = np.flatnonzero(filled & (overlapping == 1))
    if len(one):
        r = first[one]
        inside = (region_starts[r] <= starts[one]) & (region_ends[r] >= ends[one])
        weights[one] = np.where(inside, region_weights[r], np.maximum(region_weights[r], defaults[one]))
        region_ids[one] = np.where(region_weights[r] == weights[one], region_index[r], -1)
    for k in np.flatnonzero(filled & (overlapping > 1)).tolist():  # a token over several regions: rare
        met = range(first[k], first[k] + overlapping[k])
        gaps = region_starts[met[0]] > starts[k] or region_ends[met[-1]] < ends[k]
        gaps = gaps or any(region_starts[j + 1] > region_ends[j] for j in met[:-1])
        weights[k] = max([region_weights[j] for j in met] + ([defaults[k]] if gaps else []))
        region_ids[k] = next((region_index[j] for j in met if region_weights[j] == weights[k]), -1)
    return weights, region_ids


def _sample_encoding(
    region_text: RegionText, input_ids, offsets, token_weights, region_ids, max_length, truncation, sample_id
) -> dict:
    """The ``encode`` dict of one aligned sample: truncation, the first-token rule, Python lists."""
    untruncated_length = len(input_ids)
    truncated_regions: list[int] = []
    if max_length is not None and untruncated_length > max_length:
        if truncation == "error":
            raise FormatError(
                f"{untruncated_length} tokens, more than max_length {max_length} (truncation='error')",
                sample_id=sample_id,
                field="text",
            )
        learned_before = _learned_per_region(token_weights, region_ids, len(region_text.regions))
        keep = slice(0, max_length) if truncation == "right" else slice(untruncated_length - max_length, None)
        input_ids, offsets, token_weights, region_ids = (
            input_ids[keep],
            offsets[keep],
            token_weights[keep],
            region_ids[keep],
        )
        learned_after = _learned_per_region(token_weights, region_ids, len(region_text.regions))
        truncated_regions = np.flatnonzero(learned_after < learned_before).tolist()
    unlearn_first_token(token_weights)
    return {
        "input_ids": input_ids,
        "token_weights": token_weights.tolist(),
        "region_ids": region_ids.tolist(),
        "offsets": offsets,
        "region_types": [region.type for region in region_text.regions],
        "truncated_regions": truncated_regions,
        "untruncated_length": untruncated_length,
    }


def _learned_per_region(token_weights: np.ndarray, region_ids: np.ndarray, region_count: int) -> np.ndarray:
    """[region_count] number of learned tokens (weight > 0, not the first token) in each region."""
    learned = (token_weights[1:] > 0) & (region_ids[1:] >= 0)
    return np.bincount(region_ids[1:][learned], minlength=region_count)
