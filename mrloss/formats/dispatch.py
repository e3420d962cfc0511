"""parse / convert: pick the format of a sample and hand it to that format's module.

Every format is one `FormatSpec` (exported by its module) and one line in `FORMAT_SPECS`; the functions of
`mrloss.formats` are those of the `FormatRegistry` built from that list.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from mrloss.formats import messages, position_based, structured, tag_based
from mrloss.formats.errors import FormatError
from mrloss.formats.regions import RegionText
from mrloss.formats.spec import FormatSpec

# the formats, one line each: the plain-text ones (parse, write, convert) in the order FORMATS lists them, then
# the chat samples, rendered with the tokenizer's chat template (parse only)
FORMAT_SPECS = (position_based.FORMAT, tag_based.FORMAT, structured.FORMAT, messages.FORMAT)
# top-level keys any sample may carry besides its format's keys: metadata, kept by `convert`, never read
METADATA_KEYS = ("id", "source", "language", "meta", "metadata")
# what to do with any other top-level key: "error" (a FormatError naming it), "keep" (metadata too), or a list of
# more key names that are metadata (the rest are errors)
EXTRA_KEYS = ("error", "keep")
NEAR_MISS_CUTOFF = 0.8  # difflib ratio: "defualt_weight" / "segment" are typos, "id" / "source" are metadata


class FormatRegistry:
    """The formats of a list of `FormatSpec` and what is done with samples in them: `parse`, `detect_format`,
    `to_format`, `convert` (`mrloss.formats`' functions are those of the registry of `FORMAT_SPECS`).

    Args:
        specs: the formats; names unique, exactly one fallback (`FormatSpec.is_fallback`: the format of a sample
            no other format claims). Ties in detection go to the one listed first.
    """

    def __init__(self, specs: Sequence[FormatSpec]):
        self.specs = {spec.name: spec for spec in specs}
        fallbacks = [spec.name for spec in specs if spec.is_fallback]
        if len(self.specs) != len(specs) or len(fallbacks) != 1:
            raise ValueError(f"format names must be unique and exactly one format the fallback, got {fallbacks}")
        writable = tuple(spec.name for spec in specs if spec.write is not None)
        self.formats = writable  # plain-text formats: parse, write, convert
        self.input_formats = writable + tuple(name for name in self.specs if name not in writable)
        self._detection_order = sorted((s for s in specs if not s.is_fallback), key=lambda s: not s.detect_first)
        self._fallback = self.specs[fallbacks[0]]
        self._all_keys = sorted({key for spec in specs for key in spec.keys})

    def detect_format(self, sample: dict) -> str:
        """The format of a raw sample by its keys: the first format that claims it (`FormatSpec.claims`; those
        with ``detect_first`` first), else the fallback. With `FORMAT_SPECS`: ``messages``, or TRL's ``prompt``
        and ``completion`` (both, or either as a list of messages) -> messages; ``learning_regions`` ->
        position_based; ``segments`` -> structured; otherwise tag_based.

        Args:
            sample: a raw sample (dict).

        Returns:
            The name of its format (one of ``INPUT_FORMATS``).
        """
        return next((spec for spec in self._detection_order if spec.claims(sample)), self._fallback).name

    def parse(
        self,
        sample: dict,
        format: str = "auto",
        *,
        overlap: str = "error",
        extra_keys="error",
        sample_id=None,
        tokenizer=None,
    ) -> RegionText:
        """RegionText of one raw sample in ``format``.

        A sample holds its format's keys and, as metadata that is kept but never read, `METADATA_KEYS` (``id``,
        ``source``, ``language``, ``meta``, ``metadata``). Any other top-level key would be silently dropped, so it
        raises, naming the key (and, for a near miss such as ``defualt_weight``, the key it is close to), unless
        ``extra_keys`` allows it. Near misses of a format's keys and keys of another format (``text`` next to
        ``segments``) raise always.

        Args:
            sample: the raw sample (dict).
            format: ``"auto"`` (`detect_format`) or one of ``INPUT_FORMATS``.
            overlap: ``"error"`` | ``"max"``, for overlapping position_based regions.
            extra_keys: ``"error"``; ``"keep"`` makes every other top-level key metadata; a list of names makes
                those metadata.
            sample_id: named in errors (e.g. ``"train.jsonl:17"``).
            tokenizer: a tokenizer with a chat template (any object with ``apply_chat_template``), needed by the
                messages format only.

        Returns:
            The sample's RegionText (text, sorted disjoint regions, default weight).

        Raises:
            FormatError naming ``sample_id``, the field and the character position; ValueError for a bad
            ``format``, ``overlap`` or ``extra_keys``.
        """
        if format not in ("auto",) + self.input_formats:
            raise ValueError(f"format must be 'auto' or one of {self.input_formats}, got {format!r}")
        allowed_extra = _allowed_extra_keys(extra_keys)
        if not isinstance(sample, dict):
            raise FormatError(f"a sample must be an object, got {type(sample).__name__}", sample_id=sample_id)
        spec = self.specs[self.detect_format(sample) if format == "auto" else format]
        self._check_keys(sample, spec, allowed_extra, sample_id)
        options = {"overlap": overlap, "tokenizer": tokenizer}
        region_text = spec.parse(sample, sample_id=sample_id, **{name: options[name] for name in spec.parse_options})
        if not region_text.text:
            raise FormatError("the sample has no text", sample_id=sample_id, field=spec.text_field)
        return region_text

    def _check_keys(self, sample: dict, spec: FormatSpec, allowed_extra: frozenset | None, sample_id) -> None:
        """FormatError for the first top-level key of ``sample`` that a ``spec`` sample cannot carry: a key that
        marks another format; unless named in ``allowed_extra``, a near miss of a format key (a typo, even with
        "keep"); unless allowed (``allowed_extra`` None: every key), any other unknown key."""
        own, chosen = spec.keys, spec.name
        for key in sample:
            if key in own or key in METADATA_KEYS:
                continue
            if any(key in other.marks for other in self.specs.values() if other is not spec):
                raise FormatError(
                    f"key {key!r} does not belong to a {chosen} sample (keys: {', '.join(own)})",
                    sample_id=sample_id,
                    field=key,
                )
            if allowed_extra is not None and key in allowed_extra:
                continue  # named as metadata by the caller
            if key not in self._all_keys:
                close = difflib.get_close_matches(str(key), self._all_keys, n=1, cutoff=NEAR_MISS_CUTOFF)
                if close:
                    raise FormatError(
                        f"unknown key {key!r}; did you mean {close[0]!r}?", sample_id=sample_id, field=key
                    )
            if allowed_extra is not None:
                raise FormatError(
                    f"unknown key {key!r} (a {chosen} sample has {', '.join(own)} and metadata "
                    f"{', '.join(METADATA_KEYS)}): move it under 'meta', or keep unknown keys (extra_keys='keep'; "
                    "--extra-keys keep; config data.extra_keys: keep)",
                    sample_id=sample_id,
                    field=str(key),
                )

    def to_format(self, region_text: RegionText, format: str, *, sample_id=None) -> dict:
        """The raw sample of ``region_text`` in ``format``; parsing it gives the same ``char_weights()``.

        Args:
            region_text: a RegionText of plain text (not a rendered chat template: ``has_special_tokens`` False).
            format: one of ``FORMATS``.
            sample_id: named in errors.

        Returns:
            The raw sample (dict) in ``format``.

        Raises:
            FormatError where ``format`` cannot represent ``region_text``; ValueError for a bad ``format``.
        """
        if format not in self.formats:
            raise ValueError(f"format must be one of {self.formats}, got {format!r}")
        if region_text.has_special_tokens:
            raise FormatError(
                f"a rendered chat template cannot be written as {format} (it would be tokenized with added special "
                "tokens): keep the messages sample",
                sample_id=sample_id,
                field="text",
            )
        try:
            return self.specs[format].write(region_text)
        except FormatError as error:
            raise error.with_sample_id(sample_id) from None

    def convert(
        self,
        sample: dict,
        to: str,
        format: str = "auto",
        *,
        overlap: str = "error",
        extra_keys="error",
        sample_id=None,
        region_text: RegionText | None = None,
    ) -> dict:
        """``sample`` rewritten in format ``to``, its top-level metadata keys kept.

        Args:
            sample: the raw sample (dict).
            to: one of ``FORMATS``.
            format, overlap, extra_keys, sample_id: as in `parse`.
            region_text: the sample's `parse`, when the caller has it already (not parsed again).

        Returns:
            The raw sample in ``to`` plus ``sample``'s keys that are not its format's.
        """
        if region_text is None:
            region_text = self.parse(sample, format, overlap=overlap, extra_keys=extra_keys, sample_id=sample_id)
        own = self.specs[self.detect_format(sample) if format == "auto" else format].keys
        metadata = {key: value for key, value in sample.items() if key not in own}
        return {**self.to_format(region_text, to, sample_id=sample_id), **metadata}


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
    """``--extra-keys error|keep|KEY,KEY`` on an argparse parser (`mrloss prepare`, `mrloss show`).

    Args:
        parser: an ``argparse.ArgumentParser``.
        default: the option's default; None: the command picks it.

    Returns:
        None; the parsed value is `parse`'s ``extra_keys`` (``error``, ``keep``, or the comma-separated names as a
        tuple).
    """

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


REGISTRY = FormatRegistry(FORMAT_SPECS)
FORMATS = REGISTRY.formats  # the formats of plain text: parse, write, convert
INPUT_FORMATS = REGISTRY.input_formats  # FORMATS and the parse-only ones
CHAT_FORMAT = messages.FORMAT.name  # chat samples, rendered with the tokenizer's chat template: parse only
parse = REGISTRY.parse
detect_format = REGISTRY.detect_format
to_format = REGISTRY.to_format
convert = REGISTRY.convert
