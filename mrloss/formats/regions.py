"""Region, RegionText and the checks every format shares (weights, keys, types, overlaps)."""

from __future__ import annotations

import heapq
import math
import struct
from dataclasses import dataclass, field
from numbers import Integral, Real

from mrloss.formats.errors import FormatError

DEFAULT_TYPE = "default"
OUTSIDE = "(outside)"  # the label of text (and tokens) outside every region, in statistics and views
OVERLAP_MODES = ("error", "max")


@dataclass(frozen=True)
class Region:
    """Characters ``text[start:end]`` (half-open, Python code-point indices) learned with ``weight``."""

    start: int
    end: int
    weight: float
    type: str = DEFAULT_TYPE


@dataclass(frozen=True)
class RegionText:
    """The exact text the model sees plus its weighted regions.

    ``regions`` are sorted by ``start``, never overlap and never empty; every character outside them has
    ``default_weight``. A character inside a region has the region's weight (even when it is below
    ``default_weight``). ``has_special_tokens``: the text holds its own special tokens (a rendered chat
    template), so tokenizing it adds none (no BOS, no appended EOS).
    """

    text: str
    regions: tuple[Region, ...] = field(default_factory=tuple)
    default_weight: float = 0.0
    has_special_tokens: bool = False

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple(self.regions))
        if not isinstance(self.text, str):
            raise FormatError(f"must be a string, got {type(self.text).__name__}", field="text")
        check_weight(self.default_weight, "default_weight")
        previous_end = 0
        for index, region in enumerate(self.regions):
            name = f"regions[{index}]"
            check_weight(region.weight, f"{name}.weight", region.start)
            if not 0 <= region.start < region.end <= len(self.text):
                raise FormatError(
                    f"[{region.start}, {region.end}) is empty or outside the text (length {len(self.text)})",
                    field=name,
                    position=region.start,
                )
            if region.start < previous_end:
                raise FormatError("regions must be sorted and must not overlap", field=name, position=region.start)
            previous_end = region.end

    def char_weights(self) -> list[float]:
        """One weight per character of ``text``.

        Returns:
            ``len(text)`` floats: the region's weight inside a region, else ``default_weight``.
        """
        weights = [float(self.default_weight)] * len(self.text)
        for region in self.regions:
            weights[region.start : region.end] = [float(region.weight)] * (region.end - region.start)
        return weights

    def char_region_ids(self) -> list[int]:
        """One region index per character of ``text``.

        Returns:
            ``len(text)`` ints: the index into ``regions``, -1 outside every region.
        """
        ids = [-1] * len(self.text)
        for index, region in enumerate(self.regions):
            ids[region.start : region.end] = [index] * (region.end - region.start)
        return ids


def check_weight(value, field: str, position: int | None = None, sample_id=None) -> float:
    """A weight checked: a non-negative real number finite in float32, the dtype training uses it in (bools are
    not numbers; 1e39 is inf in float32).

    Args:
        value: the weight as read from the sample.
        field, position, sample_id: named in the FormatError.

    Returns:
        ``value`` as a float.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise FormatError(
            f"weight must be a number, got {value!r} ({type(value).__name__})",
            sample_id=sample_id,
            field=field,
            position=position,
        )
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise FormatError(f"weight must be finite, got {value!r}", sample_id=sample_id, field=field, position=position)
    if value < 0:
        raise FormatError(f"weight must be >= 0, got {value!r}", sample_id=sample_id, field=field, position=position)
    if math.isinf(_as_float32(value)):
        raise FormatError(
            f"weight must be finite in float32 (at most ~3.4e38), got {value!r}",
            sample_id=sample_id,
            field=field,
            position=position,
        )
    return value


def _as_float32(value: float) -> float:
    """``value`` rounded to float32 (inf beyond its range), without torch or numpy."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # older Pythons raise instead of rounding to inf
        return math.inf


def check_int(value, field: str, sample_id=None) -> int:
    """An integer checked (bools are not integers).

    Args:
        value: a character offset as read from the sample; ``field`` and ``sample_id`` name it in the FormatError.

    Returns:
        ``value`` as an int.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise FormatError(
            f"must be an integer, got {value!r} ({type(value).__name__})", sample_id=sample_id, field=field
        )
    return int(value)


def check_str(value, field: str, sample_id=None, position: int | None = None, allow_empty: bool = True) -> str:
    """A string checked.

    Args:
        value: as read from the sample.
        field, sample_id, position: named in the FormatError.
        allow_empty: False: ``""`` is an error.

    Returns:
        ``value``.
    """
    if not isinstance(value, str):
        raise FormatError(
            f"must be a string, got {value!r} ({type(value).__name__})",
            sample_id=sample_id,
            field=field,
            position=position,
        )
    if not allow_empty and not value:
        raise FormatError("must not be empty", sample_id=sample_id, field=field, position=position)
    return value


def check_mapping(value, field: str, allowed: tuple[str, ...], sample_id=None, position: int | None = None) -> dict:
    """An object checked: a dict whose keys are all in ``allowed`` (a typo like ``weigth`` is an error).

    Args:
        value: as read from the sample.
        field: its name; an unknown key is reported as ``field.key``.
        allowed: the keys it may hold.
        sample_id, position: named in the FormatError.

    Returns:
        ``value``.
    """
    if not isinstance(value, dict):
        raise FormatError(
            f"must be an object, got {type(value).__name__}", sample_id=sample_id, field=field, position=position
        )
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise FormatError(
            f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})",
            sample_id=sample_id,
            field=f"{field}.{unknown[0]}",
            position=position,
        )
    return value


def check_list(value, field: str, sample_id=None) -> list:
    """A list checked (a list or a tuple).

    Args:
        value: the regions, segments or messages as read from the sample.
        field, sample_id: named in the FormatError.

    Returns:
        ``list(value)`` (a copy).
    """
    if not isinstance(value, (list, tuple)):
        raise FormatError(f"must be a list, got {type(value).__name__}", sample_id=sample_id, field=field)
    return list(value)


def resolve_overlaps(regions: list[Region], names: list[str], overlap: str, sample_id=None) -> list[Region]:
    """Sorted, disjoint regions from possibly overlapping ones.

    Args:
        regions: the regions, in the sample's order.
        names: ``names[i]`` names ``regions[i]`` in errors.
        overlap: ``"error"`` raises FormatError on the first overlap; ``"max"`` splits the regions so that each
            character keeps the highest weight covering it (on ties, the region listed first).
        sample_id: named in errors.

    Returns:
        The regions sorted by start, none overlapping.
    """
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}")
    order = sorted(range(len(regions)), key=lambda i: (regions[i].start, regions[i].end))
    overlapping = any(regions[b].start < regions[a].end for a, b in zip(order, order[1:]))
    if not overlapping:
        return [regions[i] for i in order]
    if overlap == "error":
        furthest = order[0]
        for index in order[1:]:
            if regions[index].start < regions[furthest].end:
                raise FormatError(
                    f"overlaps {names[furthest]} [{regions[furthest].start}, {regions[furthest].end}) from "
                    f"character {regions[index].start}; fix the offsets or parse with overlap='max'",
                    sample_id=sample_id,
                    field=names[index],
                    position=regions[index].start,
                )
            if regions[index].end > regions[furthest].end:
                furthest = index
    return _max_weight_pieces(regions)


def _max_weight_pieces(regions: list[Region]) -> list[Region]:
    """Sweep over the region borders with a heap of the open regions (O(n log n) for n regions): each piece
    between two borders belongs to the highest-weight region covering it (on ties, the one listed first);
    neighbouring pieces of one region are merged."""
    starts = sorted(range(len(regions)), key=lambda i: regions[i].start)
    borders = sorted({r.start for r in regions} | {r.end for r in regions})
    open_regions: list[tuple[float, int]] = []  # (-weight, index): the top is the owner
    pieces: list[Region] = []
    piece_owner, next_start = -1, 0
    for left, right in zip(borders, borders[1:]):
        while next_start < len(starts) and regions[starts[next_start]].start <= left:
            index = starts[next_start]
            heapq.heappush(open_regions, (-regions[index].weight, index))
            next_start += 1
        while open_regions and regions[open_regions[0][1]].end <= left:
            heapq.heappop(open_regions)  # closed regions leave lazily, once they reach the top
        if not open_regions:
            continue
        owner = open_regions[0][1]
        if pieces and piece_owner == owner and pieces[-1].end == left:
            pieces[-1] = Region(pieces[-1].start, right, pieces[-1].weight, pieces[-1].type)
        else:
            pieces.append(Region(left, right, regions[owner].weight, regions[owner].type))
        piece_owner = owner
    return pieces
