"""Issue #13, "nothing lost, nothing silently wrong": one test per case of the hostile-but-realistic pass.

Mixed precision, extreme weights and targets (the loss); typos, float32-overflowing weights and many regions (the
data); the run directory, checkpoints, overrides and file modes (outputs); one line per user error (the CLI); exact
resume with the shipped dynamic_weights config; linear-time views; control characters from data on a terminal.
"""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_causal_lm

from mrloss import linear_cross_entropy
from mrloss.formats import FormatError, parse
from mrloss.ops.reference import reference_linear_cross_entropy

REPO = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")


def loss_inputs(tokens=37, hidden_size=24, vocab=53, seed=0, dtype=torch.float32):
    """hidden [N, H], weight [V, H], bias [V] (leaves), targets [N] (some -100), token_weights [N] (some 0)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[torch.rand(tokens, generator=generator) < 0.2] = -100
    token_weights = torch.rand(tokens, generator=generator) * 2
    token_weights[torch.rand(tokens, generator=generator) < 0.2] = 0.0
    leaves = [
        torch.randn(tokens, hidden_size, generator=generator, dtype=dtype).requires_grad_(),
        (torch.randn(vocab, hidden_size, generator=generator, dtype=dtype) / hidden_size**0.5).requires_grad_(),
        torch.randn(vocab, generator=generator, dtype=dtype).requires_grad_(),
    ]
    return leaves, targets, token_weights


def loss_and_grads(leaves, targets, token_weights, cast=None, **options):
    """[loss, grad hidden, grad weight, grad bias]; the leaves cast to ``cast`` inside the graph when given.
    reduction "none" is back-propagated with a non-uniform upstream gradient."""
    hidden, weight, bias = (leaf if cast is None else leaf.to(cast) for leaf in leaves)
    loss = linear_cross_entropy(hidden, weight, targets, token_weights, bias=bias, **options)
    upstream = torch.linspace(-0.5, 1.5, loss.numel()).reshape(loss.shape)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, upstream)]


# -- 1. mixed precision ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_bf16_autocast_gives_the_hand_cast_loss_and_gradients(reduction):
    """Before: RuntimeError index_copy_(): Float and BFloat16. Now: the loss runs in bf16, as F.linear would
    under autocast, exactly as when hidden/weight/bias are cast by hand; gradients arrive in float32."""
    leaves, targets, token_weights = loss_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_and_grads(leaves, targets, token_weights, reduction=reduction)
    by_hand = loss_and_grads(leaves, targets, token_weights, cast=torch.bfloat16, reduction=reduction)
    for got, expected in zip(autocast, by_hand):
        assert torch.equal(got, expected)
    assert [grad.dtype for grad in autocast[1:]] == [torch.float32] * 3


def test_hf_patch_under_bf16_autocast_matches_the_models_own_bf16_logits():
    """`TrainingArguments(bf16=True)` runs the forward under CPU autocast: the patched forward trains, and its loss
    is the weighted CE of the model's own (autocast) logits."""
    from mrloss.integrations.hf import apply_mrloss

    model = tiny_causal_lm(67, num_hidden_layers=1, max_position_embeddings=64)
    input_ids = torch.randint(0, 67, (2, 11))
    token_weights = torch.rand(2, 11) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=input_ids).logits
        expected = reference_linear_cross_entropy(
            logits, torch.eye(67, dtype=torch.float64), input_ids, token_weights, shift=True
        )
        out = apply_mrloss(model)(input_ids=input_ids, labels=input_ids, token_weights=token_weights)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=2e-2, atol=0)
    assert model.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(model.lm_head.weight.grad).all()


# -- 2. silently wrong losses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e38, 1e-42], ids=["1e38", "1e-42"])
def test_any_positive_scale_of_all_weights_gives_the_same_loss(scale):
    """Before: weights 1e38 -> loss 0 and zero gradients (Σw overflows); 1e-42 -> inf (1/Σw overflows)."""
    leaves, targets, _ = loss_inputs()
    ones = torch.ones(targets.shape)
    expected = loss_and_grads(leaves, targets, ones)
    for got, want in zip(loss_and_grads(leaves, targets, ones * scale), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_float64_weights_1e300_give_the_unit_weight_loss():
    """Before: nan (w * (1/Σw) under- and overflows in float64)."""
    leaves, targets, _ = loss_inputs(dtype=torch.float64)
    ones = torch.ones(targets.shape, dtype=torch.float64)
    expected = loss_and_grads(leaves, targets, ones)
    for got, want in zip(loss_and_grads(leaves, targets, ones * 1e300), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_weights_are_checked_in_the_dtype_the_loss_uses():
    """Before: float64 weights 1e300 with float32 hidden passed the finite check, then became inf -> nan."""
    leaves, targets, _ = loss_inputs()
    huge = torch.full(targets.shape, 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"token_weights\(0,\) = 1e\+300.*finite in torch.float32"):
        linear_cross_entropy(leaves[0], leaves[1], targets, huge)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32])
def test_unsigned_targets_are_a_type_error(dtype):
    """Before: uint8 targets wrapped -100 to 156, a valid class, silently learned as ignored."""
    leaves, targets, token_weights = loss_inputs(vocab=200)
    with pytest.raises(TypeError, match="signed dtype"):
        linear_cross_entropy(leaves[0], leaves[1], targets.clamp_min(0).to(dtype), token_weights)


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


# -- 3. outputs: nothing lost ------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    """(exit code, stderr) of ``mrloss <argv>`` in this process (its stdout: ``capsys.readouterr().out`` before)."""
    from mrloss.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    run_cli.out = captured.out
    return code, captured.err


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


def test_train_refuses_a_non_empty_run_directory(tmp_path, capsys):
    """Before: `mrloss train` into an existing run directory silently deleted its checkpoints and logs."""
    from mrloss.training.config import TrainerConfig
    from mrloss.training.run import check_output_dir

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-40").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "c.yaml", data={"train_files": ["x.jsonl"]}, trainer={"output_dir": str(run_dir)})
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and "is not empty" in err and "overwrite_output_dir" in err
    assert (run_dir / "checkpoint-40").is_dir() and (run_dir / "notes.txt").read_text() == "mine"
    check_output_dir(TrainerConfig(output_dir=str(run_dir), resume_from_checkpoint=True))  # resuming is fine
    check_output_dir(TrainerConfig(output_dir=str(run_dir), overwrite_output_dir=True))  # so is the explicit key
    assert not (run_dir / "checkpoint-40").exists() and (run_dir / "notes.txt").exists()  # no old run to resume


def test_a_partial_checkpoint_is_never_picked_on_resume(tmp_path, monkeypatch):
    """Before: a checkpoint cut short by a full disk was later picked by resume_from_checkpoint=true."""
    from transformers.trainer_utils import get_last_checkpoint

    from mrloss.data import MultiRegionDataset, train_bpe_tokenizer
    from mrloss.integrations.hf import MultiRegionTrainer

    texts = [f'Question {i}: <LEARN type="answer">the answer is {i}</LEARN>' for i in range(8)]
    tokenizer = train_bpe_tokenizer([parse({"text": t}).text for t in texts], vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    dataset = MultiRegionDataset.from_samples([{"text": t} for t in texts], tokenizer)
    model = tiny_llama(len(tokenizer))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    trainer = MultiRegionTrainer(model, args, dataset, processing_class=tokenizer)
    save_rng_state = trainer._save_rng_state

    def disk_full_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise OSError(28, "No space left on device")
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / ".checkpoint-staging/checkpoint-4").is_dir()  # the partial one, out of resume's sight
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()


def test_override_values_keep_a_hash():
    """Before: trainer.output_dir=/data/run #2 became /data/run (YAML read ' #2' as a comment)."""
    from mrloss.training.config import apply_overrides

    raw = apply_overrides({}, ["trainer.output_dir=/data/run #2", "trainer.max_steps=3", "data.train_files=[a, b]"])
    assert raw == {"trainer": {"output_dir": "/data/run #2", "max_steps": 3}, "data": {"train_files": ["a", "b"]}}


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


# -- 4. one clear line for every user error ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "trainer, files, message",
    [
        ({"learning_rate": float("nan")}, "data", "config trainer.learning_rate: expected a finite number, got nan"),
        ({"per_device_batch_size": 0}, "data", "config trainer.per_device_batch_size: expected a value > 0, got 0"),
        ({"warmup_ratio": 1.5}, "data", "config trainer.warmup_ratio: expected a value >= 0 and <= 1, got 1.5"),
        ({}, "missing", "config data: file(s) not found: missing.jsonl"),
        ({}, "empty", "no samples in empty.jsonl"),
        ({}, "bad", "sample bad.jsonl:1, field 'defualt_weight'"),
        ({}, "extra", "sample extra.jsonl:1, field 'score': unknown key 'score'"),
    ],
    ids=["lr-nan", "batch-size-0", "warmup-1.5", "missing-file", "empty-file", "bad-sample", "unknown-key"],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch, trainer, files, message):
    """Before: raw tracebacks (even for our own ConfigError outside load_config)."""
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text('{"text": "a <LEARN>b</LEARN>"}\n')
    Path("empty.jsonl").write_text("\n")
    Path("bad.jsonl").write_text('{"text": "a b c", "defualt_weight": 1}\n')
    Path("extra.jsonl").write_text('{"text": "a <LEARN>b</LEARN>", "score": 1}\n')
    data = {"train_files": [f"{files}.jsonl"]}
    config = write_config(tmp_path / "c.yaml", data=data, trainer={"output_dir": "run", "device": "cpu", **trainer})
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and err.startswith(f"mrloss train: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5])
def test_label_smoothing_outside_0_1_is_a_config_error(label_smoothing):
    """Before: accepted by the config, an error of the loss at the first step."""
    from mrloss.training.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="config loss.label_smoothing: expected a value >= 0 and <= 1, got"):
        config_from_dict({"loss": {"label_smoothing": label_smoothing}})
    assert config_from_dict({"loss": {"label_smoothing": 1}}).loss.label_smoothing == 1.0


def test_recursive_yaml_anchor_is_one_line(tmp_path, capsys):
    """Before: RecursionError."""
    config = tmp_path / "c.yaml"
    config.write_text("data: &loop\n  train_files: [a.jsonl]\n  val_files: *loop\n")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and "data.val_files: a YAML alias refers to its own anchor" in err and err.count("\n") == 1


def test_plain_sft_data_without_region_types_trains_and_writes_metrics(tmp_path, capsys):
    """Before: trained, then IndexError in finish_run, without config.yaml or metrics.json."""
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"question {i}? answer {i}.", "default_weight": 1.0}) + "\n" for i in range(6))
    )
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        data={"train_files": [str(data)], "max_length": 32},
        model={"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "vocab_size": 300},
        trainer={"output_dir": str(run_dir), "device": "cpu", "max_steps": 2, "logging_steps": 1},
    )
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["region_types"] == [] and metrics["region_losses"] == {} and (run_dir / "config.yaml").exists()


# -- 5. exact resume with the shipped dynamic_weights config -----------------------------------------------------
class Interrupted(Exception):
    pass


def train_tag_based(output_dir: Path, *overrides, stop_at: int | None = None) -> dict:
    """`mrloss train` with the built-in tag_based config (dynamic_weights) on a tiny model, 6 steps, a
    checkpoint every 3; ``stop_at``: interrupted at the end of that step (before its save)."""
    from mrloss.training.config import load_config
    from mrloss.training.run import finish_run, prepare_run

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                raise Interrupted

    config = load_config(
        REPO / "mrloss/configs/multi_region_tag_based.yaml",
        [
            "data.val_files=[]",  # data: the shipped examples, written to examples/sft/multi_region/data/
            "data.max_length=64",
            f"trainer.output_dir={output_dir}",
            "trainer.max_steps=6",
            "trainer.save_steps=3",
            "trainer.logging_steps=1",
            "trainer.device=cpu",
            "model.hidden_size=16",
            "model.intermediate_size=32",
            "model.num_layers=1",
            *overrides,
        ],
    )
    assert config.weighting.dynamic_weights is not None
    return finish_run(prepare_run(config, callbacks=(StopAt(),) if stop_at else ()))


def test_resume_with_dynamic_weights_is_bit_identical_and_records_each_step_once(tmp_path, monkeypatch):
    """Before: after an interrupt + resume the loss diverged (the per-type sums waiting for the next weighting
    update were not checkpointed) and the monitor log held the steps after the checkpoint twice."""
    monkeypatch.chdir(tmp_path)
    straight = train_tag_based(tmp_path / "straight")
    with pytest.raises(Interrupted):
        train_tag_based(tmp_path / "resumed", stop_at=5)
    resumed = train_tag_based(tmp_path / "resumed", "trainer.resume_from_checkpoint=true")

    def step_losses(metrics):
        return [(e["step"], e["loss"], e["grad_norm"]) for e in metrics["log_history"] if "loss" in e]

    assert step_losses(resumed) == step_losses(straight)  # bit-identical floats, steps 1-6
    assert (tmp_path / "resumed/checkpoint-6").is_dir() and not (tmp_path / "resumed/.checkpoint-staging").exists()

    def batch_records(run):
        lines = (tmp_path / run / "monitor/region_stats.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [r for r in records if "trainer" not in r], [r["step"] for r in records if "trainer" in r]

    assert batch_records("resumed") == batch_records("straight")


# -- 6. linear-time paths ----------------------------------------------------------------------------------------
def test_plain_text_view_of_a_long_sample_is_linear():
    """Before: the plain-text view joined each run's text by repeated concatenation: quadratic (> 400 s on one
    10 MB sample through `mrloss show`)."""
    from mrloss.debug.visualizer import MaskAnalysis, TokenView, render_terminal

    tokens = [TokenView(k, 7, "word ", 1.0, 0, "answer") for k in range(400_000)]
    text = render_terminal(MaskAnalysis(tokens, [], 400_000.0, 400_000), color=False)
    assert f"⟦1 answer│{'word ' * 400_000}⟧" in text


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


# -- 7. terminal escape injection --------------------------------------------------------------------------------
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


# -- 8. typos at the top level -----------------------------------------------------------------------------------
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


def tiny_llama(vocab_size: int):
    return tiny_causal_lm(
        vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
