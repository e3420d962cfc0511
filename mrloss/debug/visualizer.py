"""LossMaskVisualizer: see which tokens a sample teaches, with what weight, in which region.

One analysis (``LossMaskVisualizer.analyze``) feeds two views: coloured terminal text
(``print_detailed_analysis``) and a self-contained HTML page (``to_html``).
"""

from __future__ import annotations

import bisect
import html
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Sequence, TextIO

from mrloss.formats.terminal import escape_control
from mrloss.metrics import OUTSIDE

MAX_LISTED_WARNINGS = 20
MAX_JOINED_TOKENS = 16  # without offsets, at most this many tokens are decoded together (keeps it linear)
# terminal background colours (xterm 256) by weight: (upper bound inclusive, colour, legend label)
TERMINAL_BUCKETS = ((0.5, 153, "(0, 0.5]"), (1.0, 114, "(0.5, 1]"), (2.0, 221, "(1, 2]"), (float("inf"), 209, "> 2"))
REGION_TYPE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


@dataclass
class TokenView:
    """One token: ``position`` in the sequence, its id, the text it adds (``""`` when its bytes only
    complete a character in a later token), weight and region (index, -1 outside; type or None)."""

    position: int
    token_id: int
    text: str
    weight: float
    region: int = -1
    region_type: str | None = None


@dataclass
class RegionRow:
    """One line of the region table: ``weight`` is the weight of its tokens ("a..b" when they differ),
    ``share`` = weight_sum / total weight of the sample (None when the total is 0)."""

    label: str
    region_type: str
    tokens: int
    weight: str
    weight_sum: float
    share: float | None


@dataclass
class MaskAnalysis:
    tokens: list[TokenView]
    rows: list[RegionRow]
    total_weight: float
    learned_tokens: int
    warnings: list[str] = field(default_factory=list)


class LossMaskVisualizer:
    """Show a sample's loss mask (0/1 or float token weights) token by token, per region, with warnings.

    ``input_ids [T]`` and ``loss_mask [T]`` are lists or 1-D tensors aligned with each other (the
    ``token_weights`` of ``mrloss.data.encode``). ``region_info`` is ``encode``'s output (``region_ids``,
    ``region_types``, ``offsets``, ``truncated_regions``; any may be missing); pass the sample's
    ``region_text`` (a ``RegionText``) as well to be warned about tokens straddling a region border.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def analyze(self, input_ids, loss_mask, region_info: Mapping | None = None, *, region_text=None) -> MaskAnalysis:
        """Token views, the region table and the warnings of one sample."""
        input_ids = _as_list(input_ids, "input_ids", int)
        weights = _as_list(loss_mask, "loss_mask", float)
        if len(weights) != len(input_ids):
            raise ValueError(f"loss_mask has {len(weights)} entries but input_ids has {len(input_ids)}")
        region_info = dict(region_info or {})
        region_ids = _as_list(region_info.get("region_ids", [-1] * len(input_ids)), "region_info['region_ids']", int)
        if len(region_ids) != len(input_ids):
            raise ValueError(
                f"region_info['region_ids'] has {len(region_ids)} entries but input_ids has {len(input_ids)}"
            )
        region_types = list(region_info.get("region_types") or [])
        if region_text is not None and not region_types:
            region_types = [region.type for region in region_text.regions]
        for position, region in enumerate(region_ids):
            if not -1 <= region < len(region_types):
                raise ValueError(
                    f"region_info['region_ids'][{position}] = {region} is not -1 or an index into "
                    f"region_types (length {len(region_types)})"
                )
        texts = token_texts(
            self.tokenizer,
            input_ids,
            region_info.get("offsets"),
            region_text.text if region_text is not None else None,
        )
        tokens = [
            TokenView(
                k,
                input_ids[k],
                texts[k],
                weights[k],
                region_ids[k],
                region_types[region_ids[k]] if region_ids[k] >= 0 else None,
            )
            for k in range(len(input_ids))
        ]
        total_weight = sum(weights)
        has_regions = "region_ids" in region_info or region_text is not None
        rows = _region_rows(tokens, region_types, total_weight) if has_regions else _weight_rows(tokens, total_weight)
        warnings = _warnings(tokens, region_types, region_info, region_text)
        return MaskAnalysis(tokens, rows, total_weight, sum(w > 0 for w in weights), warnings)

    def print_detailed_analysis(
        self,
        input_ids,
        loss_mask,
        region_info: Mapping | None = None,
        *,
        region_text=None,
        color: bool | None = None,
        file: TextIO | None = None,
    ) -> str:
        """Print the tokens coloured by weight, the region table and the warnings; return the printed text.

        ``color=None`` colours when ``file`` (default stdout) is a terminal and ``NO_COLOR`` is unset or empty;
        without colour, runs of weighted tokens are written ``⟦weight type│text⟧``.
        """
        file = sys.stdout if file is None else file
        if color is None:
            color = hasattr(file, "isatty") and file.isatty() and not os.environ.get("NO_COLOR")
        text = render_terminal(self.analyze(input_ids, loss_mask, region_info, region_text=region_text), color)
        print(text, file=file)
        return text

    def to_html(
        self,
        input_ids,
        loss_mask,
        region_info: Mapping | None = None,
        *,
        region_text=None,
        title: str = "mrloss loss mask",
    ) -> str:
        """One self-contained HTML page (inline CSS, no script, no network): each token's background shows its
        weight, its tooltip the token's position, id, text, weight and region; then the region table and warnings."""
        return render_html(self.analyze(input_ids, loss_mask, region_info, region_text=region_text), title)


def token_texts(tokenizer, input_ids: Sequence[int], offsets=None, text: str | None = None) -> list[str]:
    """The text each token adds to the shown sequence, cut only between characters (never a U+FFFD for
    text that has none).

    The characters come from ``text`` and the tokens' character ``offsets`` (``encode``'s, or the tokenizer's
    on the decoded sequence when it tokenizes back to ``input_ids``): each character goes to the last token
    whose span holds it (a byte-level token holding only part of a character shows ``""``), a token with no
    characters (BOS, an appended EOS) shows its own decoding. Otherwise, tokens are decoded in runs until a
    run decodes cleanly.
    """
    input_ids = list(input_ids)
    if offsets is not None and text is not None and len(offsets) == len(input_ids):
        return _texts_from_offsets(tokenizer, input_ids, offsets, text)
    decoded = _decode(tokenizer, input_ids)
    try:
        again = tokenizer(decoded, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers give no offsets
        again = None
    if again is not None and list(again["input_ids"]) == input_ids:
        return _texts_from_offsets(tokenizer, input_ids, again["offset_mapping"], decoded)
    return _texts_from_decoded_runs(tokenizer, input_ids)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _texts_from_offsets(tokenizer, input_ids: list[int], offsets, text: str) -> list[str]:
    """Characters of ``text`` per token, each to the last token whose ``[start, end)`` holds it (see
    ``token_texts``); linear in the number of tokens."""
    spans = [(int(start), int(end)) for start, end in offsets]
    next_start, upcoming = [0] * len(spans), len(text)
    for k in range(len(spans) - 1, -1, -1):  # start of the next token with characters
        next_start[k] = upcoming
        if spans[k][1] > spans[k][0]:
            upcoming = spans[k][0]
    texts, shown = [], None
    for k, (start, end) in enumerate(spans):
        if end <= start:
            texts.append(_decode(tokenizer, input_ids[k : k + 1]))
            continue
        shown = start if shown is None else shown
        if next_start[k] < end or end <= shown:  # a later token completes these characters, or none is new
            texts.append("")
            continue
        texts.append(text[shown:end])
        shown = end
    return texts


def _texts_from_decoded_runs(tokenizer, input_ids: list[int]) -> list[str]:
    """Without offsets: tokens decoded together while their decoding ends in U+FFFD (a character continued in
    the next token; at most ``MAX_JOINED_TOKENS``), the text going to the token that completes it and ``""`` to
    the others."""
    texts, start = [], 0
    for k in range(len(input_ids)):
        decoded = _decode(tokenizer, input_ids[start : k + 1])
        if decoded.endswith("\ufffd") and k + 1 < len(input_ids) and k + 1 - start < MAX_JOINED_TOKENS:
            texts.append("")
            continue
        texts.append(decoded)
        start = k + 1
    return texts


def _as_list(values, name: str, kind) -> list:
    if hasattr(values, "tolist"):  # torch tensor, numpy array
        if getattr(values, "ndim", 1) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list or a 1-D tensor, got {type(values).__name__}")
    try:
        return [kind(value) for value in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must hold numbers") from None


def _weight_label(weights: list[float]) -> str:
    if not weights:
        return "-"
    low, high = min(weights), max(weights)
    return f"{low:g}" if low == high else f"{low:g}..{high:g}"


def _share(weight_sum: float, total_weight: float) -> float | None:
    return weight_sum / total_weight if total_weight > 0 else None


def _region_rows(tokens: list[TokenView], region_types: list[str], total_weight: float) -> list[RegionRow]:
    """One row per region (also those left without tokens) and one for the tokens outside every region."""
    members: dict[int, list[float]] = {r: [] for r in range(-1, len(region_types))}
    for token in tokens:
        members[token.region].append(token.weight)
    rows = [
        RegionRow(
            str(r),
            region_types[r],
            len(members[r]),
            _weight_label(members[r]),
            sum(members[r]),
            _share(sum(members[r]), total_weight),
        )
        for r in range(len(region_types))
    ]
    rows.append(
        RegionRow(
            "-",
            OUTSIDE,
            len(members[-1]),
            _weight_label(members[-1]),
            sum(members[-1]),
            _share(sum(members[-1]), total_weight),
        )
    )
    return rows


def _weight_rows(tokens: list[TokenView], total_weight: float) -> list[RegionRow]:
    """Without region information: one row per distinct weight."""
    counts: dict[float, int] = {}
    for token in tokens:
        counts[token.weight] = counts.get(token.weight, 0) + 1
    return [
        RegionRow("-", f"weight {w:g}", n, f"{w:g}", w * n, _share(w * n, total_weight))
        for w, n in sorted(counts.items())
    ]


def _describe(region_types: list[str], region: int) -> str:
    return f"region {region} ({region_types[region]})"


def _warnings(tokens: list[TokenView], region_types: list[str], region_info: dict, region_text) -> list[str]:
    warnings = []
    if tokens and not any(token.weight > 0 for token in tokens):
        warnings.append("no token has a weight > 0: this sample teaches nothing")
    untruncated_length = region_info.get("untruncated_length")
    if untruncated_length is not None and untruncated_length > len(tokens):
        warnings.append(f"sample truncated: {len(tokens)} of {untruncated_length} tokens kept")
    truncated = sorted(set(region_info.get("truncated_regions") or []))
    counts = {r: 0 for r in range(len(region_types))}
    for token in tokens:
        if token.region >= 0:
            counts[token.region] += 1
    for region in range(len(region_types)):
        if region in truncated:
            warnings.append(f"{_describe(region_types, region)} cut by truncation: {counts[region]} token(s) left")
        elif counts[region] == 0:
            warnings.append(
                f"{_describe(region_types, region)} has no tokens after tokenization (its characters "
                f"share tokens with a neighbour that took them)"
            )
    offsets = region_info.get("offsets")
    if region_text is not None and offsets is not None:
        warnings += _straddle_warnings(tokens, offsets, region_text)
    if len(warnings) > MAX_LISTED_WARNINGS:
        warnings = warnings[:MAX_LISTED_WARNINGS] + [f"... and {len(warnings) - MAX_LISTED_WARNINGS} more warning(s)"]
    return warnings


def _straddle_warnings(tokens: list[TokenView], offsets, region_text) -> list[str]:
    """A token whose characters ``[start, end)`` contain a region border strictly inside."""
    borders = sorted(
        {(region.start, index, "start") for index, region in enumerate(region_text.regions)}
        | {(region.end, index, "end") for index, region in enumerate(region_text.regions)}
    )
    positions = [border[0] for border in borders]
    warnings = []
    for token, (start, end) in zip(tokens, offsets):
        first = bisect.bisect_right(positions, start)
        for char, region, side in borders[first : bisect.bisect_left(positions, end)]:
            assigned = f"region {token.region} ({token.region_type})" if token.region >= 0 else "no region"
            warnings.append(
                f"token {token.position} {region_text.text[start:end]!r} (characters [{start}, {end})) "
                f"straddles the {side} of region {region} ({region_text.regions[region].type}) at "
                f"character {char}; it counts for {assigned} with weight {token.weight:g}"
            )
    return warnings


TABLE_HEADER = ("region", "type", "tokens", "weight", "Σ weight", "share")


def _table_cells(analysis: MaskAnalysis) -> list[tuple[str, ...]]:
    """The region table as text cells (both views): one line per row, then the sample's total."""
    cells = [
        (
            row.label,
            row.region_type,
            str(row.tokens),
            row.weight,
            f"{row.weight_sum:g}",
            "-" if row.share is None else f"{100 * row.share:.1f}%",
        )
        for row in analysis.rows
    ]
    cells.append(
        (
            "all",
            f"{analysis.learned_tokens} learned",
            str(len(analysis.tokens)),
            "",
            f"{analysis.total_weight:g}",
            "100.0%" if analysis.total_weight > 0 else "-",
        )
    )
    return cells


def _format_table(analysis: MaskAnalysis) -> list[str]:
    """The region table for a terminal (region types from data shown with control characters escaped)."""
    lines = [TABLE_HEADER] + [tuple(map(escape_control, cells)) for cells in _table_cells(analysis)]
    widths = [max(_display_width(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]

    def fmt(line):
        return "  ".join(cell + " " * (width - _display_width(cell)) for cell, width in zip(line, widths)).rstrip()

    return [fmt(lines[0]), fmt(tuple("-" * w for w in widths))] + [fmt(line) for line in lines[1:]]


def _display_width(text: str) -> int:
    """Terminal columns: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _terminal_colour(weight: float) -> int:
    return next(colour for bound, colour, _ in TERMINAL_BUCKETS if weight <= bound)


def render_terminal(analysis: MaskAnalysis, color: bool) -> str:
    """Text view: summary, tokens (ANSI-coloured, or ⟦weight type│text⟧ runs), region table, warnings. Text and
    region types from data reach it with their control characters escaped (`escape_control`)."""
    lines = [
        f"Loss mask: {len(analysis.tokens)} tokens, {analysis.learned_tokens} learned (weight > 0), "
        f"total weight {analysis.total_weight:g}"
    ]
    if color:
        legend = " ".join(f"\x1b[48;5;{colour};38;5;16m {label} \x1b[0m" for _, colour, label in TERMINAL_BUCKETS)
        lines.append(f"weights: \x1b[90m0\x1b[0m {legend}")
        pieces = []
        for token in analysis.tokens:
            if not token.text:
                continue
            style = "\x1b[90m" if token.weight <= 0 else f"\x1b[48;5;{_terminal_colour(token.weight)};38;5;16m"
            text = escape_control(token.text)
            pieces.append("\x1b[0m↵\n".join(style + part for part in text.split("\n")) + "\x1b[0m")
        lines.append("".join(pieces))
    else:
        lines.append("".join(_plain_runs(analysis.tokens)))
    lines += ["", "Regions:"] + _format_table(analysis)
    if analysis.warnings:
        lines += ["", "Warnings:"] + [f"  ! {escape_control(warning)}" for warning in analysis.warnings]
    else:
        lines += ["", "Warnings: none"]
    return "\n".join(lines)


def _plain_runs(tokens: list[TokenView]) -> list[str]:
    """Runs of tokens with the same (weight, region): weight-0 runs bare, others as ⟦weight type│text⟧
    (``⟦weight│text⟧`` outside regions); control characters escaped. Linear in the text's length."""
    runs: list[tuple[float, int, str | None, list[str]]] = []
    for token in tokens:
        if runs and runs[-1][:2] == (token.weight, token.region):
            runs[-1][3].append(token.text)
        else:
            runs.append((token.weight, token.region, token.region_type, [token.text]))
    pieces = []
    for weight, _, region_type, texts in runs:
        text = escape_control("".join(texts))
        label = f" {escape_control(region_type)}" if region_type else ""
        pieces.append(text if weight <= 0 else f"⟦{weight:g}{label}│{text}⟧")
    return pieces


HTML_STYLE = """
body { font-family: "Noto Sans CJK SC", "WenQuanYi Micro Hei", "PingFang SC", "Microsoft YaHei", "Source Han Sans SC",
       "DejaVu Sans", sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 24px; }
.tokens { white-space: pre-wrap; line-height: 2.1; font-size: 16px; border: 1px solid #ddd; padding: 12px; }
.tok { border-right: 1px solid rgba(0,0,0,0.18); padding: 2px 0; border-bottom: 3px solid transparent; }
.tok.zero { color: #8a8a8a; }
.tok.part { display: inline-block; min-width: 2px; }
.tok:hover { outline: 2px solid #000; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 14px; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
.warnings li { color: #a33; }
"""


HTML_LOW, HTML_HIGH = (255, 236, 160), (235, 85, 30)  # backgrounds of the smallest and largest positive weight


def _html_background(weight: float, low: float, high: float) -> str:
    """Weight 0: none; positive weights from light yellow (``low``, the sample's smallest positive weight) to
    orange-red (``high``, its largest)."""
    if weight <= 0:
        return "transparent"
    fraction = (weight - low) / (high - low) if high > low else 1.0
    return "rgb({}, {}, {})".format(*(round(a + (b - a) * fraction) for a, b in zip(HTML_LOW, HTML_HIGH)))


def render_html(analysis: MaskAnalysis, title: str) -> str:
    """Self-contained page of an analysis (see ``LossMaskVisualizer.to_html``)."""
    esc = html.escape
    positive = [token.weight for token in analysis.tokens if token.weight > 0]
    low, high = (min(positive), max(positive)) if positive else (0.0, 0.0)
    type_names = sorted({token.region_type for token in analysis.tokens if token.region_type is not None})
    type_colour = {name: REGION_TYPE_COLOURS[i % len(REGION_TYPE_COLOURS)] for i, name in enumerate(type_names)}
    spans = []
    for token in analysis.tokens:
        region = f"{token.region} ({token.region_type})" if token.region >= 0 else "none"
        tip = f"#{token.position}  id {token.token_id}  text {token.text!r}  weight {token.weight:g}  region {region}"
        classes = "tok" + (" zero" if token.weight <= 0 else "") + ("" if token.text else " part")
        style = f"background: {_html_background(token.weight, low, high)};"
        if token.region_type is not None:
            style += f" border-bottom-color: {type_colour[token.region_type]};"
        text = esc(token.text).replace("\n", "↵\n")
        spans.append(
            f'<span class="{classes}" style="{style}" title="{esc(tip)}" data-position="{token.position}" '
            f'data-id="{token.token_id}" data-weight="{token.weight:g}">{text}</span>'
        )
    weight_steps = sorted({token.weight for token in analysis.tokens})
    legend = "".join(
        f'<span style="background: {_html_background(w, low, high)}">weight {w:g}</span>' for w in weight_steps
    )
    legend += "".join(
        f'<span style="border-bottom: 3px solid {colour}">{esc(name)}</span>' for name, colour in type_colour.items()
    )
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in line) + "</tr>" for line in _table_cells(analysis)
    )
    warnings = "".join(f"<li>{esc(warning)}</li>" for warning in analysis.warnings) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{HTML_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>{len(analysis.tokens)} tokens, {analysis.learned_tokens} learned (weight &gt; 0), total weight
{analysis.total_weight:g}. Background: token weight; underline: region type; hover a token for its details.</p>
<p class="legend">{legend}</p>
<div class="tokens">{"".join(spans)}</div>
<h2>Regions</h2>
<table><tr>{"".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER)}</tr>{rows}</table>
<h2>Warnings</h2>
<ul class="warnings">{warnings}</ul>
</body></html>
"""
