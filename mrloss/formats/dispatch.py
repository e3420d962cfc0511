"""parse / convert: pick the format of a sample and hand it to that format's module."""

from __future__ import annotations

import difflib

from mrloss.formats import messages, position_based, structured, tag_based
from mrloss.formats.errors import FormatError
from mrloss.formats.regions import RegionText

FORMATS = ("position_based", "tag_based", "structured")  # the formats of plain text: parse, write, convert
CHAT_FORMAT = "messages"  # chat samples, rendered with the tokenizer's chat template: parse only
INPUT_FORMATS = FORMATS + (CHAT_FORMAT,)
_KEYS = {
    "position_based": position_based.KEYS,
    "tag_based": tag_based.KEYS,
    "structured": structured.KEYS,
    CHAT_FORMAT: messages.KEYS,
}
# keys that mark a sample as one of that format when they appear next to another format's keys (a chat
# sample's "prompt" or "tools" alone are ordinary metadata of a plain-text sample)
_MARKING_KEYS = {**_KEYS, CHAT_FORMAT: ("messages",)}
_WRITERS = {
    "position_based": position_based.to_position_based,
    "tag_based": tag_based.to_tag_based,
    "structured": structured.to_structured,
}


def detect_format(sample: dict) -> str:
    """``messages``, or TRL's ``prompt`` and ``completion`` (both, or either as a list of messages) -> messages;
    ``segments`` -> structured; ``learning_regions`` -> position_based; otherwise tag_based."""
    turns = [sample[key] for key in ("prompt", "completion") if key in sample]
    if "messages" in sample or len(turns) == 2 or any(isinstance(value, list) for value in turns):
        return CHAT_FORMAT
    if "segments" in sample:
        return "structured"
    if "learning_regions" in sample:
        return "position_based"
    return "tag_based"


def parse(sample: dict, format: str = "auto", *, overlap: str = "error", sample_id=None, tokenizer=None) -> RegionText:
    """RegionText of one raw sample in ``format`` (``"auto"``, or one of INPUT_FORMATS).

    Extra top-level keys are metadata and ignored, except keys of another format (e.g. ``text`` next to
    ``segments``) and near misses of a format's keys (``defualt_weight``, ``learning_region``, ``segment``),
    which would otherwise be silently dropped: those raise, naming the key (and the key it is close to).
    ``overlap`` ("error" | "max") applies to position_based regions. ``tokenizer``: a tokenizer with a chat
    template (any object with ``apply_chat_template``), needed by the messages format only. Raises FormatError
    naming ``sample_id``, the field and the character position.
    """
    if format not in ("auto",) + INPUT_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {INPUT_FORMATS}, got {format!r}")
    if not isinstance(sample, dict):
        raise FormatError(f"a sample must be an object, got {type(sample).__name__}", sample_id=sample_id)
    _check_near_misses(sample, sample_id)
    chosen = detect_format(sample) if format == "auto" else format
    foreign = [
        key
        for name, keys in _MARKING_KEYS.items()
        if name != chosen
        for key in keys
        if key in sample and key not in _KEYS[chosen]
    ]
    if foreign:
        raise FormatError(
            f"key {foreign[0]!r} does not belong to a {chosen} sample (keys: {', '.join(_KEYS[chosen])})",
            sample_id=sample_id,
            field=foreign[0],
        )
    if chosen == "position_based":
        region_text = position_based.parse_position_based(sample, overlap=overlap, sample_id=sample_id)
    elif chosen == "tag_based":
        region_text = tag_based.parse_tag_based(sample, sample_id=sample_id)
    elif chosen == CHAT_FORMAT:
        region_text = messages.parse_messages(sample, tokenizer=tokenizer, sample_id=sample_id)
    else:
        region_text = structured.parse_structured(sample, sample_id=sample_id)
    if not region_text.text:
        field = {"structured": "segments", CHAT_FORMAT: "messages"}.get(chosen, "text")
        raise FormatError("the sample has no text", sample_id=sample_id, field=field)
    return region_text


_ALL_KEYS = sorted({key for keys in _KEYS.values() for key in keys})
NEAR_MISS_CUTOFF = 0.8  # difflib ratio: "defualt_weight" / "segment" are typos, "id" / "source" are metadata


def _check_near_misses(sample: dict, sample_id) -> None:
    """FormatError for a top-level key that is not a format key but close to one (a typo)."""
    for key in sample:
        if not isinstance(key, str) or key in _ALL_KEYS:
            continue
        close = difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=NEAR_MISS_CUTOFF)
        if close:
            raise FormatError(
                f"unknown key {key!r}; did you mean {close[0]!r}? (other top-level keys are metadata and ignored)",
                sample_id=sample_id,
                field=key,
            )


def to_format(region_text: RegionText, format: str, *, sample_id=None) -> dict:
    """The raw sample of ``region_text`` in ``format`` (one of FORMATS); parsing it gives the same
    ``char_weights()``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if region_text.has_special_tokens:
        raise FormatError(
            f"a rendered chat template cannot be written as {format} (it would be tokenized with added special "
            "tokens): keep the messages sample",
            sample_id=sample_id,
            field="text",
        )
    try:
        return _WRITERS[format](region_text)
    except FormatError as error:
        raise error.with_sample_id(sample_id) from None


def convert(sample: dict, to: str, format: str = "auto", *, overlap: str = "error", sample_id=None) -> dict:
    """``sample`` rewritten in format ``to``; its top-level metadata keys are kept."""
    region_text = parse(sample, format, overlap=overlap, sample_id=sample_id)
    source = detect_format(sample) if format == "auto" else format
    metadata = {key: value for key, value in sample.items() if key not in _KEYS[source]}
    return {**to_format(region_text, to, sample_id=sample_id), **metadata}
