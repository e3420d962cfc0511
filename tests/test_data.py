"""mrloss.data: the token-weight rule on Chinese + English, truncation, datasets, padding and packing."""
import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrloss.data import MultiRegionCollator, MultiRegionDataset, encode, train_bpe_tokenizer, write_examples
from mrloss.data.examples import EXAMPLES
from mrloss.formats import FORMATS, FormatError, Region, RegionText, parse
from mrloss.ops.reference import reference_linear_cross_entropy

REGION_TEXTS = [parse(sample, sample_id=sample["id"]) for sample in EXAMPLES]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([rt.text for rt in REGION_TEXTS], vocab_size=600)


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("examples"))


def _token_bytes(tokenizer, token_id):
    """The UTF-8 bytes a byte-level BPE token stands for."""
    table = _byte_decoder()
    return bytes(table[c] for c in tokenizer.convert_ids_to_tokens(token_id))


@functools.lru_cache(maxsize=1)
def _byte_decoder():
    """GPT-2's byte-level map, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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
        owners = byte_owner[cursor:cursor + len(_token_bytes(tokenizer, token_id))]
        cursor += len(owners)
        expected.append((max(char_weights[i] for i in owners), {char_weights[i] for i in owners}, owners))
    assert cursor == len(byte_owner)
    return expected


def test_token_weight_is_the_max_char_weight_of_its_bytes(tokenizer):
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
    text = draw(st.text(st.sampled_from(list("ab the 学习概念降龘𝕏é\n")), min_size=1, max_size=30))
    borders = sorted(draw(st.sets(st.integers(0, len(text)), max_size=6)))
    weights = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    regions = [Region(a, b, draw(weights), "t") for a, b in zip(borders[::2], borders[1::2]) if a < b]
    return RegionText(text, regions, draw(weights))


@settings(max_examples=60, deadline=None)
@given(mixed_region_texts())
def test_random_texts_follow_the_byte_oracle(tokenizer, region_text):
    encoding = encode(region_text, tokenizer)
    ids = encoding["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    expected = [weight for weight, _, _ in _byte_oracle(region_text, tokenizer, ids[:-1])]
    assert encoding["token_weights"] == [0.0] + expected[1:] + [expected[-1]]
    for k, region in enumerate(encoding["region_ids"][:-1]):
        assert (region_text.regions[region].weight if region >= 0 else region_text.default_weight) == expected[k]


def test_half_of_a_chinese_character_in_a_region_is_learned(tokenizer):
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
    assert left["input_ids"] == full["input_ids"][:n - 3]  # right is the default
    left = encode(rt, tokenizer, max_length=n - 3, truncation="left")
    assert left["input_ids"] == full["input_ids"][3:] and left["input_ids"][-1] == tokenizer.eos_token_id
    assert left["token_weights"][0] == 0.0 and left["token_weights"][1:] == full["token_weights"][4:]
    assert left["truncated_regions"] == [0]

    with pytest.raises(FormatError) as info:
        encode(rt, tokenizer, max_length=n - 1, truncation="error", sample_id="file.jsonl:9")
    assert info.value.sample_id == "file.jsonl:9" and str(n) in str(info.value)
    assert encode(rt, tokenizer, max_length=n, truncation="error")["input_ids"] == full["input_ids"]


# ---------------------------------------------------------------------------------------------- dataset

def test_dataset_reads_every_format_and_file_type_identically(tokenizer, example_files, tmp_path):
    import pyarrow
    import pyarrow.parquet

    samples = [json.loads(line) for line in example_files["position_based"].read_text(encoding="utf-8").splitlines()]
    (tmp_path / "p.json").write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(samples), tmp_path / "p.parquet")
    structured = [json.loads(line) for line in example_files["structured"].read_text(encoding="utf-8").splitlines()]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(structured), tmp_path / "s.parquet")

    datasets = [MultiRegionDataset(example_files[name], tokenizer) for name in FORMATS]
    datasets += [MultiRegionDataset(tmp_path / name, tokenizer) for name in ("p.json", "p.parquet", "s.parquet")]
    reference = datasets[0]
    assert len(reference) == len(EXAMPLES) and reference.region_types == ["concept", "definition", "methodology"]
    for dataset in datasets[1:]:
        assert len(dataset) == len(reference) and dataset.region_types == reference.region_types
        for i in range(len(reference)):
            for key, value in reference[i].items():
                assert torch.equal(dataset[i][key], value), (dataset.sample_ids[i], key)
    item = reference[3]
    assert item["input_ids"].dtype == torch.int64 and item["token_weights"].dtype == torch.float32
    assert item["region_ids"].dtype == torch.int64 and item["region_type_ids"].dtype == torch.int64
    regions = REGION_TEXTS[3].regions
    expected_types = [-1 if r < 0 else reference.region_types.index(regions[r].type) for r in item["region_ids"].tolist()]
    assert item["region_type_ids"].tolist() == expected_types
    assert reference.sample_ids[0] == f"{example_files['position_based']}:1"


def test_dataset_region_type_vocabulary_extends_the_given_one(tokenizer, example_files):
    dataset = MultiRegionDataset([example_files["tag_based"]], tokenizer, region_types=["methodology", "unused"])
    assert dataset.region_types == ["methodology", "unused", "concept", "definition"]


def test_dataset_names_the_bad_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok <LEARN>fine</LEARN>"}\n\n{"text": "x", "learning_regions": '
                    '[{"start_char": 0, "end_char": 1, "weigth": 2}]}\n{not json\n', encoding="utf-8")
    with pytest.raises(FormatError) as info:
        MultiRegionDataset(path, tokenizer)
    assert info.value.sample_id == f"{path}:3" and info.value.field == "learning_regions[0].weigth"
    assert "1 more bad sample" in str(info.value)


def test_dataset_reports_truncated_samples(tokenizer):
    samples = [{"text": "context " * 20 + "<LEARN>answer</LEARN>"}, {"text": "<LEARN>short</LEARN> one"}]
    with pytest.warns(UserWarning, match="1 of 2 samples"):
        dataset = MultiRegionDataset.from_samples(samples, tokenizer, max_length=8, sample_ids=["a", "b"])
    assert dataset.truncated == [("a", [0])]
    assert all(len(dataset[i]["input_ids"]) <= 8 for i in range(2))


# ---------------------------------------------------------------------------------------------- collator

def _items(tokenizer, count=5):
    with pytest.warns(UserWarning, match="truncation"):
        dataset = MultiRegionDataset.from_samples(EXAMPLES[3:3 + count], tokenizer, max_length=40)
    return [dataset[i] for i in range(len(dataset))]


def test_padding_collation(tokenizer):
    items = _items(tokenizer)
    batch = MultiRegionCollator(tokenizer.pad_token_id, pad_to_multiple_of=16)(items)
    width = -(-max(len(i["input_ids"]) for i in items) // 16) * 16
    assert batch["input_ids"].shape == (len(items), width)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_weights", "region_type_ids"}
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert torch.equal(batch["token_weights"][row, :n], item["token_weights"])
        assert (batch["token_weights"][row, n:] == 0).all() and (batch["region_type_ids"][row, n:] == -1).all()
        expected_labels = torch.where(item["token_weights"] > 0, item["input_ids"], -100)
        assert torch.equal(batch["labels"][row, :n], expected_labels) and (batch["labels"][row, n:] == -100).all()
    assert (batch["labels"] != -100).any() and (batch["labels"][:, 0] == -100).all()


def test_packing_collation_layout(tokenizer):
    items = _items(tokenizer)
    items[1]["token_weights"][0] = 5.0  # a sample claiming its first token: packing must drop that
    lengths = [len(i["input_ids"]) for i in items]
    batch = MultiRegionCollator(tokenizer.pad_token_id, pack=True)(items)
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert torch.equal(batch["input_ids"][0], torch.cat([i["input_ids"] for i in items]))
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:k]) for k in range(len(items))]
    assert all(batch["token_weights"][0, s] == 0 and batch["labels"][0, s] == -100 for s in starts)
    assert batch["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and batch["max_length_k"] == max(lengths)
    assert (batch["attention_mask"] == 1).all()

    capped = MultiRegionCollator(tokenizer.pad_token_id, pack=True, max_length=64)(items)
    rows = capped["position_ids"]
    assert capped["input_ids"].shape[1] <= 64 and capped["input_ids"].shape[0] > 1
    assert (capped["attention_mask"].sum(1) <= 64).all() and capped["attention_mask"].sum() == sum(lengths)
    padding = capped["attention_mask"] == 0
    assert (capped["labels"][padding] == -100).all() and (capped["region_type_ids"][padding] == -1).all()
    segments = capped["cu_seq_lens_q"].diff()
    assert segments.sum() == rows.numel() and (rows.flatten() == 0).sum() == len(segments)
    with pytest.raises(ValueError, match="item 0"):
        MultiRegionCollator(tokenizer.pad_token_id, pack=True, max_length=10)(items)


def test_packed_loss_equals_the_sum_of_per_sample_losses(tokenizer):
    """With a position-wise model (hidden = embedding of the token), no sample's loss may depend on its
    neighbours in the row: the packed sum of weighted losses equals the padded one, in float64."""
    torch.manual_seed(0)
    items = _items(tokenizer)
    embedding = torch.randn(len(tokenizer), 24, dtype=torch.float64)
    head = torch.randn(len(tokenizer), 24, dtype=torch.float64)

    def loss(batch):
        return reference_linear_cross_entropy(embedding[batch["input_ids"]], head, batch["labels"],
                                              batch["token_weights"], reduction="sum", shift=True)

    packed = loss(MultiRegionCollator(tokenizer.pad_token_id, pack=True, max_length=80)(items))
    padded = loss(MultiRegionCollator(tokenizer.pad_token_id)(items))
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)
    assert padded > 0


def test_collator_rejects_bad_items(tokenizer):
    collator = MultiRegionCollator(tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="item 1"):
        collator([{"input_ids": [1, 2], "token_weights": [0, 1]}, {"input_ids": [1, 2], "token_weights": [0.0]}])
    with pytest.raises(ValueError, match="empty"):
        collator([])
    batch = collator([{"input_ids": [5, 6, 7], "token_weights": [0.0, 1.0, 0.0]}])
    assert batch["labels"].tolist() == [[-100, 6, -100]] and batch["region_type_ids"].tolist() == [[-1, -1, -1]]
