"""`mrloss.integrations.trl`: TRL's SFTTrainer with mrloss's weighted loss, against the plain-Trainer path
(`MultiRegionTrainer`), TRL's own trainer and a float64 weighted cross-entropy; packing, padding-free, gradient
accumulation, completion-only loss, LoRA and ``mrloss train --trainer trl``."""

import dataclasses
import json

import pytest
import torch
from tiny_models import tiny_causal_lm

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mrloss.integrations.hf import MultiRegionTrainer  # noqa: E402
from mrloss.integrations.trl import MultiRegionSFTTrainer, sft_dataset  # noqa: E402
from mrloss.ops.reference import reference_linear_cross_entropy  # noqa: E402
from mrloss.training.run import checkpointing_arguments  # noqa: E402

REGION_TYPES = ["concept", "definition"]
LENGTHS = (9, 13, 6, 11)


def tiny_model(tokenizer):
    return tiny_causal_lm(
        len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="eager",
    )


def token_dataset(tokenizer, *, weights=True, mask_column=None, seed=3):
    """Pre-tokenized samples of different lengths with non-uniform weights (some 0) and region types."""
    g = torch.Generator().manual_seed(seed)
    columns = {"input_ids": [], "token_weights": [], "region_type_ids": [], "mask": []}
    for length in LENGTHS:
        columns["input_ids"].append(torch.randint(3, len(tokenizer), (length,), generator=g).tolist())
        w = torch.rand(length, generator=g) * 2.0
        w[torch.rand(length, generator=g) < 0.25] = 0.0
        columns["token_weights"].append(w.tolist())
        columns["region_type_ids"].append(torch.randint(-1, len(REGION_TYPES), (length,), generator=g).tolist())
        columns["mask"].append([0] * (length // 2) + [1] * (length - length // 2))  # prompt, then completion
    mask = columns.pop("mask")
    if mask_column is not None:
        columns[mask_column] = mask
    if not weights:
        del columns["token_weights"], columns["region_type_ids"]
    features = {
        "input_ids": datasets.List(datasets.Value("int64")),
        "token_weights": datasets.List(datasets.Value("float32")),
        "region_type_ids": datasets.List(datasets.ClassLabel(names=REGION_TYPES)),
        "completion_mask": datasets.List(datasets.Value("int64")),
        "assistant_masks": datasets.List(datasets.Value("int64")),
    }
    return datasets.Dataset.from_dict(columns, features=datasets.Features({k: features[k] for k in columns}))


class GradientsOfFirstStep(transformers.TrainerCallback):
    """The gradients the optimizer sees at the first step (after accumulation, before the update)."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def sft_args(tmp_path, **options):
    values = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        bf16=False,
        **checkpointing_arguments(False),  # TRL's default is on
        per_device_train_batch_size=4,
        max_steps=1,
        max_grad_norm=0.0,
        learning_rate=1e-2,
        max_length=None,
        dataloader_drop_last=False,
    )
    return trl.SFTConfig(**{**values, **options})


def run(trainer_class, tokenizer, dataset, tmp_path, model=None, **options):
    """One optimizer step; returns (logged loss, gradients of that step, the trainer)."""
    model = tiny_model(tokenizer) if model is None else model
    recorder = GradientsOfFirstStep()
    args = sft_args(tmp_path, **options)
    if trainer_class is MultiRegionTrainer:
        names = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
        args = transformers.TrainingArguments(**{k: v for k, v in args.to_dict().items() if k in names})
        trainer = MultiRegionTrainer(
            model, args, dataset, processing_class=tokenizer, region_types=REGION_TYPES, callbacks=[recorder]
        )
    else:
        trainer = trainer_class(model, args, train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder])
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return loss, recorder.gradients, trainer


def float64_reference(tokenizer, dataset, weight_of=lambda i, w: w):
    """Weighted CE of the whole data set as one padded batch, float64 model and loss: loss, gradients."""
    model = tiny_model(tokenizer).double()
    width = max(LENGTHS)
    rows = range(len(dataset))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    weights = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i in rows:
        ids = dataset[i]["input_ids"]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        weights[i, : len(ids)] = weight_of(i, torch.tensor(dataset[i]["token_weights"], dtype=torch.float64))
        mask[i, : len(ids)] = 1
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    loss = reference_linear_cross_entropy(
        logits, torch.eye(logits.shape[-1], dtype=torch.float64), labels, weights, shift=True
    )
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def assert_close_gradients(actual, expected, rtol=1e-4, atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def padded_step(tokenizer, tmp_path_factory):
    """One TRL step on `token_dataset`, padded, batch of 4: (loss, gradients, trainer)."""
    return run(MultiRegionSFTTrainer, tokenizer, token_dataset(tokenizer), tmp_path_factory.mktemp("padded"))


def test_one_step_equals_the_plain_trainer_and_a_float64_weighted_cross_entropy(tokenizer, tmp_path, padded_step):
    dataset = token_dataset(tokenizer)
    loss, gradients, trainer = padded_step
    plain_loss, plain_gradients, _ = run(MultiRegionTrainer, tokenizer, dataset, tmp_path / "hf")
    expected_loss, expected_gradients = float64_reference(tokenizer, dataset)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert_close_gradients(gradients, expected_gradients)
    assert_close_gradients(gradients, plain_gradients, rtol=1e-5)
    logs = trainer.state.log_history[0]
    assert {f"loss/{t}" for t in REGION_TYPES} <= set(logs) and {"entropy", "mean_token_accuracy", "num_tokens"} <= set(
        logs
    )
    # TRL's fused LM head (its unweighted loss) is gone from the model and cannot be called by mistake
    batch = trainer.data_collator([dataset[i] for i in range(2)])
    with pytest.raises(RuntimeError, match="fused_lm_head"):
        trainer.model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True)


@pytest.mark.parametrize("layout", [{"padding_free": True}, {"packing": True, "max_length": 64}])
def test_packing_and_padding_free_equal_padded(tokenizer, tmp_path, layout, padded_step):
    dataset = token_dataset(tokenizer)
    padded_loss, padded_gradients, _ = padded_step
    loss, gradients, trainer = run(MultiRegionSFTTrainer, tokenizer, dataset, tmp_path / "packed", **layout)
    assert trainer.padding_free  # TRL's packing ("bfd") is padding-free: one row, position_ids restart per sample
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert batch["input_ids"].shape[0] == 1 and batch["token_weights"].shape == batch["input_ids"].shape
    assert loss == pytest.approx(padded_loss, rel=1e-5)
    assert_close_gradients(gradients, padded_gradients)


def test_gradient_accumulation_2x2_equals_a_batch_of_4(tokenizer, tmp_path, padded_step):
    dataset = token_dataset(tokenizer)
    loss, gradients, _ = padded_step
    accumulated_loss, accumulated_gradients, _ = run(
        MultiRegionSFTTrainer,
        tokenizer,
        dataset,
        tmp_path / "2x2",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert accumulated_loss == pytest.approx(loss, rel=1e-5)
    assert_close_gradients(accumulated_gradients, gradients)


def test_without_weights_it_is_trls_own_loss_and_logs(tokenizer, tmp_path):
    """A plain TRL data set (no token_weights): weight 1 on TRL's labels, i.e. exactly trl.SFTTrainer."""
    dataset = token_dataset(tokenizer, weights=False)
    loss, gradients, trainer = run(
        MultiRegionSFTTrainer,
        tokenizer,
        dataset,
        tmp_path / "ours",
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    trl_loss, trl_gradients, trl_trainer = run(
        trl.SFTTrainer,
        tokenizer,
        dataset,
        tmp_path / "trl",
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert_close_gradients(gradients, trl_gradients)
    ours, theirs = trainer.state.log_history[0], trl_trainer.state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


@pytest.mark.parametrize(
    "mask_column, completion_only_loss, masked",
    [("completion_mask", True, True), ("completion_mask", False, False), ("assistant_masks", None, True)],
)
def test_trls_masks_combine_with_region_weights(tokenizer, tmp_path, mask_column, completion_only_loss, masked):
    """A token is trained iff TRL keeps its label (completion_only_loss: the completion_mask; an assistant_masks
    column always) and its weight is > 0; the normalizer is the Σ of those weights."""
    dataset = token_dataset(tokenizer, mask_column=mask_column)
    loss, gradients, _ = run(
        MultiRegionSFTTrainer, tokenizer, dataset, tmp_path, completion_only_loss=completion_only_loss
    )

    def weight_of(i, w):
        return w * torch.tensor(dataset[i][mask_column]) if masked else w

    expected_loss, expected_gradients = float64_reference(tokenizer, dataset, weight_of)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close_gradients(gradients, expected_gradients)


def test_a_lora_model_trains(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    dataset = token_dataset(tokenizer)
    model = tiny_model(tokenizer)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MultiRegionSFTTrainer(
        model,
        sft_args(tmp_path, max_steps=6, learning_rate=5e-2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    named = dict(trainer.model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and all(named[n].requires_grad for n in lora)
    for name, before in base.items():  # the base weights stay frozen
        peft_name = next(
            n for n in named if n.endswith(name.replace(".weight", ".base_layer.weight")) or n.endswith(name)
        )
        torch.testing.assert_close(named[peft_name].detach(), before, msg=peft_name)

    with pytest.raises(ValueError, match="lm_head"):
        MultiRegionSFTTrainer(
            tiny_model(tokenizer),
            sft_args(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        )


def test_raw_samples_in_any_format_become_weighted_token_data(tokenizer):
    from mrloss.data.examples import EXAMPLES

    tag_rows = datasets.Dataset.from_list(
        [{"text": s["text"]} for s in EXAMPLES if "text" in s and "<LEARN" in s["text"]]
    )
    for source in (EXAMPLES, tag_rows):
        dataset = sft_dataset(source, tokenizer, max_length=64)
        assert {"input_ids", "token_weights", "region_type_ids"} <= set(dataset.column_names)
        names = dataset.features["region_type_ids"].feature.names
        assert {"concept", "definition", "methodology"} <= set(names)
        assert any(w > 1.0 for row in dataset["token_weights"] for w in row)
    plain = datasets.Dataset.from_list([{"text": "no regions here"}])
    assert sft_dataset(plain, tokenizer) is plain  # plain TRL data: TRL tokenizes it


def test_a_datasets_dataset_of_mixed_formats_and_extra_columns(tokenizer, tmp_path):
    """Columnar rows hold null for the other formats' columns: not keys of the sample. Unknown columns need
    ``extra_keys``, as everywhere."""
    from mrloss.data.examples import EXAMPLES
    from mrloss.formats import FORMATS, FormatError, convert

    mixed = [convert(sample, FORMATS[i % 3]) for i, sample in enumerate(EXAMPLES)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({**s, "score": i}) + "\n" for i, s in enumerate(mixed)), encoding="utf-8")
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    assert {"text", "segments", "learning_regions", "score"} <= set(rows.column_names)
    with pytest.raises(FormatError, match="sample 0, field 'score': unknown key 'score'"):
        sft_dataset(rows, tokenizer)
    dataset = sft_dataset(rows, tokenizer, extra_keys=["score"])
    expected = sft_dataset(mixed, tokenizer)
    assert dataset["input_ids"] == expected["input_ids"] and dataset["token_weights"] == expected["token_weights"]


def test_mrloss_train_with_the_trl_backend(tmp_path, monkeypatch):
    import json

    from mrloss.training.run import main

    monkeypatch.chdir(tmp_path)
    overrides = [  # data: the built-in config's examples, written to examples/sft/multi_region/data/
        "data.max_length=96",
        "data.pack=true",
        "trainer.output_dir=run",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "trainer.save_steps=null",
        "trainer.device=cpu",
        "model.hidden_size=32",
        "model.intermediate_size=64",
    ]
    assert main(["--config", "tag_based", "--trainer", "trl", *overrides]) == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    last = metrics["region_losses"]["last"]
    assert {"concept", "definition", "methodology"} <= set(last)
    assert any("entropy" in entry for entry in metrics["log_history"])
    config = (tmp_path / "run/config.yaml").read_text()
    assert "backend: trl" in config
