"""structured: ``{"segments": [{"content", "learn", "weight", "segment_type"}], "separator"}``.

``text = separator.join(contents)``; separator characters have weight 0. ``weight`` defaults to 1.0 when
``learn`` is true and 0.0 when false; ``learn`` defaults to ``weight > 0``; a segment with neither is context
(weight 0). ``learn`` contradicting ``weight`` (false with weight > 0, true with weight 0) is an error. A
segment becomes a region when it is learned or names a ``segment_type``."""

from __future__ import annotations

from mrloss.formats.errors import FormatError
from mrloss.formats.regions import DEFAULT_TYPE, Region, RegionText, check_list, check_mapping, check_str, check_weight
from mrloss.formats.spec import FormatSpec

SEGMENT_KEYS = ("content", "learn", "weight", "segment_type")


def parse_structured(sample: dict, *, sample_id=None) -> RegionText:
    """RegionText of a structured sample.

    Args:
        sample: ``{"segments", "separator"}`` (top-level keys checked by the dispatcher).
        sample_id: named in errors.

    Returns:
        The RegionText: the joined contents, a region per learned or typed segment, default weight 0.
    """
    if "segments" not in sample:
        raise FormatError("missing (structured samples need 'segments')", sample_id=sample_id, field="segments")
    segments = check_list(sample["segments"], "segments", sample_id)
    separator = check_str(sample.get("separator", ""), "separator", sample_id)
    contents: list[str] = []
    regions: list[Region] = []
    position = 0
    for index, segment in enumerate(segments):
        name = f"segments[{index}]"
        if index:
            position += len(separator)
        check_mapping(segment, name, SEGMENT_KEYS, sample_id, position)
        if "content" not in segment:
            raise FormatError("missing", sample_id=sample_id, field=f"{name}.content", position=position)
        content = check_str(segment["content"], f"{name}.content", sample_id, position)
        learn, weight = _learn_and_weight(segment, name, position, sample_id)
        if learn and not content:
            raise FormatError(
                "a learned segment must not be empty", sample_id=sample_id, field=f"{name}.content", position=position
            )
        if content and (learn or "segment_type" in segment):
            region_type = check_str(
                segment.get("segment_type", DEFAULT_TYPE),
                f"{name}.segment_type",
                sample_id,
                position,
                allow_empty=False,
            )
            regions.append(Region(position, position + len(content), weight, region_type))
        contents.append(content)
        position += len(content)
    return RegionText(separator.join(contents), regions, 0.0)


def _learn_and_weight(segment: dict, name: str, position: int, sample_id) -> tuple[bool, float]:
    learn = segment.get("learn")
    if learn is not None and not isinstance(learn, bool):
        raise FormatError(
            f"must be true or false, got {learn!r}", sample_id=sample_id, field=f"{name}.learn", position=position
        )
    weight = segment.get("weight")
    if weight is not None:
        weight = check_weight(weight, f"{name}.weight", position, sample_id)
    if learn is None:
        return (weight or 0.0) > 0, weight or 0.0
    if weight is None:
        return learn, 1.0 if learn else 0.0
    if learn != (weight > 0):
        raise FormatError(
            f"learn: {str(learn).lower()} contradicts weight {weight!r}",
            sample_id=sample_id,
            field=f"{name}.learn",
            position=position,
        )
    return learn, weight


def to_structured(region_text: RegionText) -> dict:
    """The structured sample of ``region_text`` (separator "").

    Args:
        region_text: any RegionText; text outside its regions becomes context segments, or learned segments of
            weight ``default_weight`` when that is above 0.

    Returns:
        ``{"segments", "separator"}``.
    """
    text, segments, previous = region_text.text, [], 0

    def outside(start: int, end: int):
        weight = float(region_text.default_weight)
        segments.append({"content": text[start:end], "learn": weight > 0, "weight": weight})

    for region in region_text.regions:
        if region.start > previous:
            outside(previous, region.start)
        segments.append(
            {
                "content": text[region.start : region.end],
                "learn": region.weight > 0,
                "weight": float(region.weight),
                "segment_type": region.type,
            }
        )
        previous = region.end
    if previous < len(text):
        outside(previous, len(text))
    return {"segments": segments, "separator": ""}


FORMAT = FormatSpec(
    name="structured",
    keys=("segments", "separator"),
    parse=parse_structured,
    write=to_structured,
    identifying_keys=("segments",),
    text_field="segments",
)
