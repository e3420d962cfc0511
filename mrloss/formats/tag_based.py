"""tag_based: ``{"text", "default_weight"}`` where ``text`` marks regions with
``<LEARN weight="2.0" type="concept">...</LEARN>`` (attributes optional, in any order, single or double
quotes; the tag name and attribute names are case-insensitive). Tags are removed; a region is exactly the
characters between its tags. Tags nest: inside an inner tag the inner tag's weight and type apply (an
omitted attribute takes its default, 1.0 and "default"; nothing is inherited from the outer tag)."""

from __future__ import annotations

import re

from mrloss.formats.errors import FormatError
from mrloss.formats.regions import DEFAULT_TYPE, Region, RegionText, check_str, check_weight
from mrloss.formats.spec import FormatSpec

TAG_NAME = "LEARN"
ATTRIBUTES = ("weight", "type")

TAG_START = re.compile(r"</?learn\b", re.IGNORECASE)
OPEN_TAG = re.compile(r"""<learn((?:\s+[^\s=<>/"']+\s*=\s*(?:"[^"]*"|'[^']*'))*)\s*>""", re.IGNORECASE)
CLOSE_TAG = re.compile(r"</learn\s*>", re.IGNORECASE)
ATTRIBUTE = re.compile(r"""([^\s=<>/"']+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")


def parse_tag_based(sample: dict, *, sample_id=None) -> RegionText:
    """RegionText of a tag_based sample.

    Args:
        sample: ``{"text", "default_weight"}`` (top-level keys checked by the dispatcher); a text without tags has
            every character at ``default_weight``.
        sample_id: named in errors.

    Returns:
        The RegionText of the text without its tags (nested tags split the outer region).
    """
    if "text" not in sample:
        raise FormatError("missing (tag_based samples need 'text')", sample_id=sample_id, field="text")
    raw = check_str(sample["text"], "text", sample_id)
    default_weight = check_weight(sample.get("default_weight", 0.0), "default_weight", sample_id=sample_id)
    chunks: list[str] = []
    regions: list[Region] = []
    open_tags: list[tuple[int, float, str, int]] = []  # (raw position, weight, type, text length at opening)
    length = cursor = 0
    while True:
        tag = TAG_START.search(raw, cursor)
        chunk = raw[cursor : tag.start() if tag else len(raw)]
        if chunk:
            if open_tags:
                _, weight, region_type, _ = open_tags[-1]
                regions.append(Region(length, length + len(chunk), weight, region_type))
            chunks.append(chunk)
            length += len(chunk)
        if tag is None:
            break
        step = _close_tag if tag.group(0).startswith("</") else _open_tag
        cursor = step(raw, tag.start(), open_tags, length, sample_id)
    if open_tags:
        raise _tag_error(f"unclosed <{TAG_NAME}> tag (no matching </{TAG_NAME}>)", open_tags[-1][0], sample_id)
    return RegionText("".join(chunks), regions, default_weight)


def _open_tag(raw: str, start: int, open_tags: list, length: int, sample_id) -> int:
    """Push the opening tag at raw ``start`` (text ``length`` so far) onto ``open_tags``; the raw position after it."""
    opening = OPEN_TAG.match(raw, start)
    if opening is None:
        message = f'malformed <{TAG_NAME}> tag; write <{TAG_NAME} weight="2.0" type="concept"> (quoted values)'
        raise _tag_error(message, start, sample_id)
    weight, region_type = _attributes(opening.group(1), start, sample_id)
    open_tags.append((start, weight, region_type, length))
    return opening.end()


def _close_tag(raw: str, start: int, open_tags: list, length: int, sample_id) -> int:
    """Pop the tag that the closing tag at raw ``start`` closes; the raw position after it."""
    close = CLOSE_TAG.match(raw, start)
    if close is None:
        raise _tag_error(f"malformed closing tag; write </{TAG_NAME}>", start, sample_id)
    if not open_tags:
        raise _tag_error(f"stray </{TAG_NAME}> without an opening <{TAG_NAME}>", start, sample_id)
    opened_at, _, _, opened_length = open_tags.pop()
    if opened_length == length:
        raise _tag_error(f"empty <{TAG_NAME}> region (no characters between the tags)", opened_at, sample_id)
    return close.end()


def _tag_error(reason: str, position: int, sample_id=None) -> FormatError:
    """A FormatError of the ``text`` field at raw ``position`` (a tag's start)."""
    return FormatError(reason, sample_id=sample_id, field="text", position=position)


def _attributes(source: str, position: int, sample_id) -> tuple[float, str]:
    """(weight, type) from the attribute part of an opening tag at raw ``position``."""
    values: dict[str, str] = {}
    for match in ATTRIBUTE.finditer(source):
        name = match.group(1).lower()
        value = match.group(2) if match.group(2) is not None else match.group(3)
        if name not in ATTRIBUTES:
            raise FormatError(
                f"unknown <{TAG_NAME}> attribute {match.group(1)!r} (allowed: {', '.join(ATTRIBUTES)})",
                sample_id=sample_id,
                field=f"text.<{TAG_NAME}>.{match.group(1)}",
                position=position,
            )
        if name in values:
            raise FormatError(
                f"attribute {name!r} given twice",
                sample_id=sample_id,
                field=f"text.<{TAG_NAME}>.{name}",
                position=position,
            )
        values[name] = value
    weight = 1.0
    if "weight" in values:
        weight = check_weight(_number(values["weight"]), f"text.<{TAG_NAME}>.weight", position, sample_id)
    region_type = check_str(
        values.get("type", DEFAULT_TYPE), f"text.<{TAG_NAME}>.type", sample_id, position, allow_empty=False
    )
    return weight, region_type


def _number(text: str):
    """``text`` as a float if it spells a number, NaN or infinity (the weight check rejects those two by
    name); otherwise the string itself, which the weight check reports as not a number."""
    if NUMBER.fullmatch(text) or text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    return text


def to_tag_based(region_text: RegionText) -> dict:
    """The tag_based sample of ``region_text``.

    Args:
        region_text: a RegionText whose text holds no ``<LEARN`` / ``</LEARN`` of its own (FormatError otherwise).

    Returns:
        ``{"text", "default_weight"}``, each region written as ``<LEARN weight=".." type="..">...</LEARN>``.
    """
    literal = TAG_START.search(region_text.text)
    if literal:
        raise _tag_error(f"the text contains {literal.group(0)!r}, which tag_based cannot represent", literal.start())
    parts, previous = [], 0
    for region in region_text.regions:
        quote = "'" if '"' in region.type else '"'
        if quote in region.type:
            raise FormatError("region type contains both quote characters", field="regions.type", position=region.start)
        parts += [
            region_text.text[previous : region.start],
            f'<{TAG_NAME} weight="{float(region.weight)!r}" type={quote}{region.type}{quote}>',
            region_text.text[region.start : region.end],
            f"</{TAG_NAME}>",
        ]
        previous = region.end
    parts.append(region_text.text[previous:])
    return {"text": "".join(parts), "default_weight": float(region_text.default_weight)}


# tag_based is the fallback of detection: a sample that no other format claims (plain ``text``)
FORMAT = FormatSpec(name="tag_based", keys=("text", "default_weight"), parse=parse_tag_based, write=to_tag_based)
