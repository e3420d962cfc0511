"""FormatSpec: what the dispatcher needs to know of one data format (each format module exports one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mrloss.formats.regions import RegionText


@dataclass(frozen=True)
class FormatSpec:
    """One data format: its keys, how a sample of it is recognized, read and written.

    A new format is a module that exports one ``FormatSpec`` plus its line in `mrloss.formats.dispatch.FORMAT_SPECS`;
    `parse`, `convert`, `to_format`, `detect_format`, ``FORMATS`` / ``INPUT_FORMATS``, the key checks, the config's
    ``data.format`` and the CLIs' ``--format`` / ``--to`` choices are all built from that list.

    Attributes:
        name: the format's name (``parse(format=...)``, ``--to``, ``data.format``).
        keys: every top-level key a sample of this format may hold (besides ``METADATA_KEYS``).
        parse: ``parse(sample, *, sample_id, **options) -> RegionText``, raising FormatError; ``options`` are the
            dispatcher's options named in ``parse_options``.
        write: ``write(region_text) -> dict``, the raw sample, so that parsing it gives the same
            ``char_weights()``; None: an input format only (in ``INPUT_FORMATS``, not in ``FORMATS``).
        identifying_keys: a sample holding one of these is of this format (`detect_format`); a format with none
            and no ``detect`` is the fallback (exactly one: a sample no other format claims).
        detect: ``detect(sample) -> bool``, when one key does not decide (the chat format's prompt + completion).
        detect_first: tried before the formats without it: for a format whose keys others may carry as metadata.
        marking_keys: keys that, next to another format's keys, are an error even when extra keys are allowed;
            None: ``keys``.
        text_field: the field a sample with no text is reported under.
        parse_options: the names of `mrloss.formats.parse`'s options ``parse`` takes (``overlap``, ``tokenizer``).
    """

    name: str
    keys: tuple[str, ...]
    parse: Callable[..., RegionText]
    write: Callable[[RegionText], dict] | None = None
    identifying_keys: tuple[str, ...] = ()
    detect: Callable[[dict], bool] | None = None
    detect_first: bool = False
    marking_keys: tuple[str, ...] | None = None
    text_field: str = "text"
    parse_options: tuple[str, ...] = ()

    def claims(self, sample: dict) -> bool:
        """Whether ``sample`` is of this format by its keys (``detect``, else ``identifying_keys``).

        Args:
            sample: a raw sample (dict).

        Returns:
            True when ``detect`` says so or ``sample`` holds one of ``identifying_keys``.
        """
        if self.detect is not None:
            return self.detect(sample)
        return any(key in sample for key in self.identifying_keys)

    @property
    def is_fallback(self) -> bool:
        """True for the format of samples no other format claims (no ``detect``, no ``identifying_keys``)."""
        return self.detect is None and not self.identifying_keys

    @property
    def marks(self) -> tuple[str, ...]:
        """The keys that mark a sample as this format next to another format's keys (``marking_keys`` or ``keys``)."""
        return self.keys if self.marking_keys is None else self.marking_keys
