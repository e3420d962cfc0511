"""`mrloss.integrations.hf`: the patched forward against each model's own logits + a float64 weighted CE."""

import pytest
import torch
from tiny_models import tiny_causal_lm

transformers = pytest.importorskip("transformers")

from mrloss.integrations.hf import SUPPORTED_ARCHITECTURES, apply_mrloss, valid_weight_sum  # noqa: E402
from mrloss.ops.reference import reference_linear_cross_entropy  # noqa: E402

VOCAB = 97
# model_type -> config extras that make the architecture's head special enough to test it.
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},  # tied embeddings
    "phi3": {},
    "gemma2": {"final_logit_softcapping": 0.7},  # small, so the cap matters on a tiny model's logits
    "gemma3_text": {"final_logit_softcapping": 0.7},
    "cohere": {"logit_scale": 0.37},
    "granite": {"logits_scaling": 2.5},
}


def tiny_model(model_type, **extra):
    return tiny_causal_lm(
        VOCAB,
        model_type,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
        **{**ARCHITECTURES.get(model_type, {}), **extra},
    )


def random_batch(batch=2, length=13, seed=1):
    """HF convention: labels = input_ids, -100 on padding and on weight-0 tokens; weights 0 on padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, -4:] = 0
    token_weights = torch.rand(batch, length, generator=g) * 2.0
    token_weights[torch.rand(batch, length, generator=g) < 0.3] = 0.0
    token_weights[attention_mask == 0] = 0.0
    labels = torch.where(token_weights > 0, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "token_weights": token_weights}


def oracle(model, batch, normalizer=None):
    """The model's own logits (stock forward) + a float64 weighted cross-entropy: loss, token losses."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    identity = torch.eye(VOCAB, dtype=torch.float64)  # logits @ I^T = logits: the oracle's "head"
    output = reference_linear_cross_entropy(
        logits,
        identity,
        batch["labels"],
        batch["token_weights"],
        shift=True,
        normalizer=normalizer,
        return_token_losses=True,
    )
    return output.loss, output.token_losses


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
@pytest.mark.parametrize("with_normalizer", [False, True])
def test_patched_loss_and_grads_match_model_logits(model_type, with_normalizer):
    model = tiny_model(model_type)
    batch = random_batch()
    # num_items_in_batch: the global Σw of a bigger optimizer step (this micro-batch is part of it).
    normalizer = valid_weight_sum(batch["labels"], batch["token_weights"]) * 1.75 if with_normalizer else None
    params = trainable(model)
    expected, expected_token_losses = oracle(model, batch, normalizer)
    expected_grads = torch.autograd.grad(expected, [p for _, p in params])

    apply_mrloss(model)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    out = model(**batch, num_items_in_batch=normalizer)
    assert out.logits is None and not head_calls  # no [B, T, V] logits
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_losses.double(), expected_token_losses, rtol=1e-4, atol=1e-5)
    assert out.token_losses.shape == batch["input_ids"].shape
    grads = torch.autograd.grad(out.loss, [p for _, p in params], allow_unused=True)
    for (name, _), grad, expected_grad in zip(params, grads, expected_grads):
        assert grad is not None, name
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_supported_architectures_are_all_tested():
    tested = {type(tiny_model(model_type)).__name__ for model_type in ARCHITECTURES}
    assert tested == set(SUPPORTED_ARCHITECTURES)


def test_without_token_weights_equals_the_stock_hf_loss():
    model = tiny_model("qwen3")
    batch = random_batch(seed=5)
    stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    stock_sum = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        num_items_in_batch=torch.tensor(31),
    )
    apply_mrloss(model)
    ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ours_sum = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        num_items_in_batch=torch.tensor(31),
    )
    torch.testing.assert_close(ours.loss, stock.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_sum.loss, stock_sum.loss, rtol=1e-5, atol=1e-6)


def test_without_labels_returns_the_stock_logits_and_generates():
    model = tiny_model("gemma2")
    batch = random_batch()
    stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    apply_mrloss(model)
    apply_mrloss(model, label_smoothing=0.1)  # re-applying replaces the options, does not stack
    patched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(patched, stock)
    generated = model.generate(batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    with pytest.raises(ValueError, match="token_weights were given without labels"):
        model(input_ids=batch["input_ids"], token_weights=batch["token_weights"])


def test_label_smoothing_and_softcap_options_reach_the_loss():
    model = tiny_model("llama")
    batch = random_batch(seed=3)
    apply_mrloss(model, label_smoothing=0.1, softcap=0.9)
    out = model(**batch)
    logits = model.lm_head(
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    )
    expected = reference_linear_cross_entropy(
        logits,
        torch.eye(VOCAB, dtype=torch.float64),
        batch["labels"],
        batch["token_weights"],
        shift=True,
        label_smoothing=0.1,
        softcap=0.9,
    )
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_token_accuracy_and_entropy_match_the_model_logits(memory):
    model = tiny_model("gemma2")  # softcapped logits: the metrics are those of the capped distribution
    batch = random_batch(seed=4)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
    targets = batch["labels"][:, 1:]
    learned = targets != -100
    hits = learned & (torch.arange(targets.shape[1]) % 2 == 0)  # labels only feed the loss: make these the argmax
    targets[hits] = logits.argmax(-1)[hits]
    log_probs = logits.log_softmax(-1)
    zero = torch.zeros(2, 1, dtype=torch.float64)
    accuracy = torch.cat([zero, ((logits.argmax(-1) == targets) & learned).double()], 1)
    entropy = torch.cat([zero, torch.where(learned, -(log_probs.exp() * log_probs).sum(-1), 0.0)], 1)
    apply_mrloss(model, memory=memory, z_loss_scale=1e-3)
    out = model(**batch)
    assert out.token_accuracy.shape == out.token_entropy.shape == batch["input_ids"].shape
    torch.testing.assert_close(out.token_accuracy.double(), accuracy)
    torch.testing.assert_close(out.token_entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    assert 0 < accuracy.sum() < learned.sum()


def test_peft_lora_model_matches_and_trains_only_the_adapter():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    batch = random_batch(seed=7)
    params = trainable(model)
    assert any("lora_" in name for name, _ in params) and any("modules_to_save" in name for name, _ in params)
    expected, _ = oracle(model, batch)
    expected_grads = torch.autograd.grad(expected, [p for _, p in params])
    apply_mrloss(model)
    out = model(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.loss, [p for _, p in params])
    for (name, _), grad, expected_grad in zip(params, grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_lm_head_is_a_clear_error():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head .*PEFT adapter"):
        apply_mrloss(model)


def test_unknown_architecture_and_options_are_clear_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="cannot patch GPT2LMHeadModel.*supported architectures"):
        apply_mrloss(gpt2)
    with pytest.raises(TypeError, match="unknown loss option.*'reduction'"):
        apply_mrloss(tiny_model("llama"), reduction="sum")


def test_packed_rows_give_the_padded_loss():
    """MultiRegionCollator(pack=True) + model_inputs: each packed sample attends only to itself."""
    from mrloss.data import MultiRegionCollator
    from mrloss.integrations.hf import model_inputs

    g = torch.Generator().manual_seed(11)
    items = []
    for length in (7, 12, 5, 9):
        weights = torch.rand(length, generator=g) + 0.1
        weights[0] = 0.0
        items.append(
            {
                "input_ids": torch.randint(3, VOCAB, (length,), generator=g),
                "token_weights": weights,
                "region_type_ids": torch.zeros(length, dtype=torch.long),
            }
        )
    model = apply_mrloss(tiny_model("llama"))
    padded = model(**model_inputs(MultiRegionCollator(0)(items)))
    packed_batch = MultiRegionCollator(0, pack=True, max_length=24)(items)
    assert packed_batch["input_ids"].shape[0] < len(items)  # really packed
    packed = model(**model_inputs(packed_batch))
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)


def test_integer_num_items_in_batch_with_weights_warns_once_and_is_used_as_given():
    """An integer num_items_in_batch next to token_weights is a token count (a stock Trainer's): used as the
    normalizer, with one warning per model; a float one (MultiRegionTrainer's Σw) or no weights: no warning."""
    import warnings

    model = apply_mrloss(tiny_model("llama"))
    batch = random_batch(seed=4)
    expected = oracle(model, batch, normalizer=torch.tensor(23.0, dtype=torch.float64))[0]
    with pytest.warns(UserWarning, match="integer .*token count.*MultiRegionTrainer"):
        out = model(**batch, num_items_in_batch=torch.tensor(23))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch, num_items_in_batch=23)  # warned once per model
        apply_mrloss(tiny_model("llama"))(**batch, num_items_in_batch=torch.tensor(23.0))
        unweighted = {key: value for key, value in batch.items() if key != "token_weights"}
        apply_mrloss(tiny_model("llama"))(**unweighted, num_items_in_batch=torch.tensor(23))


def test_stock_trainer_passes_a_token_count(tmp_path):
    """transformers' own Trainer (not MultiRegionTrainer) with a patched model: num_items_in_batch is its
    count of labels[..., 1:] != -100, so the patched forward warns that the loss is not the weighted mean."""
    from mrloss.data import MultiRegionCollator
    from mrloss.integrations.hf import model_inputs

    g = torch.Generator().manual_seed(2)
    items = [
        {
            "input_ids": torch.randint(3, VOCAB, (9,), generator=g),
            "token_weights": torch.rand(9, generator=g) + 0.5,
            "region_type_ids": torch.zeros(9, dtype=torch.long),
        }
        for _ in range(4)
    ]
    collator = MultiRegionCollator(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=2,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = transformers.Trainer(
        apply_mrloss(tiny_model("llama")),
        args,
        train_dataset=items,
        data_collator=lambda batch: model_inputs(collator(batch)),
    )
    with pytest.warns(UserWarning, match="integer .*token count"):
        trainer.train()


@pytest.mark.gpu
def test_labels_weights_and_normalizer_follow_the_hidden_states_device():
    """Inputs on the GPU, labels / token_weights / num_items_in_batch left on the CPU (as with a model split
    over devices, whose last hidden state is not where the batch is): same loss as all on the CPU."""
    model = tiny_model("llama")
    batch = random_batch(seed=6)
    normalizer = valid_weight_sum(batch["labels"], batch["token_weights"]).float() * 1.5
    expected = apply_mrloss(model, backend="torch")(**batch, num_items_in_batch=normalizer).loss
    model.cuda()
    out = model(
        input_ids=batch["input_ids"].cuda(),
        attention_mask=batch["attention_mask"].cuda(),
        labels=batch["labels"],
        token_weights=batch["token_weights"],
        num_items_in_batch=normalizer,
    )
    torch.testing.assert_close(out.loss.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_one_head_table_for_both_integrations():
    """hf and verl read the same table and option list (mrloss.integrations.heads)."""
    from mrloss.integrations import heads, hf

    assert hf.SUPPORTED_ARCHITECTURES is heads.SUPPORTED_ARCHITECTURES and hf.LOSS_OPTIONS is heads.LOSS_OPTIONS
    granite = tiny_model("granite")
    assert heads.model_head(granite, caller="t") == heads.Head(hidden_scale=1 / 2.5, softcap=None)
    assert heads.model_head(tiny_model("gemma2"), 0.3, caller="t").softcap == 0.3


def test_readme_hf_code_block_runs_as_written(tmp_path, monkeypatch):
    """Before (#23 rough edges): README's Hugging Face block used names it never defined. Run it as written (in a
    scratch directory: it writes data/ and out/)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Training with Hugging Face transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md (Training with Hugging Face transformers)", "exec"), namespace)
    assert namespace["out"].logits is None and torch.isfinite(namespace["out"].loss)
    assert namespace["trainer"].state.global_step == 2
