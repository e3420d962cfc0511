"""`mrloss prepare` at scale: bounded memory, processes, hash split, outputs as one unit, tokenized Arrow data,
and the bad inputs of #13 (empty file, lone surrogates, Parquet type conflicts, control characters)."""

import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from mrloss.data import MultiRegionDataset
from mrloss.data import prepare as prepare_module
from mrloss.data.examples import EXAMPLES
from mrloss.data.prepare import in_validation, main
from mrloss.data.records import read_records

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path, samples):
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def _many(count):
    """``count`` distinct tag_based samples from the shipped examples (ids s0, s1, ...)."""
    return [{**EXAMPLES[i % len(EXAMPLES)], "id": f"s{i}", "text": f"[{i}] " + EXAMPLES[i % len(EXAMPLES)]["text"]}
            for i in range(count)]  # fmt: skip


def _files(directory):
    """The entries of ``directory`` besides prepare's record of its outputs (every scratch / lock file counts)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name != prepare_module.MANIFEST)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------- streaming, bounded memory


@pytest.mark.parametrize("num_proc", [1, 2])
def test_stream_holds_a_bounded_number_of_samples_and_keeps_the_order(tmp_path, monkeypatch, num_proc, tokenizer_dir):
    """Chunks of 4 samples; the reader is never more than (window + 1) chunks ahead of the writer, and the
    outputs (processes or not) are the input order, split by the hash."""
    chunk, window = 4, 2 * num_proc
    monkeypatch.setattr(prepare_module, "CHUNK_SIZE", chunk)
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_BYTES", 0)
    progress = {"read": 0, "written": 0, "ahead": 0, "largest": 0}
    original_iter, original_write = prepare_module.iter_records, prepare_module._SplitWriter.write

    def counting_iter(path, **options):
        for record in original_iter(path, **options):
            progress["read"] += 1
            progress["ahead"] = max(progress["ahead"], progress["read"] - progress["written"])
            yield record

    def counting_write(self, part):
        progress["written"] += len(part.samples)
        progress["largest"] = max(progress["largest"], len(part.samples))
        original_write(self, part)

    monkeypatch.setattr(prepare_module, "iter_records", counting_iter)
    monkeypatch.setattr(prepare_module._SplitWriter, "write", counting_write)
    samples = _many(60)
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    out = tmp_path / "out"
    argv = [str(raw), "--output-dir", str(out), "--val-fraction", "0.2", "--num-proc", str(num_proc)]
    assert main(argv + ["--tokenizer", str(tokenizer_dir)]) == 0
    assert progress["read"] == 60 and progress["largest"] <= chunk
    assert progress["ahead"] <= (window + 1) * chunk, progress
    chosen = {i for i in range(60) if in_validation(i, 0, 0.2)}
    assert [r.sample["id"] for r in read_records(out / "validation.jsonl")] == [f"s{i}" for i in sorted(chosen)]
    assert [r.sample for r in read_records(out / "train.jsonl")] == [
        s for i, s in enumerate(samples) if i not in chosen
    ]
    assert _files(out) == ["train.jsonl", "train.tokenized", "validation.jsonl", "validation.tokenized"]


def _die(chunk):
    os._exit(9)  # a worker killed (e.g. by the OOM killer)


def test_a_dead_worker_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(prepare_module, "_prepare_chunk", _die)
    raw = _jsonl(tmp_path / "raw.jsonl", _many(5))
    assert main([str(raw), "--output-dir", str(tmp_path / "out"), "--num-proc", "2"]) == 1
    err = capsys.readouterr().err
    assert "a worker process died" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_json_output_is_written_chunk_by_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_SIZE", 3)
    samples = _many(10)
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    assert main([str(raw), "--output-dir", str(tmp_path / "out"), "--file-type", "json", "--to", "structured"]) == 0
    written = json.loads((tmp_path / "out/train.json").read_text(encoding="utf-8"))
    assert [s["id"] for s in written] == [s["id"] for s in samples] and all("segments" in s for s in written)


def test_hash_split_is_reproducible_and_independent_of_the_other_samples(tmp_path):
    picked = [in_validation(i, 7, 0.1) for i in range(20000)]
    assert 0.09 < sum(picked) / len(picked) < 0.11
    assert picked == [in_validation(i, 7, 0.1) for i in range(20000)]
    assert picked != [in_validation(i, 8, 0.1) for i in range(20000)]
    short, long = _jsonl(tmp_path / "short.jsonl", _many(30)), _jsonl(tmp_path / "long.jsonl", _many(50))
    for raw in (short, long):
        assert main([str(raw), "--output-dir", str(tmp_path / raw.stem), "--val-fraction", "0.3", "--seed", "7"]) == 0
    first = [r.sample["id"] for r in read_records(tmp_path / "short/validation.jsonl")]
    more = [r.sample["id"] for r in read_records(tmp_path / "long/validation.jsonl")]
    assert first and more[: len(first)] == first  # appending samples moves no earlier sample


# --------------------------------------------------------------------------------------- outputs as one unit


def _first_run(tmp_path, tokenizer_dir=None):
    raw = _jsonl(tmp_path / "raw.jsonl", _many(40))
    out = tmp_path / "out"
    extra = ["--tokenizer", str(tokenizer_dir)] if tokenizer_dir else []
    assert main([str(raw), "--output-dir", str(out), "--val-fraction", "0.25", *extra]) == 0
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "validation.jsonl")}
    return raw, out, before


def test_a_failed_write_leaves_the_earlier_outputs_intact(tmp_path, monkeypatch, capsys):
    raw, out, before = _first_run(tmp_path)
    monkeypatch.setattr(prepare_module, "CHUNK_SIZE", 8)
    original, calls = prepare_module._SplitWriter.write, []

    def full_disk(self, part):
        calls.append(1)
        if len(calls) == 3:  # in the middle of the stream
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, part)

    monkeypatch.setattr(prepare_module._SplitWriter, "write", full_disk)
    capsys.readouterr()
    assert main([str(raw), "--output-dir", str(out), "--val-fraction", "0.5", "--seed", "1", "--force"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _files(out) == ["train.jsonl", "validation.jsonl"]  # no scratch left


def test_sigterm_in_the_middle_keeps_the_earlier_outputs(tmp_path, monkeypatch, capsys):
    raw, out, before = _first_run(tmp_path)
    monkeypatch.setattr(prepare_module, "CHUNK_SIZE", 8)
    original, calls = prepare_module._SplitWriter.write, []

    def killed(self, part):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, part)

    monkeypatch.setattr(prepare_module._SplitWriter, "write", killed)
    handler = signal.getsignal(signal.SIGTERM)
    assert main([str(raw), "--output-dir", str(out), "--val-fraction", "0.5", "--force"]) == 130
    assert "interrupted" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) is handler
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _files(out) == ["train.jsonl", "validation.jsonl"]


KILLED_IN_A_UNIT = """
import os, signal, sys
from mrloss.data.outputs import REPLACED, OutputUnit
unit = OutputUnit(sys.argv[1], [os.path.join(sys.argv[1], "train.jsonl")]).__enter__()
unit.path(os.path.join(sys.argv[1], "train.jsonl")).write_text("half")
if sys.argv[2] == "in-commit":
    (unit.scratch / REPLACED).mkdir()
    (unit.scratch / REPLACED / "train.jsonl").write_text("the old train file")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("killed", ["before-commit", "in-commit"])
def test_the_scratch_of_a_killed_prepare_is_removed_by_the_next_one(tmp_path, killed):
    """Before: a ``kill -9`` left a hidden ``.mrloss-tmp-*`` folder for good. Now the next prepare into the same
    directory removes it (its process is gone), except old outputs a killed commit had moved aside: kept, named."""
    import subprocess
    import sys

    from mrloss.data.outputs import REPLACED, SCRATCH_PREFIX

    out = tmp_path / "out"
    out.mkdir()
    code = subprocess.run([sys.executable, "-c", KILLED_IN_A_UNIT, str(out), killed], check=False).returncode
    assert code == -signal.SIGKILL
    (left,) = out.glob(f"{SCRATCH_PREFIX}*")
    raw = _jsonl(tmp_path / "raw.jsonl", _many(4))
    if killed == "in-commit":
        with pytest.warns(UserWarning, match="an interrupted commit left earlier outputs"):
            assert main([str(raw), "--output-dir", str(out)]) == 0
        assert (left / REPLACED / "train.jsonl").read_text() == "the old train file"
    else:
        assert main([str(raw), "--output-dir", str(out)]) == 0
        assert not left.exists()
    assert len(read_records(out / "train.jsonl")) == 4


def test_a_failed_rename_puts_everything_back(tmp_path, monkeypatch):
    raw, out, before = _first_run(tmp_path)
    from mrloss.data import outputs

    original, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if Path(target).name == "validation.jsonl" and Path(source).parent.name.startswith(outputs.SCRATCH_PREFIX):
            raise OSError(errno.EIO, "Input/output error")
        original(source, target)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    assert main([str(raw), "--output-dir", str(out), "--val-fraction", "0.5", "--force"]) == 1
    assert any(Path(target) == out / "train.jsonl" for target in calls)  # train had been renamed in
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _files(out) == ["train.jsonl", "validation.jsonl"]


def test_force_without_val_fraction_removes_the_stale_validation_and_tokenized_outputs(tmp_path, tokenizer_dir):
    raw, out, _ = _first_run(tmp_path, tokenizer_dir)
    assert _files(out) == ["train.jsonl", "train.tokenized", "validation.jsonl", "validation.tokenized"]
    assert main([str(raw), "--output-dir", str(out)]) == 2  # earlier outputs, no --force
    assert main([str(raw), "--output-dir", str(out), "--force"]) == 0
    assert _files(out) == ["train.jsonl"] and len(read_records(out / "train.jsonl")) == 40


def test_unwritable_output_dir_fails_before_any_work(tmp_path, monkeypatch, capsys):
    raw = _jsonl(tmp_path / "raw.jsonl", _many(5))
    from mrloss.data import outputs, tokenizer

    def no_work(*args, **kwargs):
        raise AssertionError("tokenizer trained before the output directory was checked")

    monkeypatch.setattr(tokenizer, "train_bpe_tokenizer_for_files", no_work)
    (tmp_path / "a_file").write_text("x")
    assert main([str(raw), "--output-dir", str(tmp_path / "a_file" / "out")]) == 2
    assert "cannot write to" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
    assert main([str(raw), "--output-dir", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and "Permission denied" in err and "Traceback" not in err
    assert not (tmp_path / "ro").exists()  # the directory made for the check is gone again


def test_outputs_follow_the_umask(tmp_path):
    raw = _jsonl(tmp_path / "raw.jsonl", _many(5))
    previous = os.umask(0o022)
    try:
        assert main([str(raw), "--output-dir", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out/train.jsonl").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------ bad inputs


def test_empty_file_is_one_clear_error(tmp_path, capsys, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert main([str(empty)]) == 1 and main([str(empty), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"no samples in {empty}" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no samples in"):
        MultiRegionDataset(empty, tokenizer)


def test_lone_surrogates_and_bad_utf8_name_the_line(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(
        b'{"text": "ok \\ud83d\\ude00 <LEARN>emoji pair</LEARN>"}\n'
        b'{"text": "ab\\ud800c"}\n'
        b'{"text": "fine", "meta": {"note": ["x", "\\udfff"]}}\n'
        b'{"text": "bad \xff byte"}\n'
    )
    assert main([str(raw)]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "samples: 1 valid, 3 bad" in captured.out
    assert f"sample {raw}:2, field 'text', character 2: lone surrogate '\\ud800'" in err
    assert f"sample {raw}:3, field 'meta.note[1]', character 0" in err
    assert f"sample {raw}:4, character 14: bytes that are not UTF-8" in err
    assert "Traceback" not in err


def test_parquet_with_mixed_metadata_types(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(prepare_module, "CHUNK_SIZE", 3)
    samples = _many(10)
    for i, sample in enumerate(samples):
        sample["score"] = i if i % 2 else i + 0.5  # int and float: one double column
        if i >= 4:
            sample["note"] = f"n{i}"  # absent in the first chunk: null, then string
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    keep = ["--extra-keys", "score,note"]  # metadata beyond id / source / language / meta
    assert main([str(raw), "--output-dir", str(tmp_path / "ok"), "--file-type", "parquet", *keep]) == 0
    written = [r.sample for r in read_records(tmp_path / "ok/train.parquet")]
    assert [s["id"] for s in written] == [s["id"] for s in samples] and written[5]["note"] == "n5"
    assert [s["score"] for s in written] == [float(s["score"]) for s in samples]

    samples[7]["id"] = 7  # a string column elsewhere
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    capsys.readouterr()
    assert main([str(raw), "--output-dir", str(tmp_path / "bad"), "--file-type", "parquet", *keep]) == 1
    err = capsys.readouterr().err
    assert f"sample {raw}:8, field 'id'" in err and "int64 here, string before" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    for i in (6, 8):  # now chunk [6, 7, 8] is one type in itself, and conflicts with the chunks before it
        samples[i]["id"] = i
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    assert main([str(raw), "--output-dir", str(tmp_path / "bad"), "--file-type", "parquet", *keep]) == 1
    err = capsys.readouterr().err
    assert f"sample {raw}:7, field 'id'" in err and "int64 here, string before" in err and "Traceback" not in err


def test_control_characters_from_data_are_escaped_in_the_summary(tmp_path, capsys):
    raw = _jsonl(tmp_path / "raw.jsonl", [{"text": 'a <LEARN type="x\x1b]0;pwned\x07">b</LEARN> c'}])
    assert main([str(raw)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "x\\x1b]0;pwned\\x07" in out


# --------------------------------------------------------------------------------------- tokenized Arrow data


@pytest.mark.filterwarnings("ignore:truncation .* cut learned regions")
def test_tokenized_dataset_equals_the_on_the_fly_one(tmp_path, tokenizer, tokenizer_dir):
    raw = _jsonl(tmp_path / "raw.jsonl", _many(30))
    out = tmp_path / "out"
    argv = [str(raw), "--output-dir", str(out), "--tokenizer", str(tokenizer_dir), "--max-length", "96"]
    assert main(argv + ["--val-fraction", "0.2"]) == 0
    for split in ("train", "validation"):
        on_the_fly = MultiRegionDataset(out / f"{split}.jsonl", tokenizer, max_length=96, region_types=["methodology"])
        mapped = MultiRegionDataset.from_disk(out / f"{split}.tokenized", tokenizer, max_length=96,
                                              region_types=["methodology"])  # fmt: skip
        assert len(mapped) == len(on_the_fly) > 0 and mapped.region_types == on_the_fly.region_types
        for i in range(len(on_the_fly)):
            assert mapped[i].keys() == on_the_fly[i].keys()
            for key, value in on_the_fly[i].items():
                assert torch.equal(mapped[i][key], value), (i, key)
        assert [cut for _, cut in mapped.truncated] == [cut for _, cut in on_the_fly.truncated]
    in_paths = MultiRegionDataset([out / "train.tokenized", out / "validation.tokenized"], tokenizer, max_length=96)
    assert len(in_paths) == 30

    from mrloss.data import train_bpe_tokenizer

    other = train_bpe_tokenizer(["something else entirely"] * 4, vocab_size=300)
    with pytest.raises(ValueError, match="another tokenizer"):
        MultiRegionDataset.from_disk(out / "train.tokenized", other, max_length=96)
    with pytest.raises(ValueError, match="cut differently"):
        MultiRegionDataset.from_disk(out / "train.tokenized", tokenizer, max_length=32)
    with pytest.raises(ValueError, match="not both"):
        MultiRegionDataset([out / "train.tokenized", out / "train.jsonl"], tokenizer, max_length=96)


@pytest.mark.parametrize("outside", [False, True])
def test_the_learned_token_check_of_tokenized_data_reads_two_columns_in_batches(
    tmp_path, tokenizer, tokenizer_dir, monkeypatch, outside
):
    """Before (a #24 follow-up): `check_learned_tokens` built every item of tokenized data at start-up (every
    column of every row decoded: 97-126 s for 200k rows). Now only the token weights and region ids are read, in
    batches of rows, with the same answer as the items give (learned per sample; learned outside every region)."""
    from mrloss.data import tokenized
    from mrloss.training.build import check_learned_tokens
    from mrloss.training.config import DataConfig

    samples = _many(9)
    samples[2:2] = [{"id": f"plain{i}", "text": "plain words, nothing learned"} for i in range(3)]
    if outside:
        samples.append({"id": "outside", "text": "a <LEARN>b</LEARN> c", "default_weight": 0.5})
    raw = _jsonl(tmp_path / "raw.jsonl", samples)
    out = tmp_path / "out"
    assert main([str(raw), "--output-dir", str(out), "--tokenizer", str(tokenizer_dir), "--val-fraction", "0"]) == 0
    on_the_fly = MultiRegionDataset(out / "train.jsonl", tokenizer)
    items = [on_the_fly[i] for i in range(len(on_the_fly))]
    expected = [bool((item["token_weights"] > 0).any()) for item in items]
    assert expected.count(False) == 3 and expected.index(False) == 2
    assert any(bool(((item["token_weights"] > 0) & (item["region_type_ids"] < 0)).any()) for item in items) == outside

    monkeypatch.setattr(tokenized, "BATCH_ROWS", 4)  # batch edges fall inside and between the unlearned samples
    monkeypatch.setattr(tokenized.TokenizedItems, "__getitem__", lambda self, index: pytest.fail("an item was built"))
    mapped = MultiRegionDataset.from_disk(out / "train.tokenized", tokenizer)
    for dataset in (mapped, on_the_fly):
        learned, learned_outside = dataset.learned_samples()
        assert (learned.tolist(), learned_outside) == (expected, outside)
    config = DataConfig(train_files=[str(out / "train.tokenized")])
    message = rf"^3 of {len(samples)} training samples have no learned token \(weight > 0\) and train nothing, e\.g\. "
    with pytest.warns(UserWarning, match=message + re.escape(f"{raw}:3") + "$"):  # the raw file's line
        assert check_learned_tokens(mapped, config) == outside


def test_mrloss_train_on_tokenized_data(tmp_path, tokenizer_dir):
    pytest.importorskip("transformers")
    from mrloss.training.run import main as train_main

    raw = _jsonl(tmp_path / "raw.jsonl", _many(24))
    out = tmp_path / "out"
    argv = [str(raw), "--output-dir", str(out), "--tokenizer", str(tokenizer_dir), "--max-length", "64"]
    assert main(argv + ["--val-fraction", "0.25"]) == 0
    run = tmp_path / "run"
    overrides = [
        f"data.train_files={out / 'train.tokenized'}",
        f"data.val_files={out / 'validation.tokenized'}",
        "data.max_length=64",
        "data.write_examples=false",
        f"trainer.output_dir={run}",
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "trainer.device=cpu",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "monitor.enabled=false",
    ]
    assert train_main(["--config", "tag_based", *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["region_types"] == ["concept", "definition", "methodology"]
    assert [e["step"] for e in metrics["log_history"] if "loss" in e][-1] == 2
    assert metrics["train"]["train_loss"] == metrics["train"]["train_loss"]  # not nan
