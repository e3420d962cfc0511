"""Multi-region data formats -> RegionText (text + weighted character regions).

``parse(sample, format="auto", *, overlap="error", sample_id=None, tokenizer=None) -> RegionText`` reads
``INPUT_FORMATS`` (the chat format ``messages`` needs ``tokenizer``); ``to_format`` and ``convert`` write any
plain-text RegionText / sample back in one of ``FORMATS``. Bad data raises ``FormatError``.
"""

from mrloss.formats.dispatch import CHAT_FORMAT, FORMATS, INPUT_FORMATS, convert, detect_format, parse, to_format
from mrloss.formats.errors import FormatError
from mrloss.formats.regions import Region, RegionText

__all__ = [
    "parse",
    "convert",
    "to_format",
    "detect_format",
    "FORMATS",
    "INPUT_FORMATS",
    "CHAT_FORMAT",
    "FormatError",
    "Region",
    "RegionText",
]
