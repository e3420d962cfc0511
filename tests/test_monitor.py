"""MultiRegionTrainingMonitor: statistics against a hand count, JSONL / TensorBoard / wandb output, the HF
callback and `mrloss plot`."""

import json
import sys
import types

import pytest
import torch

from mrloss.debug import MultiRegionTrainingMonitor
from mrloss.debug.plot import main as plot_main
from mrloss.debug.plot import per_step_series
from mrloss.metrics import region_statistics

TYPES = ["concept", "definition", "methodology"]


def make_batch(seed: int, batch: int = 3, length: int = 11) -> tuple[dict, torch.Tensor]:
    """A collator-like batch with padding, weight-0 tokens and every region type, plus token losses."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, length - 3, length - 6][:batch])
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    region_type_ids = torch.randint(-1, len(TYPES), (batch, length), generator=generator)
    token_weights = torch.rand(batch, length, generator=generator) * 2 + 0.1
    token_weights[torch.rand(batch, length, generator=generator) < 0.3] = 0.0
    token_weights[:, 0] = 0.0
    token_weights[attention_mask == 0] = 0.0
    region_type_ids[attention_mask == 0] = -1
    input_ids = torch.randint(2, 50, (batch, length), generator=generator)
    labels = torch.where(token_weights > 0, input_ids, -100)
    token_losses = torch.rand(batch, length, generator=generator) * 5
    token_losses[labels == -100] = float("nan")  # must never leak into the statistics
    return (
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "token_weights": token_weights,
            "region_type_ids": region_type_ids,
        },
        token_losses,
    )


def hand_count(batch: dict, token_losses: torch.Tensor | None, ignore_index: int = -100) -> dict:
    """The statistics by a plain loop over tokens (float64); a row's first token is never learned."""
    names = TYPES + ["(outside)"]
    acc = {name: {"tokens": 0, "learned": 0, "w": 0.0, "l": 0.0, "wl": 0.0} for name in names}
    for b in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1]):
            if batch["attention_mask"][b, t] == 0:
                continue
            type_id = int(batch["region_type_ids"][b, t])
            entry = acc[names[type_id] if type_id >= 0 else "(outside)"]
            entry["tokens"] += 1
            weight = float(batch["token_weights"][b, t])
            if weight > 0 and int(batch["labels"][b, t]) != ignore_index and t > 0:
                entry["learned"] += 1
                entry["w"] += weight
                if token_losses is not None:
                    loss = float(token_losses[b, t])
                    entry["l"] += loss
                    entry["wl"] += weight * loss
    share_key = "wl" if token_losses is not None else "w"
    share_total = sum(entry[share_key] for entry in acc.values())
    return {
        name: {
            "tokens": e["tokens"],
            "learned_tokens": e["learned"],
            "weight_sum": e["w"],
            "grad_share": e[share_key] / share_total,
            **({"mean_loss": e["l"] / e["learned"] if e["learned"] else None} if token_losses is not None else {}),
        }
        for name, e in acc.items()
    }


@pytest.mark.parametrize("with_losses", [True, False])
def test_statistics_match_a_hand_count(tmp_path, with_losses):
    batch, token_losses = make_batch(seed=1)
    token_losses = token_losses if with_losses else None
    monitor = MultiRegionTrainingMonitor(tmp_path, TYPES)
    record = monitor.log_batch_stats(batch, step=7, token_losses=token_losses)
    expected = hand_count(batch, token_losses)
    assert record["step"] == 7 and set(record["regions"]) == set(expected)
    for name, stats in expected.items():
        assert record["regions"][name] == pytest.approx(stats, rel=1e-12), name
    assert sum(stats["grad_share"] for stats in record["regions"].values()) == pytest.approx(1.0)
    total = record["total"]
    assert total["tokens"] == int(batch["attention_mask"].sum())
    assert total["learned_tokens"] == int((batch["labels"] != -100).sum())
    if with_losses:
        learned = batch["labels"] != -100
        weights, losses = batch["token_weights"].double()[learned], token_losses.double()[learned]
        assert total["weighted_loss"] == pytest.approx(float((weights * losses).sum() / weights.sum()), rel=1e-12)
        assert monitor.type_losses(record) == {
            t: record["regions"][t]["mean_loss"] for t in TYPES if record["regions"][t]["mean_loss"] is not None
        }
    else:
        assert "mean_loss" not in total
    lines = (tmp_path / "region_stats.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record]


def test_ignore_index_and_first_tokens_are_not_learned():
    """Another ignore_index (labels -1, some with weight > 0) and weight > 0 on first tokens: neither is learned
    (the first token of a row is no target); `region_loss_sums` / `mean_region_losses` sum and average them."""
    from mrloss.metrics import mean_region_losses, region_loss_sums

    batch, token_losses = make_batch(seed=5)
    generator = torch.Generator().manual_seed(9)
    batch["labels"] = torch.where(batch["labels"] == -100, -1, batch["labels"])
    batch["labels"][torch.rand(batch["labels"].shape, generator=generator) < 0.2] = -1  # ignored, weight kept
    batch["token_weights"][:, 0] = 0.8
    token_losses = torch.where(batch["labels"] == -1, float("nan"), token_losses)
    token_losses[:, 0] = 0.0
    record = MultiRegionTrainingMonitor(None, TYPES).log_batch_stats(batch, 0, token_losses, ignore_index=-1)
    expected = hand_count(batch, token_losses, ignore_index=-1)
    for name, stats in expected.items():
        assert record["regions"][name] == pytest.approx(stats, rel=1e-12), name
    sums = region_loss_sums(record, TYPES) + region_loss_sums(record, TYPES)  # two identical batches
    assert sums.dtype == torch.float64 and sums[1].tolist() == [2 * expected[t]["learned_tokens"] for t in TYPES]
    assert mean_region_losses(sums, TYPES) == pytest.approx(
        {t: expected[t]["mean_loss"] for t in TYPES if expected[t]["learned_tokens"]}, rel=1e-12
    )


def test_absent_type_and_multipliers():
    batch, token_losses = make_batch(seed=2)
    batch["region_type_ids"][batch["region_type_ids"] == 2] = -1  # no methodology token
    record = MultiRegionTrainingMonitor(None, TYPES).log_batch_stats(
        batch, 3, token_losses, multipliers={"concept": 1.5}
    )
    assert record["regions"]["methodology"] == {
        "tokens": 0,
        "learned_tokens": 0,
        "weight_sum": 0.0,
        "grad_share": 0.0,
        "mean_loss": None,
    }
    assert record["multipliers"] == {"concept": 1.5}
    assert "methodology" not in MultiRegionTrainingMonitor.type_losses(record)


def test_bad_batches_raise():
    batch, token_losses = make_batch(seed=3)
    monitor = MultiRegionTrainingMonitor(None, TYPES)
    with pytest.raises(ValueError, match="token_losses shape"):
        monitor.log_batch_stats(batch, 0, token_losses[:, :-1])
    with pytest.raises(KeyError, match="region_type_ids"):
        monitor.log_batch_stats({"token_weights": batch["token_weights"]}, 0)
    with pytest.raises(ValueError, match="outside"):
        region_statistics(batch["token_weights"], batch["region_type_ids"], TYPES[:2])
    with pytest.raises(ValueError, match="unknown backend"):
        MultiRegionTrainingMonitor(None, TYPES, report_to=["mlflow"])


def test_wandb(tmp_path, monkeypatch):
    logged = []
    fake_wandb = types.SimpleNamespace(run=object(), log=lambda data, step: logged.append((step, data)))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monitor = MultiRegionTrainingMonitor(tmp_path, TYPES, report_to=["wandb"])
    batch, token_losses = make_batch(seed=4)
    batch["token_weights"][batch["region_type_ids"] == -1] = 0.0  # nothing learned outside regions
    record = monitor.log_batch_stats(batch, 5, token_losses, multipliers={"concept": 0.5})
    [(step, data)] = logged
    assert step == 5
    assert data["region/concept/mean_loss"] == record["regions"]["concept"]["mean_loss"]
    assert data["multiplier/concept"] == 0.5 and data["total/weighted_loss"] == record["total"]["weighted_loss"]
    assert "region/(outside)/mean_loss" not in data  # None values are left out
    fake_wandb.run = None  # no active run: nothing is logged
    monitor.log_batch_stats(batch, 6, token_losses)
    assert len(logged) == 1


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")  # installed with the verl extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = MultiRegionTrainingMonitor(tmp_path, TYPES, report_to=["tensorboard"])
    batch, token_losses = make_batch(seed=5)
    record = monitor.log_batch_stats(batch, 5, token_losses)
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    [scalar] = events.Scalars("region/definition/weight_sum")
    assert scalar.step == 5 and scalar.value == pytest.approx(record["regions"]["definition"]["weight_sum"], rel=1e-6)


def test_hf_callback_appends_trainer_logs(tmp_path):
    from transformers import TrainerControl, TrainerState

    monitor = MultiRegionTrainingMonitor(tmp_path, TYPES)
    callback = monitor.hf_callback()
    state = TrainerState()
    state.global_step = 4
    callback.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-4, "note": "x"})
    callback.on_train_end(None, state, TrainerControl())
    line = json.loads((tmp_path / "region_stats.jsonl").read_text())
    assert line == {"step": 4, "trainer": {"loss": 2.5, "learning_rate": 1e-4}}


def test_plot_merges_micro_batches_and_writes_png(tmp_path, capsys):
    monitor = MultiRegionTrainingMonitor(tmp_path, TYPES)
    records = []
    for step in range(4):
        for micro in range(2):  # two micro-batches per optimizer step
            batch, token_losses = make_batch(seed=10 * step + micro)
            records.append(
                monitor.log_batch_stats(
                    batch, step, token_losses * (4 - step) / 4, multipliers={t: 1.0 + step / 10 for t in TYPES}
                )
            )
    monitor.log_trainer_logs(3, {"loss": 1.0})
    series = per_step_series(tmp_path / "region_stats.jsonl")
    assert series["steps"] == [0, 1, 2, 3]
    first, second = records[2]["regions"]["concept"], records[3]["regions"]["concept"]  # step 1
    merged = (first["mean_loss"] * first["learned_tokens"] + second["mean_loss"] * second["learned_tokens"]) / (
        first["learned_tokens"] + second["learned_tokens"]
    )
    assert series["mean_loss"]["concept"][1] == pytest.approx(merged, rel=1e-12)
    assert series["multipliers"]["definition"] == pytest.approx([1.0, 1.1, 1.2, 1.3])
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in capsys.readouterr().out
    assert plot_main([str(tmp_path / "missing")]) == 1


def logged_steps(directory, steps) -> None:
    monitor = MultiRegionTrainingMonitor(directory, TYPES)
    for step in steps:
        batch, token_losses = make_batch(seed=step)
        monitor.log_batch_stats(batch, step, token_losses)


def test_plot_skips_a_torn_last_line_and_names_a_broken_one(tmp_path, capsys):
    """Before (#23 tracebacks): a half-written last line (a run killed while logging) broke `mrloss plot` with a
    JSONDecodeError naming neither the file nor the line."""
    logged_steps(tmp_path, [1, 2, 3])
    stats = tmp_path / "region_stats.jsonl"
    with open(stats, "a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "regions": {"conc')
    with pytest.warns(UserWarning, match=rf"{stats}:4: skipped a last line cut short"):
        assert per_step_series(stats)["steps"] == [1, 2, 3]
    with open(stats, "a", encoding="utf-8") as handle:
        handle.write("\n" + json.dumps({"step": 5, "trainer": {"loss": 1.0}}) + "\n")
    capsys.readouterr()
    assert plot_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mrloss plot: {stats}:4: not a JSON record (") and err.count("\n") == 1


def test_plot_x_axis_spans_the_logged_steps(tmp_path, monkeypatch):
    """Before (#23 rough edges): the x-axis started at 0 while the logs start at step 1."""
    import matplotlib.pyplot as plt

    from mrloss.debug.plot import plot_run

    logged_steps(tmp_path, [1, 2, 3, 4, 5])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_run(tmp_path)
    low, high = figures[0].axes[-1].get_xlim()
    assert (low, high) == (0.5, 5.5)
    assert all(float(tick).is_integer() for tick in figures[0].axes[-1].get_xticks())
