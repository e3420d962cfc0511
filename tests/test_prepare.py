"""`mrloss prepare`: validation with line numbers, conversion, atomic split outputs, --force, summary."""

import json
import os
import stat

import pytest

from mrloss.data.examples import EXAMPLES
from mrloss.data.prepare import LOCK, MANIFEST, in_validation, main
from mrloss.data.records import read_records, write_samples
from mrloss.formats import FORMATS, detect_format, parse

BAD_LINES = [
    '{"text": "fine <LEARN type=\\"concept\\">sample</LEARN> one"}',
    '{"text": "unclosed <LEARN>tag"}',
    "",
    '{"text": "abc", "learning_regions": [{"start_char": 0, "end_char": 2, "weigth": 2.0}]}',
    "{broken json",
    '{"segments": [{"content": "ctx", "learn": false, "weight": 1.0}]}',
    '{"segments": [{"content": "题目", "learn": false}, {"content": "答案", "learn": true, "segment_type": "concept"}]}',
]


def _jsonl(path, samples):
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def _char_weights(path):
    return [parse(r.sample).char_weights() for r in read_records(path)]


def test_example_writes_three_formats_and_refuses_to_overwrite(tmp_path, capsys):
    directory = tmp_path / "examples"
    assert main(["--example", str(directory)]) == 0
    files = {name: directory / f"{name}.jsonl" for name in FORMATS}
    for name, path in files.items():
        records = read_records(path)
        assert len(records) == len(EXAMPLES) >= 24
        assert all(detect_format(r.sample) == name for r in records)
        assert {r.sample["language"] for r in records} >= {"zh", "en"}
    assert (
        _char_weights(files["tag_based"])
        == _char_weights(files["position_based"])
        == _char_weights(files["structured"])
    )
    types = {region.type for r in read_records(files["structured"]) for region in parse(r.sample).regions}
    assert types == {"concept", "definition", "methodology"}
    before = files["tag_based"].read_bytes()
    files["tag_based"].write_text("changed\n")
    assert main(["--example", str(directory)]) == 2
    assert "--force" in capsys.readouterr().err and files["tag_based"].read_text() == "changed\n"
    assert main(["--example", str(directory), "--force"]) == 0
    assert files["tag_based"].read_bytes() == before


def test_bad_lines_are_listed_with_line_numbers_and_nothing_is_written(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main([str(raw), "--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4
    for line_number, words in [
        (2, "unclosed"),
        (4, "'learning_regions[0].weigth'"),
        (5, "invalid JSON"),
        (6, "contradicts"),
    ]:
        assert any(f"{raw}:{line_number}," in e and words in e for e in errors), (line_number, captured.err)
    assert "samples: 2 valid, 4 bad" in captured.out and "nothing written" in captured.err
    assert not out.exists()

    assert main([str(raw), "--output-dir", str(out), "--drop-invalid", "--to", "position_based"]) == 0
    written = read_records(out / "train.jsonl")
    assert [detect_format(r.sample) for r in written] == ["position_based"] * 2
    assert [parse(r.sample).text for r in written] == ["fine sample one", "题目答案"]


def test_validation_only_exit_codes(tmp_path, capsys):
    good = _jsonl(tmp_path / "good.jsonl", EXAMPLES[:4])
    assert main([str(good)]) == 0
    out = capsys.readouterr().out
    assert "samples: 4 valid, 0 bad" in out and "tokens:" in out and "learned" in out and "samples/s" in out
    assert main([]) == 2 and main([str(tmp_path / "missing.jsonl")]) == 2
    assert main([str(good), "--to", "tag_based"]) == 2  # --to needs --output-dir
    assert main([str(good), "--output-dir", str(tmp_path), "--val-fraction", "1.5"]) == 2
    assert main(["--bogus"]) == 2
    assert main([str(tmp_path / "data.csv")]) == 2


@pytest.mark.parametrize("to", FORMATS)
def test_conversion_and_split_keep_every_sample_and_its_weights(tmp_path, to):
    raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES)
    out = tmp_path / to
    assert main([str(raw), "--output-dir", str(out), "--to", to, "--val-fraction", "0.25", "--seed", "3"]) == 0
    train, validation = read_records(out / "train.jsonl"), read_records(out / "validation.jsonl")
    chosen = [s["id"] for i, s in enumerate(EXAMPLES) if in_validation(i, 3, 0.25)]  # a hash of (seed, index)
    assert [r.sample["id"] for r in validation] == chosen and 0 < len(chosen) < len(EXAMPLES)
    assert [r.sample["id"] for r in train] == [s["id"] for s in EXAMPLES if s["id"] not in chosen]
    assert all(detect_format(r.sample) == to for r in train + validation)
    by_id = {r.sample["id"]: parse(r.sample).char_weights() for r in train + validation}
    assert by_id == {s["id"]: parse(s).char_weights() for s in EXAMPLES}
    again = tmp_path / "again"
    assert main([str(raw), "--output-dir", str(again), "--to", to, "--val-fraction", "0.25", "--seed", "3"]) == 0
    assert (again / "validation.jsonl").read_bytes() == (out / "validation.jsonl").read_bytes()
    assert main([str(raw), "--output-dir", str(again), "--val-fraction", "0.25", "--seed", "4", "--force"]) == 0
    assert (again / "validation.jsonl").read_bytes() != (out / "validation.jsonl").read_bytes()


def test_outputs_are_never_overwritten_without_force(tmp_path, capsys):
    raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES[:6])
    out = tmp_path / "out"
    assert main([str(raw), "--output-dir", str(out)]) == 0
    (out / "train.jsonl").write_text("keep me\n")
    assert main([str(raw), "--output-dir", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "train.jsonl").read_text() == "keep me\n"
    assert main([str(raw), "--output-dir", str(out), "--force"]) == 0  # an earlier output of prepare: replaced
    assert len(read_records(out / "train.jsonl")) == 6
    assert sorted(os.listdir(out)) == [MANIFEST, "train.jsonl"]  # no temporary files, no lock left


def test_force_replaces_only_what_prepare_wrote(tmp_path, capsys):
    """Before (#23 item 9): --force removed a hand-made validation.jsonl as "stale" and replaced a hand-made
    train.jsonl. Now prepare records its outputs (MANIFEST) and --force replaces only those."""
    raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES[:6])
    out = tmp_path / "out"
    out.mkdir()
    (out / "validation.jsonl").write_text("mine\n")
    assert main([str(raw), "--output-dir", str(out), "--force"]) == 0
    assert (out / "validation.jsonl").read_text() == "mine\n"  # not prepare's: not removed as stale
    assert json.loads((out / MANIFEST).read_text()) == {"outputs": ["train.jsonl"]}
    capsys.readouterr()
    assert main([str(raw), "--output-dir", str(out), "--val-fraction", "0.5", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mrloss prepare: {out / 'validation.jsonl'} was not written by mrloss prepare")
    assert err.count("\n") == 1 and (out / "validation.jsonl").read_text() == "mine\n"


def test_an_input_that_would_be_overwritten_is_refused(tmp_path, capsys):
    """Before (#23 item 9): with --force --drop-invalid and the input in the output directory, the input was
    overwritten in place and its bad line lost."""
    out = tmp_path / "out"
    assert main([str(_jsonl(tmp_path / "raw.jsonl", EXAMPLES[:6])), "--output-dir", str(out)]) == 0
    train = out / "train.jsonl"
    train.write_text(train.read_text() + "{broken json\n")
    before = train.read_bytes()
    capsys.readouterr()
    assert main([str(train), "--output-dir", str(out), "--force", "--drop-invalid"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"mrloss prepare: input {train} would be replaced by this run's outputs; write to another --output-dir\n"
    )
    assert train.read_bytes() == before


def test_one_prepare_at_a_time_per_directory(tmp_path, capsys):
    """Before (#23 item 10): two prepares into one directory mixed their outputs. Now the second one is refused
    while the first holds the directory's lock; a lock whose process died is no lock (flock)."""
    import subprocess
    import sys

    from mrloss.data.outputs import DirectoryLock

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES[:6])
        assert main([str(raw), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mrloss prepare: {out} is being written by ") and f"pid {holder.pid}" in err
        assert err.count("\n") == 1 and not (out / "train.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # left behind by the killed holder: not a lock any more
    assert main([str(raw), "--output-dir", str(out)]) == 0 and not (out / LOCK).exists()
    DirectoryLock(out / LOCK).acquire().release()


HOLD_THE_LOCK = """
import sys, time
from mrloss.data.outputs import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_write_is_atomic_when_writing_fails(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_samples(path, [{"text": "ok"}, {"text": {1, 2}}], force=True)  # a set is not JSON
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["data.jsonl"]
    with pytest.raises(FileExistsError):
        write_samples(path, [{"text": "new"}])


def test_json_and_parquet_in_and_out(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    source = tmp_path / "raw.json"
    source.write_text(
        json.dumps(EXAMPLES[:5] + [{"text": "x", "default_weight": -1}], ensure_ascii=False), encoding="utf-8"
    )
    assert main([str(source)]) == 1
    assert f"{source}[5]" in capsys.readouterr().err
    source.write_text(json.dumps(EXAMPLES[:5], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    assert main([str(source), "--output-dir", str(out), "--file-type", "parquet", "--to", "structured"]) == 0
    assert _char_weights(out / "train.parquet") == [parse(s).char_weights() for s in EXAMPLES[:5]]
    capsys.readouterr()
    assert main([str(out / "train.parquet")]) == 0
    assert "samples: 5 valid, 0 bad" in capsys.readouterr().out


def test_local_tokenizer_and_truncation_error(tmp_path, capsys):
    from mrloss.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([parse(s).text for s in EXAMPLES], vocab_size=400).save_pretrained(tmp_path / "tok")
    raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES[2:5] + [{"text": "<LEARN>short</LEARN>"}])
    assert main([str(raw), "--tokenizer", str(tmp_path / "tok"), "--max-length", "20", "--truncation", "error"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("more than --max-length 20") == 3 and f"{raw}:1," in captured.err
    assert str(tmp_path / "tok") in captured.out and "samples: 1 valid, 3 bad" in captured.out
    assert main([str(raw), "--tokenizer", str(tmp_path / "tok"), "--max-length", "20"]) == 0
    assert "truncation cut learned regions of 3 sample(s)" in capsys.readouterr().out
    assert main([str(raw), "--tokenizer", str(tmp_path / "missing")]) == 2


def test_cli_dispatches_to_prepare(tmp_path):
    from mrloss.cli import main as cli_main

    assert cli_main(["prepare", "--example", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["position_based.jsonl", "structured.jsonl", "tag_based.jsonl"]


def test_weight_histogram_bins_many_distinct_weights():
    from mrloss.data.summary import _histogram

    assert _histogram({2.0: 3, 0.5: 1}) == "0.5×1 2×3"
    binned = _histogram({w / 10: 1 for w in range(20)}, bins=4)
    assert binned.count("×5") == 4 and binned.startswith("[0,0.475)")


def test_default_tokenizer_is_the_one_mrloss_train_trains(tmp_path, capsys):
    """Without --tokenizer the summary counts tokens of the BPE `mrloss train` trains on the same file
    (`train_bpe_tokenizer_for_files`, model.vocab_size's default)."""
    from mrloss.data.encode import encode
    from mrloss.data.examples import write_examples
    from mrloss.data.tokenizer import train_bpe_tokenizer_for_files
    from mrloss.training.config import ModelConfig

    path = write_examples(tmp_path)["structured"]
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    tokenizer = train_bpe_tokenizer_for_files([path], "auto", ModelConfig().vocab_size)
    tokens = sum(len(encode(parse(record.sample), tokenizer)["input_ids"]) for record in read_records(path))
    assert f"vocabulary {len(tokenizer)};" in out and f"tokens: {tokens} (" in out


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Before: sample files were written 0600 whatever the umask (a temporary file renamed into place)."""
    from mrloss.data.records import write_samples

    previous = os.umask(umask)
    try:
        path = write_samples(tmp_path / "out.jsonl", [{"text": "a"}])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_summary_token_counts_add_up(tmp_path, capsys):
    """Before (#23 rough edges): the weight histogram left out every sample's first token, so its counts did not
    add up to the tokens of the row (``(outside) 1967 tokens``, histogram ``0×1941`` for 26 samples)."""
    import re

    raw = _jsonl(tmp_path / "raw.jsonl", EXAMPLES)
    assert main([str(raw)]) == 0
    out = capsys.readouterr().out
    total, learned = map(int, re.search(r"^tokens: (\d+) \((\d+) learned", out, re.M).groups())
    rows = re.findall(r"^(\S+(?: \S+)?)\s+(\d+)\s+(\d+)\s+(\d+)  (.*)$", out, re.M)
    assert {name for name, *_ in rows} == {"concept", "definition", "methodology", "(outside)"}
    for _, _, tokens, learned_here, histogram in rows:
        counts = {float(w): int(c) for w, c in re.findall(r"([\d.]+)×(\d+)", histogram)}
        assert sum(counts.values()) == int(tokens), histogram
        assert sum(c for w, c in counts.items() if w > 0) == int(learned_here)
    assert sum(int(tokens) for _, _, tokens, _, _ in rows) == total
    assert sum(int(n) for _, _, _, n, _ in rows) == learned
