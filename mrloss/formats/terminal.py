"""Text from data made safe for a terminal: control characters shown escaped, never sent raw."""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, and C1 controls (ESC starts ANSI/OSC sequences: window title,
# OSC 52 clipboard writes, screen clears); also the bidirectional overrides that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_control(text: str) -> str:
    """Text made safe to print on a terminal. Linear in ``len(text)``.

    Args:
        text: any string read from data.

    Returns:
        ``text`` with every terminal control character replaced by its escape (``\\x1b``, ``\\u202e``); tabs,
        newlines and everything printable unchanged.
    """
    return _UNSAFE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
