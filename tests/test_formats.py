"""mrloss.formats: the three formats, every error, round trips between them (hypothesis), the format registry."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrloss.data.examples import EXAMPLES
from mrloss.formats import (
    FORMAT_SPECS,
    FORMATS,
    INPUT_FORMATS,
    FormatError,
    FormatSpec,
    Region,
    RegionText,
    convert,
    detect_format,
    parse,
    to_format,
)
from mrloss.formats.dispatch import FormatRegistry

# ---------------------------------------------------------------------------------------------- the guide's examples

GUIDE_TAG = {
    "text": '\n    这是普通文本。\n    <LEARN weight="2.0" type="concept">\n    这是需要学习的重要概念。\n    </LEARN>\n    ',
    "default_weight": 0.0,
}
GUIDE_STRUCTURED = {
    "segments": [
        {"content": "介绍部分", "learn": False, "weight": 0.0},
        {"content": "重要概念", "learn": True, "weight": 2.0, "segment_type": "concept"},
    ]
}
GUIDE_POSITION = {
    "text": "完整的文本内容...",
    "learning_regions": [{"start_char": 100, "end_char": 200, "weight": 2.0, "region_type": "concept"}],
}


def test_guide_tag_example_keeps_whitespace_and_removes_tags():
    rt = parse(GUIDE_TAG)
    assert rt.text == "\n    这是普通文本。\n    \n    这是需要学习的重要概念。\n    \n    "
    (region,) = rt.regions
    assert rt.text[region.start : region.end] == "\n    这是需要学习的重要概念。\n    "
    assert (region.weight, region.type) == (2.0, "concept")
    weights = rt.char_weights()
    assert len(weights) == len(rt.text)
    assert [i for i, w in enumerate(weights) if w == 2.0] == list(range(region.start, region.end))
    assert all(w == 0.0 for i, w in enumerate(weights) if not region.start <= i < region.end)


def test_guide_structured_example():
    rt = parse(GUIDE_STRUCTURED)
    assert rt.text == "介绍部分重要概念"
    assert rt.regions == (Region(4, 8, 2.0, "concept"),)
    assert rt.char_weights() == [0.0] * 4 + [2.0] * 4


def test_guide_position_example_literal_text_is_too_short():
    with pytest.raises(FormatError) as info:
        parse(GUIDE_POSITION, sample_id="guide")
    assert info.value.field == "learning_regions[0].start_char" and info.value.position == 100
    assert "guide" in str(info.value) and "length 10" in str(info.value)


def test_guide_position_example_with_a_real_text():
    sample = next(e for e in EXAMPLES if e["id"] == "guide-position")
    position_based = convert(sample, "position_based")
    assert position_based["learning_regions"] == GUIDE_POSITION["learning_regions"]
    rt = parse(position_based)
    assert rt.char_weights() == [0.0] * 100 + [2.0] * 100 + [0.0] * (len(rt.text) - 200)


# ---------------------------------------------------------------------------------------------- each format


def test_position_based_code_points_defaults_and_sorting():
    text = "梯度下降 is 𝕏 fine"
    rt = parse(
        {
            "text": text,
            "default_weight": 0.25,
            "learning_regions": [
                {"start_char": 8, "end_char": 9, "weight": 3, "region_type": "symbol"},
                {"start_char": 2, "end_char": 4},
            ],
        }
    )
    assert rt.regions == (Region(2, 4, 1.0, "default"), Region(8, 9, 3.0, "symbol"))
    assert text[8] == "𝕏"  # one code point, 4 UTF-8 bytes
    weights = rt.char_weights()
    assert weights[2:4] == [1.0, 1.0] and weights[8] == 3.0 and weights[0] == 0.25 and weights[-1] == 0.25
    assert rt.char_region_ids()[:5] == [-1, -1, 0, 0, -1]


def test_region_weight_below_default_weight_wins_inside_the_region():
    rt = parse(
        {"text": "abc", "default_weight": 1.0, "learning_regions": [{"start_char": 1, "end_char": 2, "weight": 0}]}
    )
    assert rt.char_weights() == [1.0, 0.0, 1.0]


def test_tag_attributes_quotes_order_case_and_defaults():
    rt = parse(
        {"text": "a<LEARN type='t1' weight='0.5'>b</LEARN>c<learn>d</learn>e<Learn  WEIGHT = \"2e0\" >f</LEARN >"}
    )
    assert rt.text == "abcdef"
    assert rt.regions == (Region(1, 2, 0.5, "t1"), Region(3, 4, 1.0, "default"), Region(5, 6, 2.0, "default"))


def test_tag_nesting_inner_weight_and_type_apply():
    rt = parse({"text": 'x<LEARN weight="1.5" type="m">ab<LEARN weight="3" type="c">cd</LEARN>e</LEARN>y'})
    assert rt.text == "xabcdey"
    assert rt.regions == (Region(1, 3, 1.5, "m"), Region(3, 5, 3.0, "c"), Region(5, 6, 1.5, "m"))
    assert rt.char_weights() == [0, 1.5, 1.5, 3, 3, 1.5, 0]


def test_text_without_tags_has_the_default_weight_everywhere():
    rt = parse({"text": "平文 plain <LEARNING> <b>", "default_weight": 0.7})
    assert rt.regions == () and rt.char_weights() == [0.7] * len(rt.text)


def test_structured_separator_and_learn_weight_defaults():
    rt = parse(
        {
            "separator": "\n\n",
            "segments": [
                {"content": "Q: why?"},  # neither: context
                {"content": "A: because.", "learn": True},  # weight 1.0
                {"content": "note", "weight": 0.5, "segment_type": "n"},  # learn defaults to True
                {"content": "aside", "learn": False, "segment_type": "q"},  # typed context: a weight-0 region
            ],
        }
    )
    assert rt.text == "Q: why?\n\nA: because.\n\nnote\n\naside"
    assert rt.regions == (Region(9, 20, 1.0, "default"), Region(22, 26, 0.5, "n"), Region(28, 33, 0.0, "q"))
    weights = rt.char_weights()
    assert weights[7:9] == [0.0, 0.0] and weights[20:22] == [0.0, 0.0]  # separators


@pytest.mark.parametrize(
    "sample, expected",
    [
        ({"segments": [], "text": None}, "structured"),
        ({"text": "x", "learning_regions": []}, "position_based"),
        ({"text": "x"}, "tag_based"),
        ({"text": "x", "default_weight": 1}, "tag_based"),
    ],
)
def test_detect_format(sample, expected):
    assert detect_format(sample) == expected


def test_metadata_keys_are_allowed_and_kept_by_convert():
    sample = {"text": "a<LEARN>b</LEARN>", "id": 7, "source": {"book": "x"}}
    assert parse(sample).text == "ab"
    for name in FORMATS:
        converted = convert(sample, name)
        assert converted["id"] == 7 and converted["source"] == {"book": "x"}
        assert detect_format(converted) == name


def test_explicit_format_is_used():
    assert parse({"text": "a<LEARN>b</LEARN>"}, "position_based").regions == ()
    with pytest.raises(FormatError, match="learning_regions"):
        parse({"text": "ab", "learning_regions": []}, "tag_based")
    with pytest.raises(ValueError, match="format"):
        parse({"text": "ab"}, "xml")


# ---------------------------------------------------------------------------------------------- every error


def _regions(*regions):
    return {"text": "0123456789", "learning_regions": list(regions)}


ERRORS = [
    # (sample, field, position, words in the message)
    ({"text": "a<LEARN>b"}, "text", 1, "unclosed"),
    ({"text": "a<LEARN>b<LEARN>c</LEARN>"}, "text", 1, "unclosed"),
    ({"text": "ab</LEARN>c"}, "text", 2, "stray"),
    ({"text": "a<LEARN>b</LEARN></LEARN>"}, "text", 17, "stray"),
    ({"text": 'a<LEARN weigth="2">b</LEARN>'}, "text.<LEARN>.weigth", 1, "unknown <LEARN> attribute 'weigth'"),
    ({"text": "a<LEARN weight=2>b</LEARN>"}, "text", 1, "malformed"),
    ({"text": 'a<LEARN weight="2"b</LEARN>'}, "text", 1, "malformed"),
    ({"text": "a</LEARN b>"}, "text", 1, "malformed closing"),
    ({"text": 'a<LEARN weight="1" weight="2">b</LEARN>'}, "text.<LEARN>.weight", 1, "twice"),
    ({"text": "<LEARN></LEARN>x"}, "text", 0, "empty"),
    ({"text": 'a<LEARN weight="-1">b</LEARN>'}, "text.<LEARN>.weight", 1, ">= 0"),
    ({"text": 'a<LEARN weight="nan">b</LEARN>'}, "text.<LEARN>.weight", 1, "finite"),
    ({"text": 'a<LEARN weight="inf">b</LEARN>'}, "text.<LEARN>.weight", 1, "finite"),
    ({"text": 'a<LEARN weight="high">b</LEARN>'}, "text.<LEARN>.weight", 1, "number"),
    ({"text": 'a<LEARN type="">b</LEARN>'}, "text.<LEARN>.type", 1, "empty"),
    ({"text": "a", "default_weight": -0.5}, "default_weight", None, ">= 0"),
    ({"text": "a", "default_weight": "1"}, "default_weight", None, "number"),
    ({"text": 5}, "text", None, "string"),
    ({"default_weight": 0.0}, "text", None, "missing"),
    ({"text": ""}, "text", None, "no text"),
    (
        _regions({"start_char": 1, "end_char": 3, "weigth": 2.0}),
        "learning_regions[0].weigth",
        None,
        "unknown key 'weigth'",
    ),
    (_regions({"start_char": 1}), "learning_regions[0].end_char", None, "missing"),
    (_regions({"start_char": 1, "end_char": 3, "weight": -2}), "learning_regions[0].weight", 1, ">= 0"),
    (_regions({"start_char": 1, "end_char": 3, "weight": float("nan")}), "learning_regions[0].weight", 1, "finite"),
    (_regions({"start_char": 1, "end_char": 3, "weight": float("-inf")}), "learning_regions[0].weight", 1, "finite"),
    (_regions({"start_char": 1, "end_char": 3, "weight": "2.0"}), "learning_regions[0].weight", 1, "number"),
    (_regions({"start_char": 1, "end_char": 3, "weight": True}), "learning_regions[0].weight", 1, "number"),
    (_regions({"start_char": 3, "end_char": 3}), "learning_regions[0].end_char", 3, "must be <"),
    (_regions({"start_char": 5, "end_char": 2}), "learning_regions[0].end_char", 5, "must be <"),
    (_regions({"start_char": -1, "end_char": 2}), "learning_regions[0].start_char", -1, "outside"),
    (_regions({"start_char": 4, "end_char": 11}), "learning_regions[0].end_char", 11, "beyond"),
    (_regions({"start_char": 1.0, "end_char": 2}), "learning_regions[0].start_char", None, "integer"),
    (_regions({"start_char": 1, "end_char": 2, "region_type": 3}), "learning_regions[0].region_type", 1, "string"),
    (_regions("1-2"), "learning_regions[0]", None, "object"),
    ({"text": "ab", "learning_regions": {"start_char": 0}}, "learning_regions", None, "list"),
    ({"segments": [{"content": "a", "learn": False, "weight": 2.0}]}, "segments[0].learn", 0, "contradicts"),
    ({"segments": [{"content": "a", "learn": True, "weight": 0}]}, "segments[0].learn", 0, "contradicts"),
    ({"segments": [{"content": "ab"}, {"content": "c", "lern": True}]}, "segments[1].lern", 2, "unknown key 'lern'"),
    ({"segments": [{"content": "ab"}, {"learn": True}]}, "segments[1].content", 2, "missing"),
    ({"segments": [{"content": 3}]}, "segments[0].content", 0, "string"),
    ({"segments": [{"content": "a", "learn": "yes"}]}, "segments[0].learn", 0, "true or false"),
    ({"segments": [{"content": "a", "weight": float("inf")}]}, "segments[0].weight", 0, "finite"),
    ({"segments": [{"content": "", "learn": True}, {"content": "a"}]}, "segments[0].content", 0, "empty"),
    ({"segments": "abc"}, "segments", None, "list"),
    ({"segments": [{"content": "a"}], "separator": None}, "separator", None, "string"),
    ({"segments": []}, "segments", None, "no text"),
    ({"segments": [{"content": "a"}], "text": "b"}, "text", None, "does not belong"),
    ({"segments": [{"content": "a"}], "default_weight": 1.0}, "default_weight", None, "does not belong"),
]


@pytest.mark.parametrize("sample, field, position, words", ERRORS)
def test_every_error_names_sample_field_and_position(sample, field, position, words):
    with pytest.raises(FormatError) as info:
        parse(sample, sample_id="data.jsonl:42")
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.sample_id, error.field, error.position) == ("data.jsonl:42", field, position)
    assert words in error.reason
    message = str(error)
    assert "data.jsonl:42" in message and repr(field) in message
    if position is not None:
        assert f"character {position}" in message


def test_a_sample_must_be_an_object():
    with pytest.raises(FormatError, match="object"):
        parse(["text"], sample_id=1)


def test_overlap_is_an_error_by_default_and_max_on_request():
    sample = _regions(
        {"start_char": 0, "end_char": 6, "weight": 1.0, "region_type": "a"},
        {"start_char": 4, "end_char": 9, "weight": 2.0, "region_type": "b"},
        {"start_char": 5, "end_char": 7, "weight": 0.5, "region_type": "c"},
    )
    with pytest.raises(FormatError) as info:
        parse(sample, sample_id=3)
    assert info.value.field == "learning_regions[1]" and info.value.position == 4
    assert "learning_regions[0]" in info.value.reason and "overlap='max'" in info.value.reason
    rt = parse(sample, overlap="max")
    assert rt.regions == (Region(0, 4, 1.0, "a"), Region(4, 9, 2.0, "b"))
    assert rt.char_weights() == [1.0] * 4 + [2.0] * 5 + [0.0]
    with pytest.raises(ValueError, match="overlap"):
        parse(sample, overlap="min")


def test_region_text_checks_its_invariants():
    with pytest.raises(FormatError, match="overlap"):
        RegionText("abcd", [Region(0, 2, 1.0), Region(1, 3, 1.0)])
    with pytest.raises(FormatError, match="outside"):
        RegionText("abcd", [Region(2, 5, 1.0)])
    with pytest.raises(FormatError, match="finite"):
        RegionText("abcd", [Region(0, 1, math.nan)])


def test_to_tag_based_refuses_a_text_with_literal_tags():
    with pytest.raises(FormatError) as info:
        to_format(parse({"text": "see <learn> here", "learning_regions": []}), "tag_based", sample_id="s")
    assert info.value.position == 4 and info.value.sample_id == "s"


def test_examples_parse_identically_in_every_format():
    for sample in EXAMPLES:
        reference = parse(sample, sample_id=sample["id"])
        for name in FORMATS:
            assert parse(convert(sample, name)) == reference


# ------------------------------------------------------------------------------------------ round trips (hypothesis)

CHARACTERS = st.sampled_from(list("ab xy,.\n\t学习概念梯度降𝕏é<>'\"="))
WEIGHTS = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.25])
TYPES = st.sampled_from(["default", "concept", "definition", "method's", '"q"'])


@st.composite
def region_texts(draw):
    text = draw(st.text(CHARACTERS, min_size=1, max_size=40))
    borders = sorted(draw(st.sets(st.integers(0, len(text)), max_size=8)))
    regions = [
        Region(start, end, draw(WEIGHTS), draw(TYPES)) for start, end in zip(borders[::2], borders[1::2]) if start < end
    ]
    return RegionText(text, regions, draw(WEIGHTS))


@settings(max_examples=150, deadline=None)
@given(region_texts())
def test_any_region_text_round_trips_through_every_format(region_text):
    for name in FORMATS:
        back = parse(to_format(region_text, name), name)
        assert back.text == region_text.text
        assert back.char_weights() == region_text.char_weights()
        if name != "structured" or region_text.default_weight == 0:
            assert back.regions == region_text.regions


@st.composite
def nested_tag_texts(draw, depth=0):
    """(raw tagged text, expected weight of each character) with tags nested up to 3 deep."""
    raw, weights = "", []
    for _ in range(draw(st.integers(1, 3))):
        if depth < 3 and draw(st.booleans()):
            weight, region_type = draw(WEIGHTS), draw(st.sampled_from(["concept", "method"]))
            inner_raw, inner_weights = draw(nested_tag_texts(depth + 1))
            raw += f"<LEARN type='{region_type}' weight=\"{weight}\">{inner_raw}</LEARN>"
            weights += [weight if w is None else w for w in inner_weights]
        else:
            plain = draw(st.text(st.sampled_from(list("ab 学习\n")), min_size=1, max_size=5))
            raw += plain
            weights += [None] * len(plain)
    return raw, weights


@settings(max_examples=150, deadline=None)
@given(nested_tag_texts(), WEIGHTS)
def test_nested_tags_give_the_innermost_weight_and_survive_conversion(tagged, default_weight):
    raw, expected = tagged
    region_text = parse({"text": raw, "default_weight": default_weight})
    assert region_text.char_weights() == [default_weight if w is None else w for w in expected]
    for name in FORMATS:
        assert parse(to_format(region_text, name)).char_weights() == region_text.char_weights()


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, n), WEIGHTS), max_size=6)
        )
    )
)
def test_overlap_max_keeps_the_highest_weight_of_each_character(case):
    length, spans = case
    spans = [(start, end, weight) for start, end, weight in spans if start < end]
    sample = {
        "text": "字" * length,
        "learning_regions": [{"start_char": start, "end_char": end, "weight": weight} for start, end, weight in spans],
    }
    expected = [max([w for s, e, w in spans if s <= i < e], default=0.0) for i in range(length)]
    assert parse(sample, overlap="max").char_weights() == expected


def test_format_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(FormatError("bad", sample_id="f:1", field="text", position=3)))
    assert (error.reason, error.sample_id, error.field, error.position) == ("bad", "f:1", "text", 3)
    assert str(error) == "sample f:1, field 'text', character 3: bad"


@pytest.mark.parametrize(
    "make_sample, field",
    [
        (lambda w: {"text": f'a <LEARN weight="{w}">b</LEARN>'}, "text.<LEARN>.weight"),
        (lambda w: {"text": "ab", "learning_regions": [{"start_char": 0, "end_char": 1, "weight": w}]}, ".weight"),
        (lambda w: {"text": "ab", "default_weight": w}, "default_weight"),
    ],
    ids=["tag", "position", "default"],
)
def test_weights_not_finite_in_float32_are_rejected_naming_the_sample(make_sample, field):
    """Before: weight="1e39" passed `mrloss prepare` and training failed later, naming batch coordinates."""
    for weight in (1e39, 3.41e38):  # 3.41e38 > float32's max 3.403e38, rounds to inf
        with pytest.raises(FormatError, match="finite in float32") as caught:
            parse(make_sample(weight), sample_id="train.jsonl:7")
        assert caught.value.sample_id == "train.jsonl:7" and caught.value.field.endswith(field)
    parse(make_sample(3.4e38), sample_id="ok")  # within float32's range


@pytest.mark.parametrize("overlap", ["error", "max"])
def test_ten_thousand_overlapping_regions_in_one_long_sample(overlap):
    """Before: 21 s for 10k overlapping regions in one 600 KB line (the "max" resolution was quadratic)."""
    regions = [{"start_char": 60 * i, "end_char": 60 * i + 120, "weight": 1.0 + i % 3} for i in range(10_000)]
    sample = {"text": "x" * 600_100, "learning_regions": regions}
    if overlap == "error":
        with pytest.raises(FormatError, match=r"learning_regions\[1\].*overlaps learning_regions\[0\]"):
            parse(sample)
        return
    pieces = parse(sample, overlap="max").regions
    assert (
        pieces[0].start == 0 and pieces[-1].end == 600_060 and all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    )

    def block_weight(block):  # the highest weight of the (at most two) regions covering a 60-character block
        return max(1.0 + r % 3 for r in (block - 1, block) if 0 <= r < 10_000)

    char_weights = [block_weight(c // 60) for c in range(600_060)]
    assert parse(sample, overlap="max").char_weights()[:600_060] == char_weights


@pytest.mark.parametrize(
    "sample, suggestion",
    [
        ({"text": "ab", "learning_region": [{"start_char": 0, "end_char": 1}]}, "learning_regions"),
        ({"text": "ab <LEARN>c</LEARN>", "defualt_weight": 1.0}, "default_weight"),
        ({"segment": [{"content": "ab", "learn": True}]}, "segments"),
    ],
)
def test_near_miss_top_level_keys_are_errors_with_one_suggestion(sample, suggestion):
    """Before: silently ignored as metadata, so the sample taught nothing (or everything at the default weight)."""
    typo = next(key for key in sample if key != "text")
    with pytest.raises(FormatError, match=f"unknown key '{typo}'; did you mean '{suggestion}'") as caught:
        parse(sample, sample_id="s.jsonl:3")
    assert caught.value.field == typo and caught.value.sample_id == "s.jsonl:3"
    parse({"text": "ab", "id": 7, "language": "en", "source": "web"})  # metadata keys stay allowed
    with pytest.raises(FormatError, match="did you mean"):
        parse(sample, extra_keys="keep")  # a typo is not kept by "keep" ...
    if "text" in sample:
        assert parse(sample, extra_keys=[typo]).text  # ... only when named


@pytest.mark.parametrize(
    "sample",
    [
        {"text": "ab <LEARN>c</LEARN>", "score": 0.5},
        {"text": "ab", "learning_regions": [{"start_char": 0, "end_char": 1}], "notes": "x"},
        {"segments": [{"content": "ab", "learn": True}], "text_length": 2},
        {"text": "ab", "tools": []},  # a chat key next to plain text
    ],
)
def test_every_other_unknown_top_level_key_is_an_error_unless_kept(sample):
    """Before: any key that was not a near miss was silently ignored. Now: only METADATA_KEYS and the keys
    ``extra_keys`` names are metadata."""
    from mrloss.formats import METADATA_KEYS

    unknown = list(sample)[-1]
    with pytest.raises(FormatError, match=f"unknown key '{unknown}'.*extra_keys='keep'") as caught:
        parse(sample, sample_id="s.jsonl:4")
    assert caught.value.field == unknown and caught.value.sample_id == "s.jsonl:4"
    expected = parse({key: value for key, value in sample.items() if key != unknown}).char_weights()
    assert parse(sample, extra_keys="keep").char_weights() == expected
    assert parse(sample, extra_keys=[unknown]).char_weights() == expected
    with pytest.raises(FormatError, match=f"unknown key '{unknown}'"):
        parse(sample, extra_keys=["other"])
    assert parse({**sample, **dict.fromkeys(METADATA_KEYS, 1)}, extra_keys=[unknown]).char_weights() == expected
    with pytest.raises(ValueError, match="extra_keys"):
        parse(sample, extra_keys="sometimes")


def test_extra_keys_reach_prepare_show_datasets_and_the_config(tmp_path, capsys):
    from mrloss.cli import main as cli_main
    from mrloss.data import MultiRegionDataset
    from mrloss.data.tokenizer import train_bpe_tokenizer
    from mrloss.training.config import ConfigError, config_from_dict

    samples = [{"text": f"q{i} <LEARN>a{i}</LEARN>", "score": i} for i in range(4)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(sample) + "\n" for sample in samples), encoding="utf-8")
    out = tmp_path / "out"
    assert cli_main(["prepare", str(raw), "--output-dir", str(out)]) == 1
    assert f"sample {raw}:1, field 'score': unknown key 'score'" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["prepare", str(raw), "--output-dir", str(out), "--extra-keys", "keep", "--to", "structured"]) == 0
    written = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [sample["score"] for sample in written] == [0, 1, 2, 3] and "segments" in written[0]

    assert cli_main(["show", str(raw), "--color", "never"]) == 1
    assert "unknown key 'score'" in capsys.readouterr().err
    assert cli_main(["show", str(raw), "--color", "never", "--extra-keys", "score"]) == 0

    tokenizer = train_bpe_tokenizer([sample["text"] for sample in samples], vocab_size=300)
    run = tmp_path / "run"  # `mrloss show --run`: the run's data.extra_keys
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "config.yaml").write_text("data:\n  extra_keys: [score]\n", encoding="utf-8")
    assert cli_main(["show", str(raw), "--color", "never", "--run", str(run)]) == 0
    assert cli_main(["show", str(raw), "--color", "never", "--run", str(run), "--extra-keys", "error"]) == 1
    capsys.readouterr()
    with pytest.raises(FormatError, match="unknown key 'score'"):
        MultiRegionDataset(raw, tokenizer)
    assert len(MultiRegionDataset(raw, tokenizer, extra_keys=["score"])) == 4

    assert config_from_dict({"data": {"extra_keys": "keep"}}).data.extra_keys == "keep"
    assert config_from_dict({"data": {"extra_keys": ["score"]}}).data.extra_keys == ["score"]
    assert config_from_dict({}).data.extra_keys == "error"
    assert config_from_dict({"data": {"extra_keys": "score"}}).data.extra_keys == ["score"]  # one name, as lists
    with pytest.raises(ConfigError, match="data.extra_keys"):
        config_from_dict({"data": {"extra_keys": 3}})


# ------------------------------------------------------------------------------------------- the format registry


def _parse_lines(sample: dict, *, sample_id=None) -> RegionText:
    """A throwaway format: ``{"lines": [[text, weight], ...]}``; a line of weight > 0 is a region."""
    regions, position = [], 0
    for text, weight in sample["lines"]:
        if weight > 0:
            regions.append(Region(position, position + len(text), weight, "line"))
        position += len(text)
    return RegionText("".join(text for text, _ in sample["lines"]), regions)


def _write_lines(region_text: RegionText) -> dict:
    weights = region_text.char_weights()
    borders = sorted({0, len(weights)} | {b for r in region_text.regions for b in (r.start, r.end)})
    return {"lines": [[region_text.text[a:b], weights[a]] for a, b in zip(borders, borders[1:])]}


LINES = FormatSpec(
    name="lines",
    keys=("lines",),
    parse=_parse_lines,
    write=_write_lines,
    identifying_keys=("lines",),
    text_field="lines",
)


def test_a_new_format_is_one_spec_in_the_list():
    """Everything `mrloss.formats` does with a format comes from its FormatSpec in the list: a registry with one
    more spec detects, checks, parses, writes and converts the new format with no other change."""
    registry = FormatRegistry(FORMAT_SPECS + (LINES,))
    assert registry.formats == FORMATS + ("lines",)
    assert registry.input_formats == FORMATS + ("lines", "messages")  # plain-text formats first, then parse-only
    sample = {"lines": [["Q: why? ", 0.0], ["A: because.", 2.0]], "id": 7}
    assert registry.detect_format(sample) == "lines" and detect_format(sample) == "tag_based"
    region_text = registry.parse(sample)
    assert region_text.char_weights() == [0.0] * 8 + [2.0] * 11
    tagged = registry.convert(sample, "tag_based")
    assert tagged["id"] == 7 and parse(tagged).char_weights() == region_text.char_weights()
    assert registry.convert(tagged, "lines") == sample
    assert registry.convert(sample, "structured", "lines")["id"] == 7
    # its keys take part in every key check: another format's key, near misses of its own key, the empty text
    with pytest.raises(FormatError, match="does not belong to a lines sample") as caught:
        registry.parse({**sample, "text": "x"})
    assert caught.value.field == "text"
    with pytest.raises(FormatError, match="'line'; did you mean 'lines'"):
        registry.parse({"text": "x", "line": []})
    with pytest.raises(FormatError, match="does not belong to a tag_based sample"):
        registry.parse({"text": "x", "lines": []}, "tag_based")
    with pytest.raises(FormatError, match="no text") as caught:
        registry.parse({"lines": []})
    assert caught.value.field == "lines"
    with pytest.raises(ValueError, match="format must be 'auto' or one of"):
        FormatRegistry(FORMAT_SPECS).parse(sample, "lines")


def test_the_registry_needs_unique_names_and_one_fallback():
    with pytest.raises(ValueError, match="unique"):
        FormatRegistry(FORMAT_SPECS + (FORMAT_SPECS[0],))
    fallback = FormatSpec(name="plain", keys=("body",), parse=_parse_lines)
    with pytest.raises(ValueError, match="fallback"):
        FormatRegistry(FORMAT_SPECS + (fallback,))


def test_the_public_names_come_from_the_list():
    assert FORMATS == tuple(spec.name for spec in FORMAT_SPECS if spec.write is not None)
    assert set(INPUT_FORMATS) == {spec.name for spec in FORMAT_SPECS}
