"""Training: MultiRegionTrainer normalization and weight-0 regions, `mrloss train`, the run scripts, the demo."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import cpu_training_arguments, run_cli, write_config
from tiny_models import tiny_causal_lm

transformers = pytest.importorskip("transformers")

from mrloss.data import MultiRegionDataset, train_bpe_tokenizer  # noqa: E402
from mrloss.data.examples import EXAMPLES  # noqa: E402
from mrloss.formats import parse  # noqa: E402
from mrloss.integrations.hf import MultiRegionTrainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PREFIX = "Question {i}: what is a gradient? Answer: "
ANSWER = '<LEARN weight="{w}" type="answer">The direction of steepest ascent, number {i}.</LEARN>'
TAIL = '<LEARN weight="{w}" type="tail">\n\nNOTE: {words}</LEARN>'
TAILS = ("alpha beta gamma delta", "zeta theta omega kappa lambda")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [parse(sample).text for sample in EXAMPLES] + [
        PREFIX.format(i=i) + f"The direction of steepest ascent, number {i}.\n\nNOTE: {words}"
        for i in range(8)
        for words in TAILS
    ]
    return train_bpe_tokenizer(texts, vocab_size=400)


def samples(tail_words=TAILS[0], tail_weight=0.0, count=8):
    """Tag-based samples whose LAST region is ``tail``: with causal attention its tokens are only targets."""
    return [
        {
            "text": PREFIX.format(i=i)
            + ANSWER.format(w=1.0 + 0.5 * (i % 3), i=i) * (1 + i % 2)
            + TAIL.format(w=tail_weight, words=tail_words)
        }
        for i in range(count)
    ]


def train_tiny(tokenizer, dataset, tmp_path, **arguments):
    """A tiny Llama trained by MultiRegionTrainer; returns (trainer, its parameters after training)."""
    model = tiny_causal_lm(
        len(tokenizer),
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    args = cpu_training_arguments(
        tmp_path,
        save_strategy="no",
        seed=0,
        **{"per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1, **arguments},
    )
    trainer = MultiRegionTrainer(model, args, dataset, processing_class=tokenizer)
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a, b):
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_gradient_accumulation_equals_one_big_batch(tokenizer, tmp_path):
    """num_items_in_batch = Σw of the whole optimizer step: 2 micro-batches of 2 == 1 batch of 4 (plain SGD,
    no clipping, so the update is the gradient itself; the samples have different Σw)."""
    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5), tokenizer)
    options = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0, max_steps=1, lr_scheduler_type="constant")
    _, one_batch = train_tiny(tokenizer, dataset, tmp_path / "a", per_device_train_batch_size=4, **options)
    trainer, accumulated = train_tiny(
        tokenizer, dataset, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **options
    )
    torch.manual_seed(0)
    initial = {name: p.detach() for name, p in transformers.LlamaForCausalLM(trainer.model.config).named_parameters()}
    assert max_difference(one_batch, initial) > 1e-3  # the step did move the parameters
    assert max_difference(one_batch, accumulated) < 1e-6


def test_weight_zero_region_gets_no_gradient_signal(tokenizer, tmp_path):
    """Changing the text of a weight-0 region (last in every sample, so its tokens are only targets) leaves
    training untouched; with weight 1 the same change moves the trained parameters."""
    runs = {}
    for tail_weight in (0.0, 1.0):
        for words in TAILS:
            dataset = MultiRegionDataset.from_samples(samples(words, tail_weight), tokenizer)
            trainer, runs[tail_weight, words] = train_tiny(
                tokenizer, dataset, tmp_path / f"{tail_weight}{words[:4]}", optim="sgd", learning_rate=1.0
            )
    assert max_difference(runs[0.0, TAILS[0]], runs[0.0, TAILS[1]]) < 1e-5
    assert max_difference(runs[1.0, TAILS[0]], runs[1.0, TAILS[1]]) > 1e-3
    logged = [entry for entry in trainer.state.log_history if "loss/answer" in entry]
    assert len(logged) == 3 and all("loss/tail" in entry for entry in logged)
    for entry in logged:  # TRL's token metrics, overall and per region type
        assert 0 <= entry["mean_token_accuracy"] <= 1 and 0 <= entry["mean_token_accuracy/answer"] <= 1
        assert entry["entropy"] > 0 and entry["entropy/answer"] > 0 and "entropy/tail" in entry


def test_evaluate_region_losses_uses_the_trainers_ignore_index(tokenizer, tmp_path):
    """loss_options ignore_index=-1 and a collator that ignores some weighted tokens (label -1): those tokens
    count in no region's mean; the means equal the model's own logits' cross-entropy per region type."""
    from mrloss.data import MultiRegionCollator
    from mrloss.training.evaluate import evaluate_region_losses

    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5, count=5), tokenizer)
    padding = MultiRegionCollator(tokenizer.pad_token_id)

    def collator(items):
        batch = padding(items)
        ignored = (batch["labels"] == -100) | (torch.arange(batch["labels"].shape[1]) % 3 == 0)
        batch["labels"] = torch.where(ignored, -1, batch["labels"])  # weights stay > 0 on every 3rd token
        return batch

    model = tiny_causal_lm(
        len(tokenizer), intermediate_size=64, num_hidden_layers=1, pad_token_id=tokenizer.pad_token_id
    )
    args = cpu_training_arguments(tmp_path)
    trainer = MultiRegionTrainer(
        model,
        args,
        dataset,
        data_collator=collator,
        loss_options={"ignore_index": -1, "backend": "torch"},
    )
    got = evaluate_region_losses(trainer, dataset, batch_size=3)

    sums = {name: [0.0, 0] for name in dataset.region_types}
    weighted = [0.0, 0.0]
    for start in (0, 3):
        batch = collator([dataset[i] for i in range(start, min(start + 3, len(dataset)))])
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).double(), batch["input_ids"][:, 1:], reduction="none"
        )
        learned = (batch["labels"][:, 1:] != -1) & (batch["token_weights"][:, 1:] > 0)
        types, weights = batch["region_type_ids"][:, 1:], batch["token_weights"][:, 1:].double()
        for index, name in enumerate(dataset.region_types):
            sums[name][0] += float(losses[learned & (types == index)].sum())
            sums[name][1] += int((learned & (types == index)).sum())
        weighted[0] += float((losses * weights)[learned].sum())
        weighted[1] += float(weights[learned].sum())
    expected = {name: total / count for name, (total, count) in sums.items() if count}
    assert set(got) == set(expected) | {"weighted"}
    assert got == pytest.approx({**expected, "weighted": weighted[0] / weighted[1]}, rel=1e-5)


def test_trainer_evaluate_logs_region_losses_and_token_metrics(tokenizer, tmp_path):
    """``trainer.evaluate()`` adds ``eval_loss/<type>`` (= evaluate_region_losses), ``eval_mean_token_accuracy``
    and ``eval_entropy`` (overall and per type, over the learned tokens; from the model's own logits) and feeds
    neither the weighting's step statistics nor the training log's."""
    from mrloss.training.evaluate import evaluate_region_losses

    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5, count=5), tokenizer)
    model = tiny_causal_lm(
        len(tokenizer), intermediate_size=64, num_hidden_layers=1, pad_token_id=tokenizer.pad_token_id
    )
    args = cpu_training_arguments(tmp_path, per_device_eval_batch_size=3)
    trainer = MultiRegionTrainer(model, args, dataset, processing_class=tokenizer, loss_options={"backend": "torch"})
    metrics = trainer.evaluate(dataset)
    assert not trainer.region_tracker.step_sums.any() and not trainer._train_log_stats.losses.any()
    losses = evaluate_region_losses(trainer, dataset, batch_size=3)
    assert {k: metrics[f"eval_loss/{k}"] for k in dataset.region_types} == pytest.approx(
        {k: losses[k] for k in dataset.region_types}, abs=1e-4
    )

    correct, entropy, count = {}, {}, {}
    for start in (0, 3):
        batch = trainer.data_collator([dataset[i] for i in range(start, min(start + 3, len(dataset)))])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        log_p = torch.log_softmax(logits.double(), dim=-1)
        learned = (batch["labels"][:, 1:] != -100) & (batch["token_weights"][:, 1:] > 0)
        hits = logits.argmax(-1) == batch["input_ids"][:, 1:]
        token_entropy = -(log_p.exp() * log_p).sum(-1)
        types = batch["region_type_ids"][:, 1:]
        for index, name in [(i, n) for i, n in enumerate(dataset.region_types)] + [(None, "all")]:
            mask = learned if index is None else learned & (types == index)
            correct[name] = correct.get(name, 0) + int(hits[mask].sum())
            entropy[name] = entropy.get(name, 0.0) + float(token_entropy[mask].sum())
            count[name] = count.get(name, 0) + int(mask.sum())
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(correct["all"] / count["all"], abs=1e-4)
    assert metrics["eval_entropy"] == pytest.approx(entropy["all"] / count["all"], abs=1e-4)
    for name in dataset.region_types:
        assert metrics[f"eval_mean_token_accuracy/{name}"] == pytest.approx(correct[name] / count[name], abs=1e-4)
        assert metrics[f"eval_entropy/{name}"] == pytest.approx(entropy[name] / count[name], abs=1e-4)
    ours = [key for key in metrics if "/" in key or key in ("eval_mean_token_accuracy", "eval_entropy")]
    again = trainer.evaluate(dataset)  # a second evaluation starts from zero
    assert {key: again[key] for key in ours} == pytest.approx({key: metrics[key] for key in ours}, rel=1e-9)


def test_eval_loss_is_the_weighted_mean_of_the_whole_set_for_any_batch_size(tokenizer, tmp_path):
    """``eval_loss`` = Σw·l/Σw over the whole evaluation set (the model's logits, float64), the same for eval batches
    of 1, 4 and all 7 samples (whose Σw differ). Before: the mean of batch means (0.8737 at batch 1, 0.9168 at 26)."""
    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5, count=7), tokenizer)
    model = tiny_causal_lm(
        len(tokenizer), intermediate_size=64, num_hidden_layers=1, pad_token_id=tokenizer.pad_token_id
    )
    eval_losses = []
    for batch_size in (1, 4, len(dataset)):
        args = cpu_training_arguments(tmp_path, per_device_eval_batch_size=batch_size)
        trainer = MultiRegionTrainer(model, args, dataset, processing_class=tokenizer)
        eval_losses.append(trainer.evaluate(dataset)["eval_loss"])

    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).double(), batch["input_ids"][:, 1:], reduction="none"
    )
    weights = torch.where(batch["labels"][:, 1:] != -100, batch["token_weights"][:, 1:].double(), 0.0)
    expected = float((weights * losses).sum() / weights.sum())
    assert eval_losses == pytest.approx([expected] * 3, abs=1e-6)


def test_any_positive_scale_of_all_weights_trains_the_same(tokenizer, tmp_path):
    """Valid weights of 1e37 (the step's Σw is past float32's range) train exactly as weights of 1: the same logged
    losses, gradient norms and parameters. Before: loss 0 and gradient norm 0 (Σw overflowed in float32)."""

    class Scaled(torch.utils.data.Dataset):
        def __init__(self, dataset, scale):
            self.dataset, self.scale, self.region_types = dataset, scale, dataset.region_types

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            item = dict(self.dataset[index])
            item["token_weights"] = item["token_weights"] * self.scale
            return item

    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5), tokenizer)
    runs = {}
    for scale in (1.0, 1e37):
        trainer, parameters = train_tiny(tokenizer, Scaled(dataset, scale), tmp_path / str(scale), max_steps=2)
        logs = [
            entry[key] for entry in trainer.state.log_history if "grad_norm" in entry for key in ("loss", "grad_norm")
        ]
        runs[scale] = parameters, logs
    (unit, unit_logs), (scaled, scaled_logs) = runs[1.0], runs[1e37]
    assert len(unit_logs) == 4 and all(value > 1 for value in unit_logs)  # 2 steps: loss, grad_norm
    assert scaled_logs == pytest.approx(unit_logs, rel=1e-5)
    assert max_difference(unit, scaled) < 1e-6


def test_untrained_tokenizer_is_the_one_of_show_and_prepare(tmp_path):
    """model.path null: the run's tokenizer is `train_bpe_tokenizer_for_files` of data.train_files with
    model.vocab_size -- what `mrloss show` / `mrloss prepare` train by default on the same file."""
    from mrloss.data import write_examples
    from mrloss.data.tokenizer import train_bpe_tokenizer_for_files
    from mrloss.debug.show import build_parser
    from mrloss.training.build import build_tokenizer
    from mrloss.training.config import Config, DataConfig, ModelConfig, TrainerConfig

    path = write_examples(tmp_path / "data")["tag_based"]
    config = Config(data=DataConfig(train_files=[str(path)]), trainer=TrainerConfig(output_dir=str(tmp_path / "run")))
    trained = build_tokenizer(config, None, is_main=True)
    assert (tmp_path / "run/tokenizer/tokenizer.json").exists()
    assert build_parser().parse_args([str(path)]).vocab_size == ModelConfig().vocab_size
    assert trained.get_vocab() == train_bpe_tokenizer_for_files([path], "auto", ModelConfig().vocab_size).get_vocab()


def run_train(argv):
    from mrloss.training.run import main

    assert main(argv) == 0


def test_mrloss_train_learns_saves_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data paths resolve in the working directory
    output_dir = tmp_path / "run"
    overrides = [
        "data.max_length=128",
        f"trainer.output_dir={output_dir}",
        "trainer.max_steps=12",
        "trainer.learning_rate=1e-2",
        "trainer.save_steps=6",
        "trainer.logging_steps=4",
        "trainer.device=cpu",
        "model.hidden_size=32",
        "model.intermediate_size=64",
    ]
    run_train(["--config", "tag_based", *overrides])
    assert (tmp_path / "examples/sft/multi_region/data/structured.jsonl").exists()  # write_examples: true
    metrics = json.loads((output_dir / "metrics.json").read_text())
    first, last = metrics["region_losses"]["first"], metrics["region_losses"]["last"]
    assert first["step"] == 1 and last["step"] == 12
    assert set(first) - {"step"} == {"concept", "definition", "methodology"}
    losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0] - 0.3, losses  # the weighted loss goes down
    assert all(last[name] < first[name] for name in last if name != "step")
    for name in ("model.safetensors", "tokenizer.json", "config.yaml", "checkpoint-12/mrloss_weighting.pt"):
        assert (output_dir / name).exists(), name
    assert (output_dir / "monitor/region_stats.jsonl").read_text().count("\n") >= 12
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(output_dir)
    assert reloaded.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(output_dir))

    run_train(
        [
            "--config",
            "tag_based",
            *overrides,
            "trainer.max_steps=16",
            "trainer.resume_from_checkpoint=true",
        ]
    )
    resumed = json.loads((output_dir / "metrics.json").read_text())
    assert [e["step"] for e in resumed["log_history"] if "loss" in e][-1] == 16
    assert resumed["log_history"][0] == metrics["log_history"][0]  # the history continues from checkpoint-12


@pytest.mark.parametrize("enabled", [False, True])
def test_model_gradient_checkpointing_reaches_training_arguments_without_a_deprecation(enabled, tmp_path):
    """``model.gradient_checkpointing`` is TrainingArguments' activation checkpointing under the name the installed
    transformers has: no "`gradient_checkpointing` is deprecated" warning where ``activation_checkpointing`` exists."""
    from mrloss.training.config import load_config
    from mrloss.training.run import training_arguments

    overrides = [f"model.gradient_checkpointing={enabled}", "trainer.device=cpu", f"trainer.output_dir={tmp_path}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.* deprecated")
        arguments = training_arguments(load_config(str(REPO / "mrloss/configs/multi_region_tag_based.yaml"), overrides))
    assert arguments.gradient_checkpointing is enabled
    assert getattr(arguments, "activation_checkpointing", enabled) is enabled


def test_resumed_run_reports_the_train_loss_of_all_steps_and_a_complete_run_trains_nothing(
    tmp_path, monkeypatch, capsys
):
    """Resumed from checkpoint-3 of 7 steps (logs every 2, so checkpoint-3 holds an unlogged step), metrics.json's
    train_loss is the mean step loss of all 7 steps, as in the uninterrupted run (before: this session's loss sum /
    7, 1.79 against 5.69); from a checkpoint without the run's loss sum (not written by MultiRegionTrainer) it is
    the mean over the steps since the resume, with a warning. Resuming the finished run again says it is complete,
    exits 0 and trains nothing (before: a step past max_steps, and checkpoint-8)."""
    import shutil

    from mrloss.integrations.hf import TRAIN_LOSS_FILE

    monkeypatch.chdir(tmp_path)
    output_dir = tmp_path / "run"
    arguments = [
        "--config",
        "tag_based",  # its example data, written to examples/sft/multi_region/data/
        "data.max_length=128",
        f"trainer.output_dir={output_dir}",
        "trainer.max_steps=7",
        "trainer.save_steps=3",
        "trainer.save_total_limit=null",
        "trainer.logging_steps=2",
        "trainer.device=cpu",
        "model.hidden_size=32",
        "model.intermediate_size=64",
    ]
    run_train(arguments)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    step_losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert metrics["train"]["train_loss"] > 1 and len(step_losses) == 4  # logged at steps 1, 2, 4, 6

    def resume_from_checkpoint_3():
        for name in ("checkpoint-6", "checkpoint-7"):
            shutil.rmtree(output_dir / name)
        (output_dir / "metrics.json").unlink()
        run_train([*arguments, "trainer.resume_from_checkpoint=true"])
        return json.loads((output_dir / "metrics.json").read_text())["train"]["train_loss"]

    assert resume_from_checkpoint_3() == pytest.approx(metrics["train"]["train_loss"], rel=1e-5)
    loss_file = output_dir / "checkpoint-3" / TRAIN_LOSS_FILE
    first_3_steps = json.loads(loss_file.read_text())["step_loss_sum"]
    loss_file.unlink()
    with pytest.warns(UserWarning, match="train_loss is the mean over steps 4-7 only"):
        session_mean = resume_from_checkpoint_3()
    assert session_mean == pytest.approx((7 * metrics["train"]["train_loss"] - first_3_steps) / 4, rel=1e-5)
    resumed = json.loads((output_dir / "metrics.json").read_text())

    capsys.readouterr()
    run_train([*arguments, "trainer.resume_from_checkpoint=true"])  # from checkpoint-7: complete
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[-1].startswith("mrloss train: ")
        and "checkpoint-7 holds step 7 of 7: the run is already complete" in out[-1]
    )
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    assert json.loads((output_dir / "metrics.json").read_text()) == resumed


def test_resuming_a_complete_epoch_based_run_raises(tokenizer, tmp_path):
    """num_train_epochs=1 of 8 samples in batches of 4: checkpoint-2 is the run's last step, so resuming from it
    raises RunAlreadyComplete and trains nothing (transformers would train a step 3 and save checkpoint-3)."""
    from mrloss.integrations.hf import RunAlreadyComplete

    dataset = MultiRegionDataset.from_samples(samples(), tokenizer)
    for resume in (None, True):
        model = tiny_causal_lm(len(tokenizer), intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
        args = cpu_training_arguments(tmp_path, num_train_epochs=1, per_device_train_batch_size=4, save_steps=2)
        trainer = MultiRegionTrainer(model, args, dataset, processing_class=tokenizer)
        if resume is None:
            trainer.train()
            continue
        with pytest.raises(RunAlreadyComplete, match="checkpoint-2 holds step 2 of 2: the run is already complete"):
            trainer.train(resume_from_checkpoint=True)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


def test_mrloss_train_reports_config_errors(tmp_path, capsys):
    from mrloss.training.run import main

    assert main(["--config", "tag_based", "trainer.epoch=2"]) == 2
    assert "config trainer.epoch: unknown key" in capsys.readouterr().err


def test_a_training_set_without_a_learned_token_is_refused_naming_the_format(tmp_path, capsys):
    """Before (#23 item 1): a wrong data.format parsed every tag_based sample as position_based without regions,
    trained on nothing (every weight 0, losses 0.0) and exited 0."""
    from mrloss.data import write_examples

    data = write_examples(tmp_path / "data")["tag_based"]
    argv = [
        "train",
        "--config",
        "position_based",
        f"data.train_files=[{data}]",
        f"trainer.output_dir={tmp_path / 'run'}",
    ]
    code, err = run_cli([*argv, "trainer.device=cpu"], capsys)
    assert (code, err.count("\n")) == (2, 1), err
    assert err == (
        f"mrloss train: config data.train_files: 0 of {len(EXAMPLES)} samples in {data} have a learned token "
        "(weight > 0), so nothing would be trained: data.format is position_based but the samples look tag_based "
        "(set data.format=tag_based or auto)\n"
    )
    assert not (tmp_path / "run/model.safetensors").exists()


def test_samples_without_a_learned_token_are_counted_in_a_warning():
    from mrloss.training.build import check_learned_tokens
    from mrloss.training.config import DataConfig

    tokenizer = train_bpe_tokenizer(["plain words and a learned answer"] * 8, vocab_size=300)
    samples = [{"text": "plain words"}, {"text": "a <LEARN>learned answer</LEARN>"}, {"text": "more words"}]
    dataset = MultiRegionDataset.from_samples(samples, tokenizer, sample_ids=["a:1", "a:2", "a:3"])
    with pytest.warns(UserWarning, match=r"^2 of 3 training samples have no learned token .* e\.g\. a:1$"):
        check_learned_tokens(dataset, DataConfig(train_files=["a"]))


def test_examples_are_written_only_at_the_shipped_example_paths(tmp_path, capsys, monkeypatch):
    """Before (#23 item 11): a typo'd data.train_files=[mydata/corpus_v2.jsonl] filled mydata/ with the example
    files before "not found", and newproj/tag_based.jsonl trained on the shipped examples with exit 0."""
    monkeypatch.chdir(tmp_path)
    for path in ("mydata/corpus_v2.jsonl", "newproj/tag_based.jsonl"):
        code, err = run_cli(["train", "--config", "tag_based", f"data.train_files=[{path}]"], capsys)
        assert code == 2 and err == (
            f"mrloss train: config data: file(s) not found: {path} (data.write_examples writes the example data set "
            "only to examples/sft/multi_region/data/<format>.jsonl)\n"
        )
    assert sorted(os.listdir(tmp_path)) == []  # nothing written: no data folder, no run directory


def test_a_shared_monitor_dir_keeps_the_other_runs_record(tmp_path, capsys):
    """Before (#23 item 11): a second run with the same monitor.output_dir deleted the first's region_stats.jsonl.
    Now it is refused, as a non-empty trainer.output_dir is, unless trainer.overwrite_output_dir."""
    from mrloss.training.config import load_config
    from mrloss.training.run import check_monitor_dir

    monitor = tmp_path / "monitor"
    monitor.mkdir()
    (monitor / "region_stats.jsonl").write_text('{"step": 1}\n')
    argv = ["train", "--config", "tag_based", f"monitor.output_dir={monitor}", f"trainer.output_dir={tmp_path / 'b'}"]
    code, err = run_cli(argv, capsys)
    assert (code, err) == (
        2,
        f"mrloss train: config monitor.output_dir: {monitor / 'region_stats.jsonl'} holds the record of another "
        "run; replace it (trainer.overwrite_output_dir=true) or choose another directory\n",
    )
    assert (monitor / "region_stats.jsonl").read_text() == '{"step": 1}\n'
    for allowed in ("trainer.overwrite_output_dir=true", "trainer.resume_from_checkpoint=true"):
        check_monitor_dir(load_config("tag_based", [f"monitor.output_dir={monitor}", allowed]))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["position", "tag", "structured"])
def test_run_script_two_processes(script, tmp_path):
    """NPROC=2 on CPU (DDP over gloo), a few steps; the structured config packs and uses Qwen3."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            "bash",
            str(REPO / f"examples/sft/multi_region/run_multi_region_{script}.sh"),
            "2",
            "out",
            "trainer.max_steps=2",
            "trainer.save_steps=null",
            "data.max_length=128",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())  # SAVE_PATH relative to the caller
    assert metrics["world_size"] == 2 and metrics["train"]["epoch"] > 0
    assert (tmp_path / "out/model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "trl"])
def test_mrloss_train_ddp_equals_one_process(backend, tmp_path):
    """`mrloss train` under torchrun, 2 CPU processes (DDP over gloo, per-device batch 2) and one process (batch 4)
    see the same samples per step: the global Σw normalizes both, so the same losses, per-type losses, gradient
    norms and trained weights (fp32, the shipped tag_based config with dynamic weights, 3 AdamW steps)."""
    from safetensors.torch import load_file

    from mrloss.data import write_examples

    common = [
        f"data.train_files=[{write_examples(tmp_path / 'data')['tag_based']}]",
        "data.max_length=96",
        "trainer.max_steps=3",
        "trainer.save_steps=null",
        "trainer.logging_steps=1",
        "trainer.device=cpu",
        "model.hidden_size=32",
        "model.intermediate_size=48",
        "model.num_layers=1",
        "monitor.enabled=false",
        "loss.backend=torch",
        f"trainer.backend={backend}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {
        "ddp": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mrloss.cli"], 2),
        "single": (["-m", "mrloss.cli"], 4),
    }
    for name, (launcher, batch) in runs.items():
        command = [sys.executable, *launcher, "train", "--config", "tag_based", *common]
        command += [f"trainer.output_dir={tmp_path / name}", f"trainer.per_device_batch_size={batch}"]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def logs(name):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        keys = ("loss", "grad_norm", "loss/concept", "loss/definition", "loss/methodology")
        steps = [entry for entry in metrics["log_history"] if "loss" in entry]
        return metrics["world_size"], len(steps), [entry[key] for entry in steps for key in keys]

    (ddp_world, ddp_steps, ddp_logs), (single_world, _, single_logs) = logs("ddp"), logs("single")
    assert (ddp_world, single_world, ddp_steps) == (2, 1, 3)
    assert ddp_logs == pytest.approx(single_logs, rel=1e-4)
    ddp_weights, single_weights = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    assert ddp_weights.keys() == single_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(
            weight, single_weights[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_run_script_usage_error():
    result = subprocess.run(
        ["bash", str(REPO / "examples/sft/multi_region/run_multi_region_tag.sh"), "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "usage: bash" in result.stderr and "NPROC SAVE_PATH" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mrloss.cli", "demo", "--output-dir", "demo", "--steps", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "loss mask of sample" in out and "⟦" in out  # the mask, plain-text form (NO_COLOR)
    assert "start" in out and "end" in out and "concept" in out and "weighted" in out
    assert (tmp_path / "demo/run/model.safetensors").exists() and (tmp_path / "demo/data/tag_based.jsonl").exists()


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.lr_scheduler=cosin"], "config trainer.lr_scheduler: expected one of ['linear', 'cosine', "),
        (["trainer.report_to=[tensorbord]"], "config trainer.report_to: unknown 'tensorbord'; expected names among"),
        (["loss.backend=triton"], "config loss.backend: 'triton' runs on a CUDA device and this run is on the CPU"),
        (["model.arch=bart"], "config model.arch: cannot patch BartForCausalLM (model_type 'bart'): its "),
        (
            ["model.attn_implementation=eagr"],
            "config model.attn_implementation: 'eagr': Specified `attn_implementation",
        ),
        (
            ["weighting.region_dependencies={region_dependencies: {x: {requires: [y]}}}"],
            "config weighting.region_dependencies names region type(s) ['x', 'y'] that are not in the data's region",
        ),
        (
            ["data.max_length=1"],
            "config data.train_files: 0 of 4 samples in ",  # ... have a learned token ...: data.max_length 1 (right
        ),
    ],
    ids=["lr-scheduler", "report-to", "triton-on-cpu", "arch-bart", "attn-implementation", "unknown-type", "truncated"],
)
def test_run_mistakes_are_one_line(overrides, message, tmp_path, capsys, monkeypatch):
    """Before (#23 tracebacks): a traceback each from transformers, apply_mrloss or the first loss call."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain CPU machine
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a <LEARN>b c</LEARN>"}\n' * 4)
    run = tmp_path / "run"
    small = ["data.max_length=32", "model.hidden_size=16", "model.intermediate_size=16", "model.num_layers=1"]
    argv = ["train", "--config", "tag_based", f"data.train_files=[{data}]", f"trainer.output_dir={run}"]
    code, err = run_cli([*argv, "trainer.device=cpu", *small, *overrides], capsys)
    assert code == 2 and err.startswith(f"mrloss train: {message}") and err.count("\n") == 1, err
    assert not (run / "model.safetensors").exists()
    if "data.max_length=1" in overrides:
        assert err.endswith(": data.max_length 1 (right truncation) cut the learned regions of 4 samples\n")


def test_resume_onto_another_model_shape_is_one_line(tmp_path, capsys):
    """Before (#23 tracebacks): resuming with other model sizes ended in a state_dict size-mismatch traceback."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a <LEARN>b c</LEARN>"}\n' * 4)
    run = tmp_path / "run"
    common = ["train", "--config", "tag_based", f"data.train_files=[{data}]", f"trainer.output_dir={run}"]
    small = ["trainer.device=cpu", "data.max_length=32", "model.intermediate_size=16", "model.num_layers=1"]
    first = [*common, *small, "model.hidden_size=16", "trainer.max_steps=1", "trainer.save_steps=1"]
    code, err = run_cli([*first, "weighting.dynamic_weights=null", "monitor.enabled=false"], capsys)
    assert code == 0, err
    resumed = [*common, *small, "model.hidden_size=32", "trainer.max_steps=2", "trainer.resume_from_checkpoint=true"]
    code, err = run_cli([*resumed, "weighting.dynamic_weights=null", "monitor.enabled=false"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"mrloss train: config trainer.resume_from_checkpoint: {run / 'checkpoint-1'} holds a model with hidden_size "
        "16, the config builds 32 (model.hidden_size)"
    )


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(tmp_path, capsys, monkeypatch):
    """Before (#23 tracebacks): a traceback. Exit code 1: a file problem (`mrloss.cli._user_error_code`)."""
    import errno

    def disk_full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", disk_full)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a <LEARN>b c</LEARN>"}\n' * 4)
    argv = ["train", "--config", "tag_based", f"data.train_files=[{data}]", f"trainer.output_dir={tmp_path / 'run'}"]
    small = ["trainer.device=cpu", "data.max_length=32", "model.hidden_size=16", "model.intermediate_size=16"]
    code, err = run_cli(
        [*argv, *small, "trainer.max_steps=2", "trainer.save_steps=1", "weighting.dynamic_weights=null"], capsys
    )
    assert (code, err) == (
        1,
        "mrloss train: [Errno 28] training stopped at step 1: No space left on device; checkpoints written before "
        "are complete (resume: trainer.resume_from_checkpoint=true)\n",
    )


def test_logs_are_plain_lines_when_output_is_not_a_terminal(tmp_path, capsys):
    """Before (#23 rough edges): tqdm's carriage returns flooded log files. Without a terminal (capsys here) the
    Trainer prints one line per log step and transformers' own bars are off."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a <LEARN>b c</LEARN>"}\n' * 4)
    argv = ["train", "--config", "tag_based", f"data.train_files=[{data}]", f"trainer.output_dir={tmp_path / 'run'}"]
    small = ["trainer.device=cpu", "data.max_length=32", "model.hidden_size=16", "model.intermediate_size=16"]
    steps = [
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "trainer.save_steps=null",
        "weighting.dynamic_weights=null",
    ]
    from mrloss.cli import main

    assert main([*argv, *small, *steps]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    assert sum(line.startswith("{'loss': ") for line in captured.out.splitlines()) == 2, captured.out


def test_token_metrics_only_on_steps_that_log(tokenizer, tmp_path, monkeypatch):
    """The token metrics cost a pass over the logits chunks: the patched forward computes them only on the
    optimizer steps that end in a training log (logging_steps=2 of 5 steps, plus the first), and every such log has
    them; the other steps' outputs carry None."""
    from mrloss.integrations import hf

    computed = []
    record = hf.RegionLogStats.add

    def add(self, batch, outputs, loss_sums=None):
        computed.append(outputs.token_accuracy is not None and outputs.token_entropy is not None)
        return record(self, batch, outputs, loss_sums)

    monkeypatch.setattr(hf.RegionLogStats, "add", add)
    dataset = MultiRegionDataset.from_samples(samples(tail_weight=0.5), tokenizer)
    trainer, _ = train_tiny(tokenizer, dataset, tmp_path, max_steps=5, logging_steps=2, logging_first_step=True)
    assert computed == [True, True, False, True, False]
    logged = [entry for entry in trainer.state.log_history if "loss/answer" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 4]
    assert all(0 <= entry["mean_token_accuracy"] <= 1 and entry["entropy"] > 0 for entry in logged)
