"""Multi-region data formats -> RegionText (text + weighted character regions).

``parse(sample, format="auto", *, overlap="error", extra_keys="error", sample_id=None, tokenizer=None) -> RegionText``
reads ``INPUT_FORMATS`` (the chat format ``messages`` needs ``tokenizer``; top-level keys besides the format's and
``METADATA_KEYS`` are errors unless ``extra_keys`` allows them); ``to_format`` and ``convert`` write any
plain-text RegionText / sample back in one of ``FORMATS``. Bad data raises ``FormatError``.

Each format is a module exporting one `FormatSpec` (``position_based``, ``tag_based``, ``structured``,
``messages``); ``FORMAT_SPECS`` lists them, and everything above is built from that list.
"""

from mrloss.formats.dispatch import (
    CHAT_FORMAT,
    EXTRA_KEYS,
    FORMAT_SPECS,
    FORMATS,
    INPUT_FORMATS,
    METADATA_KEYS,
    add_extra_keys_argument,
    convert,
    detect_format,
    parse,
    to_format,
)
from mrloss.formats.errors import FormatError
from mrloss.formats.regions import Region, RegionText
from mrloss.formats.spec import FormatSpec

__all__ = [
    "parse",
    "convert",
    "to_format",
    "detect_format",
    "FORMATS",
    "INPUT_FORMATS",
    "FORMAT_SPECS",
    "FormatSpec",
    "CHAT_FORMAT",
    "METADATA_KEYS",
    "EXTRA_KEYS",
    "add_extra_keys_argument",
    "FormatError",
    "Region",
    "RegionText",
]
