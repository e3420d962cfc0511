"""mrloss.data.encode: the token-weight rule on Chinese + English and truncation (datasets and collation:
test_multi_region_dataset.py; the tokenizer fixture: conftest.py)."""

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrloss.data import encode, train_bpe_tokenizer
from mrloss.data.examples import EXAMPLES
from mrloss.formats import FormatError, Region, RegionText, parse

REGION_TEXTS = [parse(sample, sample_id=sample["id"]) for sample in EXAMPLES]


def _token_bytes(tokenizer, token_id):
    """The UTF-8 bytes a byte-level BPE token stands for."""
    table = _byte_decoder()
    return bytes(table[c] for c in tokenizer.convert_ids_to_tokens(token_id))


@functools.lru_cache(maxsize=1)
def _byte_decoder():
    """GPT-2's byte-level map, inverted: printable stand-in character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


# ---------------------------------------------------------------------------------------------- the token-weight rule


def _byte_oracle(region_text, tokenizer, input_ids):
    """Independent oracle: (expected weight, set of char weights) per token, from the tokens' bytes mapped
    back to the characters of the UTF-8 text they come from."""
    char_weights = region_text.char_weights()
    byte_owner = [i for i, ch in enumerate(region_text.text) for _ in ch.encode("utf-8")]
    cursor, expected = 0, []
    for token_id in input_ids:
        owners = byte_owner[cursor : cursor + len(_token_bytes(tokenizer, token_id))]
        cursor += len(owners)
        expected.append((max(char_weights[i] for i in owners), {char_weights[i] for i in owners}, owners))
    assert cursor == len(byte_owner)
    return expected


@pytest.fixture(scope="module", params=["bpe", "qwen"])
def any_tokenizer(request):
    """The small BPE trained on the examples, and Qwen's real vocabulary (151,643 tokens)."""
    return request.getfixturevalue("tokenizer" if request.param == "bpe" else "qwen_tokenizer")


def test_token_weight_is_the_max_char_weight_of_its_bytes(any_tokenizer):
    tokenizer = any_tokenizer
    straddling = partial_characters = 0
    for rt in REGION_TEXTS:
        encoding = encode(rt, tokenizer, add_eos=False)
        for k, (weight, weights, owners) in enumerate(_byte_oracle(rt, tokenizer, encoding["input_ids"])):
            assert encoding["token_weights"][k] == (0.0 if k == 0 else weight), (rt.text, k)
            region = encoding["region_ids"][k]
            assert (rt.regions[region].weight if region >= 0 else rt.default_weight) == weight
            straddling += len(weights) > 1
            partial_characters += len(rt.text[owners[0]].encode("utf-8")) > len(owners)
    assert straddling > 0 and partial_characters > 0  # the data exercises both cases


@st.composite
def mixed_region_texts(draw):
    text = draw(st.text(st.sampled_from(list("ab the 学习概念降龘𝕏é\n🙂👍🏽")), min_size=1, max_size=30))
    borders = sorted(draw(st.sets(st.integers(0, len(text)), max_size=6)))
    weights = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    regions = [Region(a, b, draw(weights), "t") for a, b in zip(borders[::2], borders[1::2]) if a < b]
    return RegionText(text, regions, draw(weights))


@settings(max_examples=60, deadline=None)
@given(mixed_region_texts())
def test_random_texts_follow_the_byte_oracle(any_tokenizer, region_text):
    tokenizer = any_tokenizer
    encoding = encode(region_text, tokenizer)
    ids = encoding["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    expected = [weight for weight, _, _ in _byte_oracle(region_text, tokenizer, ids[:-1])]
    assert encoding["token_weights"] == [0.0] + expected[1:] + [expected[-1]]
    for k, region in enumerate(encoding["region_ids"][:-1]):
        assert (region_text.regions[region].weight if region >= 0 else region_text.default_weight) == expected[k]


def test_half_of_a_chinese_character_in_a_region_is_learned(any_tokenizer):
    tokenizer = any_tokenizer
    rt = RegionText("它是龘字", [Region(2, 3, 2.0, "concept")])  # 龘 is rare: split into byte tokens
    encoding = encode(rt, tokenizer, add_eos=False)
    in_region = [k for k, (s, e) in enumerate(encoding["offsets"]) if s < 3 and e > 2]
    assert len(in_region) >= 2
    assert all(encoding["token_weights"][k] == 2.0 and encoding["region_ids"][k] == 0 for k in in_region)
    assert sum(w > 0 for w in encoding["token_weights"]) == len(in_region)


def test_first_token_is_zero_and_eos_takes_the_weight_before_it(tokenizer):
    rt = RegionText("learn this", [Region(0, 10, 1.5, "concept")])
    encoding = encode(rt, tokenizer)
    assert encoding["input_ids"][-1] == tokenizer.eos_token_id
    assert encoding["token_weights"][0] == 0.0 and encoding["token_weights"][-1] == 1.5
    assert encoding["region_ids"][-1] == 0 and encoding["region_types"] == ["concept"]
    assert encoding["offsets"][-1] == (10, 10)
    no_eos = encode(rt, tokenizer, add_eos=False)
    assert no_eos["input_ids"] == encoding["input_ids"][:-1]
    context_only = encode(RegionText("no learning", [Region(0, 2, 1.0)]), tokenizer)
    assert context_only["token_weights"][-1] == 0.0


def test_trimmed_offsets_still_cover_leading_spaces(tokenizer):
    """Tokenizers that trim the space out of ' word' offsets must still learn a learned space."""
    from tokenizers import processors

    trimmed = train_bpe_tokenizer([rt.text for rt in REGION_TEXTS[:5]], vocab_size=300)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    rt = RegionText("ab  cd", [Region(2, 3, 2.0, "space")])
    encoding = encode(rt, trimmed, add_eos=False)
    raw = trimmed("ab  cd", return_offsets_mapping=True)["offset_mapping"]
    assert not any(s <= 2 < e for s, e in raw)  # the tokenizer's own offsets drop that space
    assert 2.0 in encoding["token_weights"]
    assert all(s <= e for s, e in encoding["offsets"])
    covered = {i for s, e in encoding["offsets"] for i in range(s, e)}
    assert covered == set(range(len(rt.text)))


def test_encode_rejects_slow_tokenizers_and_bad_options(tokenizer):
    rt = RegionText("abc")
    with pytest.raises(TypeError, match="fast tokenizer"):
        encode(rt, object())
    with pytest.raises(ValueError, match="truncation"):
        encode(rt, tokenizer, truncation="middle")
    with pytest.raises(ValueError, match="max_length"):
        encode(rt, tokenizer, max_length=0)


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_right_left_error_and_cut_regions(tokenizer):
    text = "intro " * 5 + "concept words here " + "outro " * 5
    start = text.index("concept")
    rt = RegionText(text, [Region(0, 5, 1.0, "head"), Region(start, start + 17, 2.0, "concept")])
    full = encode(rt, tokenizer)
    n = len(full["input_ids"])
    assert full["untruncated_length"] == n and full["truncated_regions"] == []

    right = encode(rt, tokenizer, max_length=4)
    assert right["input_ids"] == full["input_ids"][:4] and right["token_weights"][0] == 0.0
    assert right["truncated_regions"] == [1] and right["untruncated_length"] == n

    left = encode(rt, tokenizer, max_length=n - 3)
    assert left["input_ids"] == full["input_ids"][: n - 3]  # right is the default
    left = encode(rt, tokenizer, max_length=n - 3, truncation="left")
    assert left["input_ids"] == full["input_ids"][3:] and left["input_ids"][-1] == tokenizer.eos_token_id
    assert left["token_weights"][0] == 0.0 and left["token_weights"][1:] == full["token_weights"][4:]
    assert left["truncated_regions"] == [0]

    with pytest.raises(FormatError) as info:
        encode(rt, tokenizer, max_length=n - 1, truncation="error", sample_id="file.jsonl:9")
    assert info.value.sample_id == "file.jsonl:9" and str(n) in str(info.value)
    assert encode(rt, tokenizer, max_length=n, truncation="error")["input_ids"] == full["input_ids"]


# ------------------------------------------------------------- the vectorized batch against a plain reference


def _reference_encode(region_text, tokenizer, *, max_length=None, truncation="right", add_eos=True):
    """The token-weight rule of `mrloss.data.encode`, written plainly, one token at a time (the oracle of the
    vectorized batch alignment)."""
    text_length = len(region_text.text)
    encoding = tokenizer(
        region_text.text, return_offsets_mapping=True, add_special_tokens=not region_text.has_special_tokens
    )
    ids, spans, covered = list(encoding["input_ids"]), [], 0
    for start, end in encoding["offset_mapping"]:
        if end > start or start > covered:
            start = min(start, covered)
        spans.append([start, end])
        covered = max(covered, end)
    filled = [k for k, (start, end) in enumerate(spans) if end > start]
    if filled and max(end for _, end in spans) < text_length:
        spans[filled[-1]][1] = text_length
    eos = tokenizer.eos_token_id
    if add_eos and not region_text.has_special_tokens and (not ids or ids[-1] != eos):
        ids.append(eos)
        spans.append([text_length, text_length])
    char_weights, char_regions = region_text.char_weights(), region_text.char_region_ids()
    weights, regions = [], []
    for start, end in spans:
        if end > start:
            weight = max(char_weights[start:end])
            inside = [c for c in range(start, end) if char_regions[c] >= 0 and char_weights[c] == weight]
            weights.append(weight)
            regions.append(char_regions[inside[0]] if inside else -1)
        else:
            weights.append(weights[-1] if weights else 0.0)
            regions.append(regions[-1] if regions else -1)

    def learned(weights, regions):
        return [sum(1 for w, r in zip(weights[1:], regions[1:]) if w > 0 and r == i) for i in range(len(regions_of))]

    regions_of = region_text.regions
    untruncated_length, truncated = len(ids), []
    if max_length is not None and len(ids) > max_length:
        keep = slice(0, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        before = learned(weights, regions)
        ids, spans, weights, regions = ids[keep], spans[keep], weights[keep], regions[keep]
        truncated = [i for i, (a, b) in enumerate(zip(before, learned(weights, regions))) if b < a]
    weights[:1] = [0.0] * min(1, len(weights))
    return {
        "input_ids": ids,
        "token_weights": weights,
        "region_ids": regions,
        "offsets": [tuple(span) for span in spans],
        "region_types": [region.type for region in regions_of],
        "truncated_regions": truncated,
        "untruncated_length": untruncated_length,
    }


def _random_region_texts(rng, count, alphabet, special=()):
    region_texts = []
    for _ in range(count):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        if special and rng.random() < 0.5:
            cut = rng.randint(0, len(text))
            text = text[:cut] + rng.choice(special) + text[cut:]
        borders = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        regions = [
            Region(a, b, rng.choice([0.0, 0.5, 1.0, 2.0]), rng.choice("xyz"))
            for a, b in zip(borders[::2], borders[1::2])
            if a < b
        ]
        region_texts.append(
            RegionText(text, regions, rng.choice([0.0, 0.25]), has_special_tokens=bool(special) and rng.random() < 0.3)
        )
    return region_texts


ALPHABET = list("ab the 学习概念降龘𝕏é\n") + ["🙂", "👍🏽", "  ", "\t"]


@pytest.mark.parametrize("tokenizer_name", ["bpe", "trimmed_bos", "qwen"])
def test_vectorized_batch_equals_the_plain_reference(tokenizer_name, tokenizer, qwen_tokenizer):
    import random

    from tokenizers import processors

    from mrloss.data import encode_batch

    if tokenizer_name == "trimmed_bos":  # offsets without leading spaces, and a BOS with an empty span
        chosen = train_bpe_tokenizer([rt.text for rt in REGION_TEXTS[:5]], vocab_size=300)
        chosen.backend_tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=True),
                processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 1)]),
            ]
        )
    else:
        chosen = qwen_tokenizer if tokenizer_name == "qwen" else tokenizer
    special = ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if tokenizer_name == "qwen" else ()
    rng = random.Random(5)
    region_texts = _random_region_texts(rng, 120, ALPHABET, special) + REGION_TEXTS
    for options in (
        {},
        {"add_eos": False},
        {"max_length": 7, "truncation": "right"},
        {"max_length": 9, "truncation": "left"},
    ):
        got = encode_batch(region_texts, chosen, **options)
        for region_text, encoding in zip(region_texts, got):
            assert encoding == _reference_encode(region_text, chosen, **options), (region_text, options)
