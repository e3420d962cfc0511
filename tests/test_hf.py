"""`mrloss.integrations.hf`: the patched forward against each model's own logits + a float64 weighted CE."""

import pytest
import torch
from helpers import cpu_training_arguments
from tiny_models import tiny_causal_lm

transformers = pytest.importorskip("transformers")

from mrloss.formats import parse  # noqa: E402
from mrloss.integrations.hf import apply_mrloss, valid_weight_sum  # noqa: E402
from mrloss.integrations.patch import weight_sum  # noqa: E402
from mrloss.ops.reference import reference_linear_cross_entropy  # noqa: E402

VOCAB = 97
# model_type -> config extras that make the architecture's head special enough to test it (every family of the
# installed transformers: tests/test_patch.py; here also the gradients).
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
    "phi": {},  # lm_head with a bias
    "hyperclovax": {"logits_scaling": 2.5},  # multiplies by logits_scaling (Granite divides)
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
    normalizer = None if normalizer is None else weight_sum(normalizer)
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


def test_the_lm_head_is_found_once_per_model_not_on_every_step(monkeypatch):
    """Before (a #24 follow-up): every patched forward walked ``named_modules()`` to find lm_head. Now the patch's
    own check (which runs the forward with a fake head) finds it, and the steps walk nothing."""
    model = tiny_model("llama")
    walks = []
    walk = model.named_modules
    monkeypatch.setattr(model, "named_modules", lambda *args, **kwargs: walks.append(1) or walk(*args, **kwargs))
    apply_mrloss(model)
    assert walks
    walks.clear()
    batch = random_batch()
    losses = [model(**batch).loss for _ in range(3)]
    assert not walks and losses[0].item() == losses[2].item()


def test_a_head_replaced_after_apply_mrloss_is_found_again():
    """The remembered path is checked on every step: a head that PEFT wraps after apply_mrloss (a new module at
    the same path; the patched forward is the wrapped model's) gets the gradient, and a head that moves to another
    path is found there (the module at the old path is kept, not replaced by the head)."""
    peft = pytest.importorskip("peft")
    model = apply_mrloss(tiny_model("llama"))
    batch = random_batch(seed=3)
    model(**batch)  # remembers lm_head's path
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    params = [(name, p) for name, p in trainable(model) if "modules_to_save" in name]
    assert params
    out = model(**batch)  # the patched forward of the model inside
    expected, _ = oracle(model, batch)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.loss, [p for _, p in params])
    expected_grads = torch.autograd.grad(expected, [p for _, p in params])
    for (name, _), grad, expected_grad in zip(params, grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6, msg=name)

    class Holder(torch.nn.Module):  # the head one level down, as its model's get_output_embeddings says
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, hidden):
            return self.head(hidden)

    causal_lm = model.get_base_model()
    holder = causal_lm.lm_head = Holder(causal_lm.lm_head)
    causal_lm.get_output_embeddings = lambda: holder.head
    torch.testing.assert_close(model(**batch).loss, out.loss)
    assert causal_lm.lm_head is holder


def test_the_patched_forward_has_the_models_signature_so_generate_matches_the_stock_model():
    """Before (found for a #24 follow-up): the patched forward's signature was ``(*args, labels, ..., **kwargs)``.
    transformers' ``generate`` builds ``attention_mask`` and ``position_ids`` only for a forward that names them,
    so a left-padded prompt given without a mask was run unmasked: scores off by 0.44 on this tiny Llama (5.10.4
    and 5.25). Code that looks for the cache keyword (``past_key_values`` up to 5.2x, ``cache`` since) or the
    columns a forward takes now sees the model's own, plus ``token_weights`` and the other patched keywords."""
    import inspect

    model = tiny_model("llama").eval()
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    input_ids[1, :3] = model.config.pad_token_id  # left padding, no attention_mask given

    def scores():
        out = model.generate(
            input_ids=input_ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        return torch.stack(out.scores)

    stock, stock_parameters = scores(), list(inspect.signature(model.forward).parameters)
    apply_mrloss(model)
    parameters = list(inspect.signature(model.forward).parameters)
    assert [name for name in parameters if name in stock_parameters] == stock_parameters
    assert {"attention_mask", "position_ids", "labels", "token_weights", "num_items_in_batch"} <= set(parameters)
    torch.testing.assert_close(scores(), stock, rtol=0, atol=1e-6)


def test_lora_on_lm_head_is_a_clear_error():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head .*PEFT adapter"):
        apply_mrloss(model)


class DoubledLogitsLlama(transformers.LlamaForCausalLM):
    """A head its config does not describe: logits * 2."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_head_the_description_does_not_cover_and_unknown_options_are_clear_errors():
    model = DoubledLogitsLlama(tiny_model("llama").config)
    with pytest.raises(TypeError, match="cannot patch DoubledLogitsLlama.*does not compute logits = softcap"):
        apply_mrloss(model)
    with pytest.raises(TypeError, match="unknown loss option.*'reduction'"):
        apply_mrloss(tiny_model("llama"), reduction="sum")


def test_the_head_check_runs_on_meta_weights():
    """The patch-time check runs neither the decoder nor the real lm_head: a model on the meta device is checked."""
    config = tiny_model("granite").config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    apply_mrloss(model)
    with torch.device("meta"):
        doubled = DoubledLogitsLlama(tiny_model("llama").config)
    with pytest.raises(TypeError, match="does not compute logits"):
        apply_mrloss(doubled)


def test_logits_to_keep_without_labels_gives_the_stock_logits():
    model = tiny_model("llama")
    batch = random_batch()
    stock = model(input_ids=batch["input_ids"], logits_to_keep=1).logits
    apply_mrloss(model)
    patched = model(input_ids=batch["input_ids"], logits_to_keep=1).logits
    assert patched.shape == (2, 1, VOCAB)
    torch.testing.assert_close(patched, stock)


def test_shift_labels_are_used_unshifted():
    """shift_labels (index k: the target of position k, what sequence-parallel loaders send) with token_weights
    shifted alike give the loss of labels; token losses come back aligned with shift_labels."""
    model = apply_mrloss(tiny_model("llama"))
    batch = random_batch(seed=8)
    expected = model(**batch)
    shift_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shift_weights = torch.nn.functional.pad(batch["token_weights"][:, 1:], (0, 1))
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        shift_labels=shift_labels,
        token_weights=shift_weights,
    )
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.token_losses[:, :-1], expected.token_losses[:, 1:])


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


@pytest.mark.parametrize("count", [torch.tensor(23), torch.tensor(23.0), 23], ids=["int64", "float32", "int"])
def test_a_token_count_with_weights_warns_once_and_is_used_as_given(count):
    """A num_items_in_batch next to token_weights that is not a WeightSum is a token count (a stock Trainer's: int64
    before transformers 5.11, float32 since): used as the normalizer, with one warning per model; a WeightSum
    (MultiRegionTrainer's Σw) or no weights: no warning."""
    import warnings

    model = apply_mrloss(tiny_model("llama"))
    batch = random_batch(seed=4)
    expected = oracle(model, batch, normalizer=torch.tensor(23.0, dtype=torch.float64))[0]
    with pytest.warns(UserWarning, match="token count.*MultiRegionTrainer"):
        out = model(**batch, num_items_in_batch=count)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch, num_items_in_batch=count)  # warned once per model
        marked = apply_mrloss(tiny_model("llama"))(**batch, num_items_in_batch=weight_sum(torch.tensor(23.0)))
        torch.testing.assert_close(marked.loss.double(), expected, rtol=1e-5, atol=1e-6)
        unweighted = {key: value for key, value in batch.items() if key != "token_weights"}
        apply_mrloss(tiny_model("llama"))(**unweighted, num_items_in_batch=count)


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
    args = cpu_training_arguments(
        tmp_path, max_steps=1, per_device_train_batch_size=2, save_strategy="no", remove_unused_columns=False
    )
    trainer = transformers.Trainer(
        apply_mrloss(tiny_model("llama")),
        args,
        train_dataset=items,
        data_collator=lambda batch: model_inputs(collator(batch)),
    )
    with pytest.warns(UserWarning, match="token count"):
        trainer.train()


@pytest.mark.gpu
def test_labels_weights_and_normalizer_follow_the_hidden_states_device():
    """Inputs on the GPU, labels / token_weights / num_items_in_batch left on the CPU (as with a model split
    over devices, whose last hidden state is not where the batch is): same loss as all on the CPU."""
    model = tiny_model("llama")
    batch = random_batch(seed=6)
    normalizer = weight_sum(valid_weight_sum(batch["labels"], batch["token_weights"]).float() * 1.5)
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


def test_one_head_description_for_both_integrations():
    """hf and verl read the same description and option list (mrloss.integrations.heads)."""
    from mrloss.integrations import head_input, heads, hf

    assert hf.LOSS_OPTIONS is heads.LOSS_OPTIONS
    granite = tiny_model("granite")
    assert heads.describe_head(granite) == heads.Head(scale=1 / 2.5, softcap=None)
    assert head_input.check_head(granite, granite.forward, caller="t") == heads.Head(scale=1 / 2.5, softcap=None)
    gemma2 = tiny_model("gemma2")
    assert head_input.check_head(gemma2, gemma2.forward, 0.3, caller="t").softcap == 0.3


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


def test_a_partial_checkpoint_is_never_picked_on_resume(tmp_path, monkeypatch):
    """Before: a checkpoint cut short by a full disk was later picked by resume_from_checkpoint=true."""
    from transformers.trainer_utils import get_last_checkpoint

    from mrloss.data import MultiRegionDataset, train_bpe_tokenizer
    from mrloss.integrations.hf import MultiRegionTrainer

    texts = [f'Question {i}: <LEARN type="answer">the answer is {i}</LEARN>' for i in range(8)]
    tokenizer = train_bpe_tokenizer([parse({"text": t}).text for t in texts], vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    dataset = MultiRegionDataset.from_samples([{"text": t} for t in texts], tokenizer)
    model = tiny_causal_lm(
        len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    args = cpu_training_arguments(tmp_path, max_steps=4, save_steps=2, per_device_train_batch_size=4)
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


@pytest.mark.gpu
def test_hf_patch_on_cuda_with_the_default_backend(monkeypatch):
    """A tiny Llama from a transformers config, patched by apply_mrloss (backend "auto": Triton on CUDA):
    loss and gradients match the model's own logits + a float64 weighted CE (rtol 1e-4: fp32, TF32 off)."""
    from mrloss.integrations.hf import apply_mrloss

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    vocab = 1031
    model = tiny_causal_lm(
        vocab,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ).cuda()
    generator = torch.Generator("cuda").manual_seed(2)
    input_ids = torch.randint(3, vocab, (3, 57), generator=generator, device="cuda")
    token_weights = torch.rand(3, 57, generator=generator, device="cuda") * 2
    token_weights[torch.rand(3, 57, generator=generator, device="cuda") < 0.3] = 0.0
    labels = torch.where(token_weights > 0, input_ids, -100)
    logits = model(input_ids=input_ids).logits
    expected = reference_linear_cross_entropy(
        logits, torch.eye(vocab, dtype=torch.float64, device="cuda"), labels, token_weights, shift=True
    )
    params = [p for p in model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, params)

    out = apply_mrloss(model)(input_ids=input_ids, labels=labels, token_weights=token_weights)
    assert out.logits is None and out.loss.device.type == "cuda"
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out.loss, params), expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)


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
