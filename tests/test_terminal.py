from mrloss.formats.terminal import escape_control


def test_escape_sequences_are_shown_not_sent():
    hostile = "title\x1b]0;pwned\x07 clip\x1b]52;c;ZXZpbA==\x07 clear\x1b[2J bidi\u202eevil\x9b"
    safe = escape_control(hostile)
    assert "\x1b" not in safe and "\x07" not in safe and "\u202e" not in safe and "\x9b" not in safe
    assert safe.startswith("title\\x1b]0;pwned\\x07") and "\\u202e" in safe


def test_printable_text_tabs_and_newlines_are_unchanged():
    text = "梯度下降法\t通过迭代\n更新参数 😀 é"
    assert escape_control(text) == text
