"""position_based: ``{"text", "learning_regions": [{"start_char", "end_char", "weight", "region_type"}],
"default_weight"}`` with half-open ``[start_char, end_char)`` code-point offsets into ``text``."""

from __future__ import annotations

from mrloss.formats.errors import FormatError
from mrloss.formats.regions import (
    DEFAULT_TYPE,
    Region,
    RegionText,
    check_int,
    check_list,
    check_mapping,
    check_str,
    check_weight,
    resolve_overlaps,
)
from mrloss.formats.spec import FormatSpec

REGION_KEYS = ("start_char", "end_char", "weight", "region_type")


def parse_position_based(sample: dict, *, overlap: str = "error", sample_id=None) -> RegionText:
    """RegionText of a position_based sample.

    Args:
        sample: ``{"text", "learning_regions", "default_weight"}`` (top-level keys checked by the dispatcher).
        overlap: ``"error"``: overlapping regions raise; ``"max"``: each character keeps the highest weight.
        sample_id: named in errors.

    Returns:
        The RegionText (regions sorted and disjoint).
    """
    if "text" not in sample:
        raise FormatError("missing (position_based samples need 'text')", sample_id=sample_id, field="text")
    text = check_str(sample["text"], "text", sample_id)
    default_weight = check_weight(sample.get("default_weight", 0.0), "default_weight", sample_id=sample_id)
    entries = check_list(sample.get("learning_regions", []), "learning_regions", sample_id)
    regions, names = [], []
    for index, entry in enumerate(entries):
        name = f"learning_regions[{index}]"
        check_mapping(entry, name, REGION_KEYS, sample_id)
        for key in ("start_char", "end_char"):
            if key not in entry:
                raise FormatError("missing", sample_id=sample_id, field=f"{name}.{key}")
        start = check_int(entry["start_char"], f"{name}.start_char", sample_id)
        end = check_int(entry["end_char"], f"{name}.end_char", sample_id)
        if start < 0 or start > len(text):
            raise FormatError(
                f"start_char {start} is outside the text (length {len(text)})",
                sample_id=sample_id,
                field=f"{name}.start_char",
                position=start,
            )
        if end > len(text):
            raise FormatError(
                f"end_char {end} is beyond the end of the text (length {len(text)})",
                sample_id=sample_id,
                field=f"{name}.end_char",
                position=end,
            )
        if start >= end:
            raise FormatError(
                f"start_char {start} must be < end_char {end}",
                sample_id=sample_id,
                field=f"{name}.end_char",
                position=start,
            )
        weight = check_weight(entry.get("weight", 1.0), f"{name}.weight", start, sample_id)
        region_type = check_str(
            entry.get("region_type", DEFAULT_TYPE), f"{name}.region_type", sample_id, start, allow_empty=False
        )
        regions.append(Region(start, end, weight, region_type))
        names.append(name)
    return RegionText(text, resolve_overlaps(regions, names, overlap, sample_id), default_weight)


def to_position_based(region_text: RegionText) -> dict:
    """The position_based sample of ``region_text``.

    Args:
        region_text: any RegionText.

    Returns:
        ``{"text", "learning_regions", "default_weight"}``.
    """
    return {
        "text": region_text.text,
        "learning_regions": [
            {"start_char": r.start, "end_char": r.end, "weight": float(r.weight), "region_type": r.type}
            for r in region_text.regions
        ],
        "default_weight": float(region_text.default_weight),
    }


FORMAT = FormatSpec(
    name="position_based",
    keys=("text", "learning_regions", "default_weight"),
    parse=parse_position_based,
    write=to_position_based,
    identifying_keys=("learning_regions",),
    parse_options=("overlap",),
)
