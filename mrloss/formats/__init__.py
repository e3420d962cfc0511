"""Multi-region data formats -> RegionText (text + weighted character regions).

``parse(sample, format="auto", *, overlap="error", sample_id=None) -> RegionText``; ``to_format`` and
``convert`` write any RegionText / sample back in one of ``FORMATS``. Bad data raises ``FormatError``.
"""

from mrloss.formats.dispatch import FORMATS, convert, detect_format, parse, to_format
from mrloss.formats.errors import FormatError
from mrloss.formats.regions import Region, RegionText

__all__ = ["parse", "convert", "to_format", "detect_format", "FORMATS", "FormatError", "Region", "RegionText"]
