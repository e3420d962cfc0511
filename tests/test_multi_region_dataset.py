"""MultiRegionDataset and MultiRegionCollator: every format and file type, region types, bad lines,
truncation reports, padding and packing (the seed guide's ``python -m pytest tests/test_multi_region_dataset.py``)."""

import json

import pytest
import torch

from mrloss.data import MultiRegionCollator, MultiRegionDataset
from mrloss.data.examples import EXAMPLES
from mrloss.formats import FORMATS, FormatError, parse
from mrloss.ops.reference import reference_linear_cross_entropy

REGION_TEXTS = [parse(sample, sample_id=sample["id"]) for sample in EXAMPLES]


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
    expected_types = [
        -1 if r < 0 else reference.region_types.index(regions[r].type) for r in item["region_ids"].tolist()
    ]
    assert item["region_type_ids"].tolist() == expected_types
    assert reference.sample_ids[0] == f"{example_files['position_based']}:1"


def test_dataset_region_type_vocabulary_extends_the_given_one(tokenizer, example_files):
    dataset = MultiRegionDataset([example_files["tag_based"]], tokenizer, region_types=["methodology", "unused"])
    assert dataset.region_types == ["methodology", "unused", "concept", "definition"]


def test_dataset_names_the_bad_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "ok <LEARN>fine</LEARN>"}\n\n{"text": "x", "learning_regions": '
        '[{"start_char": 0, "end_char": 1, "weigth": 2}]}\n{not json\n',
        encoding="utf-8",
    )
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
        dataset = MultiRegionDataset.from_samples(EXAMPLES[3 : 3 + count], tokenizer, max_length=40)
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
        return reference_linear_cross_entropy(
            embedding[batch["input_ids"]], head, batch["labels"], batch["token_weights"], reduction="sum", shift=True
        )

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


def test_samples_and_a_tokenizer_in_the_wrong_place_say_what_to_call(tokenizer):
    """Before (#23 rough edges): MultiRegionDataset(list_of_dicts) and MultiRegionCollator(tokenizer) failed with a
    bare TypeError from deep inside."""
    samples = EXAMPLES[:2]
    with pytest.raises(TypeError, match=r"got dict; for in-memory samples call MultiRegionDataset\.from_samples"):
        MultiRegionDataset(samples, tokenizer)
    with pytest.raises(TypeError, match=r"got a tokenizer; pass tokenizer\.pad_token_id"):
        MultiRegionCollator(tokenizer)
    with pytest.raises(TypeError, match=r"got None; pass tokenizer\.pad_token_id"):
        MultiRegionCollator(None)
    assert MultiRegionCollator(torch.tensor(3)).pad_token_id == 3  # any integer (numpy, 0-dim tensor) is fine
