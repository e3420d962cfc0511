"""LossMaskVisualizer on the shipped example data (Chinese included): terminal text, warnings, HTML, the
`mrloss show` command and a real-browser rendering (headless Chromium, when installed)."""

import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from helpers import run_cli

from mrloss.data import encode, train_bpe_tokenizer, write_examples
from mrloss.debug import LossMaskVisualizer
from mrloss.debug.show import main as show_main
from mrloss.debug.visualizer import token_texts
from mrloss.formats import parse

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """(paths of the example files, {sample id: raw tag_based sample}, a BPE tokenizer trained on them)."""
    paths = write_examples(tmp_path_factory.mktemp("examples"))
    samples = {s["id"]: s for s in map(json.loads, paths["tag_based"].read_text(encoding="utf-8").splitlines())}
    tokenizer = train_bpe_tokenizer([parse(s).text for s in samples.values()], vocab_size=600)
    return paths, samples, tokenizer


def encoded(examples, sample_id, **options):
    _, samples, tokenizer = examples
    region_text = parse(samples[sample_id], sample_id=sample_id)
    return region_text, encode(region_text, tokenizer, sample_id=sample_id, **options)


def test_terminal_view_of_a_chinese_sample(examples):
    region_text, enc = encoded(examples, "zh-gradient-descent")
    out = io.StringIO()
    text = LossMaskVisualizer(examples[2]).print_detailed_analysis(
        enc["input_ids"], enc["token_weights"], enc, region_text=region_text, color=False, file=out
    )
    assert out.getvalue() == text + "\n" and "\x1b" not in text
    definition = region_text.text[region_text.regions[0].start : region_text.regions[0].end]
    assert f"⟦1.5 definition│{definition}⟧" in text  # the weighted run, Chinese intact
    assert text.splitlines()[1].startswith("问题：什么是梯度下降？")
    learned = sum(w > 0 for w in enc["token_weights"])
    total = sum(enc["token_weights"])
    assert f"{len(enc['input_ids'])} tokens, {learned} learned (weight > 0), total weight {total:g}" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])}
    for index, region in enumerate(region_text.regions):  # type, tokens, weight, Σ weight, share
        count = enc["region_ids"].count(index)
        weight_sum = sum(w for w, r in zip(enc["token_weights"], enc["region_ids"]) if r == index)
        assert rows[region.type][2:] == [
            str(count),
            f"{region.weight:g}",
            f"{weight_sum:g}",
            f"{100 * weight_sum / total:.1f}%",
        ]
    assert text.rstrip().endswith("Warnings: none")


def test_colour_follows_tty_and_no_color(examples, monkeypatch):
    region_text, enc = encoded(examples, "zh-photosynthesis")
    visualizer = LossMaskVisualizer(examples[2])

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = visualizer.print_detailed_analysis(enc["input_ids"], enc["token_weights"], enc, file=Terminal())
    assert "\x1b[48;5;" in coloured and "\x1b[90m" in coloured
    # colour codes aside, every token's text is there in order
    body = ANSI.sub("", coloured.split("\n", 2)[2]).replace("↵\n", "\n")
    assert body.startswith(examples[2].decode(enc["input_ids"]))
    assert "\x1b" not in visualizer.print_detailed_analysis(
        enc["input_ids"], enc["token_weights"], enc, file=io.StringIO()
    )  # not a TTY
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in visualizer.print_detailed_analysis(
        enc["input_ids"], enc["token_weights"], enc, file=Terminal()
    )


def test_warnings_truncation_straddle_and_lost_region(examples):
    paths, samples, tokenizer = examples
    visualizer = LossMaskVisualizer(tokenizer)
    region_text, enc = encoded(examples, "en-gradient-descent", max_length=60)
    text = visualizer.print_detailed_analysis(
        enc["input_ids"], enc["token_weights"], enc, region_text=region_text, color=False, file=io.StringIO()
    )
    assert f"sample truncated: 60 of {enc['untruncated_length']} tokens kept" in text
    assert "region 1 (methodology) cut by truncation: 0 token(s) left" in text
    assert "region 0 (definition) cut by truncation" in text

    # a token spanning two characters: give its first character a region of its own, the rest another one
    full_text = parse(samples["zh-recursion"]).text
    plain = encode(parse({"text": full_text, "learning_regions": []}), tokenizer)
    position, (start, end) = next(
        (k, span)
        for k, span in enumerate(plain["offsets"])
        if k > 0 and span[1] - span[0] >= 2 and full_text[span[0]] != " "
    )
    sample = {
        "text": full_text,
        "learning_regions": [
            {"start_char": start, "end_char": start + 1, "weight": 1.0, "region_type": "definition"},
            {"start_char": start + 1, "end_char": end + 3, "weight": 2.0, "region_type": "concept"},
        ],
    }
    region_text = parse(sample)
    enc = encode(region_text, tokenizer)
    analysis = visualizer.analyze(enc["input_ids"], enc["token_weights"], enc, region_text=region_text)
    assert "region 0 (definition) has no tokens after tokenization" in analysis.warnings[0]
    straddle = [w for w in analysis.warnings if w.startswith(f"token {position} ")]
    assert straddle and f"straddles the end of region 0 (definition) at character {start + 1}" in straddle[0]
    assert "it counts for region 1 (concept) with weight 2" in straddle[0]
    assert [row.tokens for row in analysis.rows][:2] == [0, enc["region_ids"].count(1)]


def test_plain_mask_tensors_and_bad_input(examples):
    tokenizer = examples[2]
    ids = tokenizer("学习率决定了每一步走多远")["input_ids"]
    mask = torch.tensor([0] * 3 + [1] * (len(ids) - 3))  # a 0/1 mask, no region information
    analysis = LossMaskVisualizer(tokenizer).analyze(torch.tensor(ids), mask)
    assert [(row.region_type, row.tokens, row.share) for row in analysis.rows] == [
        ("weight 0", 3, 0.0),
        ("weight 1", len(ids) - 3, 1.0),
    ]
    assert "".join(token.text for token in analysis.tokens) == "学习率决定了每一步走多远"
    with pytest.raises(ValueError, match="loss_mask has 2 entries but input_ids has"):
        LossMaskVisualizer(tokenizer).analyze(ids, [1, 0])
    with pytest.raises(ValueError, match="1-D"):
        LossMaskVisualizer(tokenizer).analyze(torch.tensor([ids]), mask)
    with pytest.raises(ValueError, match=r"region_ids'\]\[0\] = 5"):
        LossMaskVisualizer(tokenizer).analyze(ids, mask, {"region_ids": [5] * len(ids), "region_types": ["a"]})


def test_token_texts_join_multibyte_characters(examples):
    tokenizer = examples[2]
    text = "罕见字：龘靐齉。Mixed 文本"
    ids = tokenizer(text)["input_ids"]
    pieces = token_texts(tokenizer, ids)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # rare characters are split into byte tokens, joined on the last one


class Spans(HTMLParser):
    """Token spans of the page: (attributes, text)."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in attrs.get("class", "").split():
            self._open = [attrs, ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def test_html_page(examples):
    region_text, enc = encoded(examples, "zh-newton-second-law", max_length=120)
    page = LossMaskVisualizer(examples[2]).to_html(enc["input_ids"], enc["token_weights"], enc, region_text=region_text)
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert not re.search(r"https?://|<script|<link|src=|url\(", page)  # self-contained
    parser = Spans()
    parser.feed(page)
    assert len(parser.spans) == len(enc["input_ids"])
    shown = "".join(text for _, text in parser.spans).replace("↵\n", "\n")
    # the characters of the kept tokens, whole (decoding the ids would end in a cut character's U+FFFD)
    assert shown == region_text.text[: enc["offsets"][-1][1]] and "物体加速度的大小与所受合外力成正比" in shown
    assert examples[2].decode(enc["input_ids"]).endswith("\ufffd") and "\ufffd" not in page
    for position, (attrs, _text) in enumerate(parser.spans):
        weight, region = enc["token_weights"][position], enc["region_ids"][position]
        assert attrs["data-id"] == str(enc["input_ids"][position]) and float(attrs["data-weight"]) == weight
        assert attrs["title"].startswith(f"#{position}  id {enc['input_ids'][position]}  text ")
        assert (
            f"weight {weight:g}  region " + (f"{region} ({enc['region_types'][region]})" if region >= 0 else "none")
            in attrs["title"]
        )
        assert ("background: rgb(" in attrs["style"]) == (weight > 0)
    assert "sample truncated: 120 of" in page and "cut by truncation" in page


def test_show_command(examples, tmp_path, capsys):
    paths = examples[0]
    out = tmp_path / "view.html"
    assert show_main([str(paths["structured"]), "--index", "3", "--html", str(out), "--color", "never"]) == 0
    printed = capsys.readouterr().out
    assert f"sample --index 3 ({paths['structured']}, line 4)" in printed  # both labelled: 0-based, 1-based
    assert "⟦1.5 definition│梯度下降是" in printed and "wrote" in printed
    parser = Spans()
    parser.feed(out.read_text(encoding="utf-8"))
    assert "梯度下降是一种" in "".join(text for _, text in parser.spans)
    assert show_main([str(paths["tag_based"]), "--index", "999"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_show_labels_the_index_and_the_line(tmp_path, capsys):
    """Before (#23 rough edges): ``--index 1`` printed ``sample f.jsonl:3`` -- a 1-based line number beside the
    0-based index, unlabelled (and blank lines make them differ by more than one)."""
    import json

    samples = [{"text": "first <LEARN>one</LEARN>"}, {"text": "second <LEARN>two</LEARN>"}]
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text(json.dumps(samples[0]) + "\n\n" + json.dumps(samples[1]) + "\n")
    listed = tmp_path / "f.json"
    listed.write_text(json.dumps(samples))
    for path, where in ((jsonl, f"{jsonl}, line 3"), (listed, f"{listed}[1]")):
        assert show_main([str(path), "--index", "1", "--color", "never", "--vocab-size", "260"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"sample --index 1 ({where})"


def test_show_uses_the_run_tokenizer(examples, tmp_path, capsys):
    """``--run DIR``: the tokenizer `mrloss train` saved (DIR/tokenizer, else DIR) and the run's data settings
    from DIR/config.yaml; by default, the tokenizer `mrloss train` would train on FILE -- the same view."""
    from mrloss.training.build import build_tokenizer
    from mrloss.training.config import Config, DataConfig, TrainerConfig

    path = str(examples[0]["tag_based"])
    run = tmp_path / "run"
    build_tokenizer(
        Config(data=DataConfig(train_files=[path]), trainer=TrainerConfig(output_dir=str(run))), None, is_main=True
    )

    def shown(*options):
        assert show_main([path, "--index", "2", "--color", "never", *options]) == 0
        return capsys.readouterr().out

    by_run, by_default = shown("--run", str(run)), shown()
    assert by_run == by_default == shown("--tokenizer", str(run / "tokenizer"))
    assert by_run != shown("--vocab-size", "300")  # the vocabulary does change the token boundaries
    (run / "tokenizer").rename(tmp_path / "saved_with_model")  # a finished run: the tokenizer is in DIR itself
    (tmp_path / "saved_with_model").rename(run)
    (run / "config.yaml").write_text(
        "data:\n  format: tag_based\n  max_length: 12\n  truncation: left\n", encoding="utf-8"
    )
    truncated = shown("--run", str(run))
    assert truncated != by_run and "sample truncated" in truncated
    # the run's data.format describes its training files: a file in another format is still detected
    assert show_main([str(examples[0]["structured"]), "--run", str(run), "--color", "never"]) == 0
    assert "Loss mask" in capsys.readouterr().out
    assert show_main([path, "--run", str(tmp_path / "nowhere")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert show_main([path, "--run", str(tmp_path / "empty")]) == 1
    assert "no tokenizer in" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_in_headless_chromium(examples, tmp_path):
    from matplotlib.image import imread

    region_text, enc = encoded(examples, "zh-gradient-descent")
    page = tmp_path / "view.html"
    page.write_text(
        LossMaskVisualizer(examples[2]).to_html(enc["input_ids"], enc["token_weights"], enc, region_text=region_text),
        encoding="utf-8",
    )
    screenshot = tmp_path / "view.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=900,700",
            f"file://{page}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (700, 900)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    warm = (red > 0.85) & (green < 0.8) & (blue < 0.45)  # weight backgrounds (orange: the largest weight)
    dark = pixels.max(axis=-1) < 0.3  # glyphs
    assert warm.sum() > 5000 and dark.sum() > 2000


CUT_TEXT = "梯度下降法通过迭代更新参数"


@pytest.fixture(scope="module")
def cross_character_bpe():
    """A byte-level BPE whose tokens end and start inside characters (decoding them one by one, or a few at a
    time, gives U+FFFD): 262 tokens trained on one Chinese sentence."""
    return train_bpe_tokenizer([CUT_TEXT] * 20 + ["梯度", "参数更新"] * 5, vocab_size=262)


def test_no_replacement_character_for_tokens_that_cut_characters(cross_character_bpe):
    tokenizer = cross_character_bpe
    ids = tokenizer(CUT_TEXT)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # the tokens do cut characters
    region_text = parse({"text": "梯度<LEARN weight='2' type='c'>下降法通过迭代更新</LEARN>参数"})
    enc = encode(region_text, tokenizer)
    visualizer = LossMaskVisualizer(tokenizer)
    for info, text in ((enc, region_text), ({}, None)):  # encode's offsets; the tokenizer's on the decoded ids
        pieces = token_texts(tokenizer, enc["input_ids"], info.get("offsets"), text and text.text)
        assert "".join(pieces) == CUT_TEXT + "<|endoftext|>" and "" in pieces
        terminal = visualizer.print_detailed_analysis(
            enc["input_ids"], enc["token_weights"], info, region_text=text, color=False, file=io.StringIO()
        )
        page = visualizer.to_html(enc["input_ids"], enc["token_weights"], info, region_text=text)
        assert "\ufffd" not in terminal and "\ufffd" not in page
        assert "⟦2 c│" in terminal if text else "⟦2│" in terminal
    # ids that do not tokenize back (one token per byte): decoded in runs, still whole characters
    byte_ids = [
        tokenizer.convert_tokens_to_ids(t)
        for t in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(CUT_TEXT)[0][0]
    ]
    assert "".join(token_texts(tokenizer, byte_ids)) == CUT_TEXT


def test_qwen_chat_sample_in_the_terminal_and_html(qwen_tokenizer):
    sample = {
        "messages": [
            {"role": "user", "content": "什么是梯度下降？🙂"},
            {
                "role": "assistant",
                "content": '梯度下降法<LEARN weight="2" type="concept">通过迭代更新参数</LEARN>。👍🏽',
            },
        ]
    }
    region_text = parse(sample, tokenizer=qwen_tokenizer)
    enc = encode(region_text, qwen_tokenizer)
    visualizer = LossMaskVisualizer(qwen_tokenizer)
    terminal = visualizer.print_detailed_analysis(
        enc["input_ids"], enc["token_weights"], enc, region_text=region_text, color=False, file=io.StringIO()
    )
    assert "⟦1 assistant│梯度下降法⟧⟦2 concept│通过迭代更新参数⟧⟦1 assistant│。👍🏽<|im_end|>⟧" in terminal
    assert "<|im_start|>user\n什么是梯度下降？🙂<|im_end|>" in terminal and "\ufffd" not in terminal
    parser = Spans()
    parser.feed(visualizer.to_html(enc["input_ids"], enc["token_weights"], enc, region_text=region_text))
    assert "".join(text for _, text in parser.spans).replace("↵\n", "\n") == region_text.text


def test_plain_text_view_of_a_long_sample_is_linear():
    """Before: the plain-text view joined each run's text by repeated concatenation: quadratic (> 400 s on one
    10 MB sample through `mrloss show`)."""
    from mrloss.debug.visualizer import MaskAnalysis, TokenView, render_terminal

    tokens = [TokenView(k, 7, "word ", 1.0, 0, "answer") for k in range(400_000)]
    text = render_terminal(MaskAnalysis(tokens, [], 400_000.0, 400_000), color=False)
    assert f"⟦1 answer│{'word ' * 400_000}⟧" in text


HOSTILE = "\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J"


@pytest.mark.parametrize("color", [False, True], ids=["plain", "colour"])
def test_show_escapes_control_characters_from_data(tmp_path, capsys, color):
    """Before: ESC sequences in a sample's text or region type reached the terminal through `mrloss show`
    (window title, OSC 52 clipboard write, screen clear)."""
    sample = {"text": f'hello <LEARN type="t{HOSTILE}">world {HOSTILE} again</LEARN> and <LEARN>more</LEARN>'}
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps(sample) + "\n")
    code, err = run_cli(["show", str(path), "--vocab-size", "260", "--color", "always" if color else "never"], capsys)
    assert code == 0, err
    printed = run_cli.out
    assert "\\x1b]0;pwned\\x07" in printed and "\x07" not in printed and "\x1b]" not in printed
    assert "\x1b[2J" not in printed and ("\x1b" in printed) == color  # only the view's own colours
