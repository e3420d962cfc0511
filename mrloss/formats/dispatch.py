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
# keys that mark a sample as one of that format when they appear next to another format's keys: always an error
# there (a chat sample's "prompt" or "tools" next to plain text are only unknown keys)
_MARKING_KEYS = {**_KEYS, CHAT_FORMAT: ("messages",)}
# top-level keys any sample may carry besides its format's keys: metadata, kept by `convert`, never read
METADATA_KEYS = ("id", "source", "language", "meta", "metadata")
# what to do with any other top-level key: "error" (a FormatError naming it), "keep" (metadata too), or a list of
# more key names that are metadata (the rest are errors)
EXTRA_KEYS = ("error", "keep")
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


def parse(
    sample: dict,
    format: str = "auto",
    *,
    overlap: str = "error",
    extra_keys="error",
    sample_id=None,
    tokenizer=None,
) -> RegionText:
    """RegionText of one raw sample in ``format`` (``"auto"``, or one of INPUT_FORMATS).

    A sample holds its format's keys and, as metadata that is kept but never read, `METADATA_KEYS` (``id``,
    ``source``, ``language``, ``meta``, ``metadata``). Any other top-level key would be silently dropped, so it
    raises, naming the key (and, for a near miss such as ``defualt_weight``, the key it is close to), unless
    ``extra_keys`` allows it: ``"keep"`` makes every other key metadata, a list of names makes those metadata.
    Near misses of a format's keys and keys of another format (``text`` next to ``segments``) raise always.
    ``overlap`` ("error" | "max") applies to position_based regions. ``tokenizer``: a tokenizer with a chat
    template (any object with ``apply_chat_template``), needed by the messages format only. Raises FormatError
    naming ``sample_id``, the field and the character position.
    """
    if format not in ("auto",) + INPUT_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {INPUT_FORMATS}, got {format!r}")
    allowed_extra = _allowed_extra_keys(extra_keys)
    if not isinstance(sample, dict):
        raise FormatError(f"a sample must be an object, got {type(sample).__name__}", sample_id=sample_id)
    chosen = detect_format(sample) if format == "auto" else format
    _check_keys(sample, chosen, allowed_extra, sample_id)
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


def _allowed_extra_keys(extra_keys) -> frozenset | None:
    """The key names that `parse`'s ``extra_keys`` makes metadata besides METADATA_KEYS (None: every key)."""
    if extra_keys == "keep":
        return None
    if extra_keys == "error":
        return frozenset()
    if isinstance(extra_keys, str) or not all(isinstance(key, str) for key in extra_keys):
        raise ValueError(f"extra_keys must be one of {EXTRA_KEYS} or a list of key names, got {extra_keys!r}")
    return frozenset(extra_keys)


def add_extra_keys_argument(parser, default: str | None) -> None:
    """``--extra-keys error|keep|KEY,KEY`` on an argparse ``parser`` (`mrloss prepare`, `mrloss show`): `parse`'s
    ``extra_keys``, comma-separated names as a tuple; ``default`` None: the command picks it."""

    def option(text: str):
        return text if text in EXTRA_KEYS else tuple(name.strip() for name in text.split(",") if name.strip())

    parser.add_argument(
        "--extra-keys",
        type=option,
        default=default,
        metavar="error|keep|KEY,KEY",
        help=f"top-level keys besides the format's and {', '.join(METADATA_KEYS)}: an error (default), kept as "
        "metadata, or these names kept",
    )


_ALL_KEYS = sorted({key for keys in _KEYS.values() for key in keys})
NEAR_MISS_CUTOFF = 0.8  # difflib ratio: "defualt_weight" / "segment" are typos, "id" / "source" are metadata


def _check_keys(sample: dict, chosen: str, allowed_extra: frozenset | None, sample_id) -> None:
    """FormatError for the first top-level key of ``sample`` that a ``chosen`` sample cannot carry: a key that marks
    another format; unless named in ``allowed_extra``, a near miss of a format key (a typo, even with "keep");
    unless allowed (``allowed_extra`` None: every key), any other unknown key."""
    own = _KEYS[chosen]
    for key in sample:
        if key in own or key in METADATA_KEYS:
            continue
        if any(key in keys for name, keys in _MARKING_KEYS.items() if name != chosen):
            raise FormatError(
                f"key {key!r} does not belong to a {chosen} sample (keys: {', '.join(own)})",
                sample_id=sample_id,
                field=key,
            )
        if allowed_extra is not None and key in allowed_extra:
            continue  # named as metadata by the caller
        if key not in _ALL_KEYS:
            close = difflib.get_close_matches(str(key), _ALL_KEYS, n=1, cutoff=NEAR_MISS_CUTOFF)
            if close:
                raise FormatError(f"unknown key {key!r}; did you mean {close[0]!r}?", sample_id=sample_id, field=key)
        if allowed_extra is not None:
            raise FormatError(
                f"unknown key {key!r} (a {chosen} sample has {', '.join(own)} and metadata {', '.join(METADATA_KEYS)}):"
                " move it under 'meta', or keep unknown keys (extra_keys='keep'; --extra-keys keep; config "
                "data.extra_keys: keep)",
                sample_id=sample_id,
                field=str(key),
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


def convert(
    sample: dict,
    to: str,
    format: str = "auto",
    *,
    overlap: str = "error",
    extra_keys="error",
    sample_id=None,
    region_text: RegionText | None = None,
) -> dict:
    """``sample`` rewritten in format ``to``; its top-level metadata keys are kept (`parse`'s options).
    ``region_text``: the sample's `parse`, when the caller has it already (not parsed again)."""
    if region_text is None:
        region_text = parse(sample, format, overlap=overlap, extra_keys=extra_keys, sample_id=sample_id)
    source = detect_format(sample) if format == "auto" else format
    metadata = {key: value for key, value in sample.items() if key not in _KEYS[source]}
    return {**to_format(region_text, to, sample_id=sample_id), **metadata}
