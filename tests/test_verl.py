"""mrloss inside verl 0.9.1's SFT trainer, checked against verl's own code on CPU.

- the dataset through verl's own ``create_sft_dataset`` and ``SFTTensorCollator`` (no_padding);
- the launcher's overrides composed with verl's real ``sft_trainer_engine`` config (hydra);
- the loss: verl's real ``FSDPEngineWithLMHead.forward_backward_batch`` (on CPU/gloo, without FSDP
  wrapping) with verl's ``sft_loss`` on logits vs our patched engine + ``mrloss_sft_loss``: same loss per
  micro-batch and same gradients on every rank, for SP=2 (Ulysses slicing and gather) and DP=2.
"""
import functools
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="needs verl (the verl extra)")

MAX_LENGTH = 48
ROOT = str(Path(__file__).resolve().parents[1])


@functools.cache
def tokenizer():
    from mrloss.data.examples import EXAMPLES
    from mrloss.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([sample["text"] for sample in EXAMPLES], vocab_size=300)


def example_files(directory):
    """The shipped examples in the three formats, as JSONL, JSON and Parquet."""
    from mrloss.data.examples import write_examples
    from mrloss.data.records import read_records, write_samples

    paths = write_examples(directory)
    structured = [record.sample for record in read_records(paths["structured"])]
    position = [record.sample for record in read_records(paths["position_based"])]
    return [str(paths["tag_based"]), str(write_samples(directory / "structured.json", structured)),
            str(write_samples(directory / "position_based.parquet", position))]


def verl_config(overrides=()):
    """verl's real SFT trainer config (``verl/trainer/config/sft_trainer_engine.yaml``) with overrides."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="sft_trainer_engine", overrides=list(overrides))


def mrloss_config_file(directory, files):
    """An mrloss config with the tiny default model (model.path null)."""
    path = directory / "config.yaml"
    path.write_text(
        "data:\n  train_files: [" + ", ".join(files) + f"]\n  max_length: {MAX_LENGTH}\n  truncation: right\n"
        "model:\n  hidden_size: 16\n  num_layers: 1\n  vocab_size: 300\nloss:\n  backend: torch\n  chunk_size: 16\n"
        "trainer:\n  per_device_batch_size: 2\n  gradient_accumulation_steps: 2\n  max_steps: 3\n")
    return path


def test_import_mrloss_does_not_import_verl():
    code = ("import sys, mrloss, mrloss.parallel, mrloss.integrations.verl, mrloss.integrations.verl.dataset, "
            "mrloss.integrations.verl.engine, mrloss.integrations.verl.trainer, mrloss.integrations.verl.__main__; "
            "assert 'verl' not in sys.modules, 'verl imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_launcher_overrides_compose_with_verl_config(tmp_path, capsys):
    """Our overrides are valid for verl's own config; the tiny model + tokenizer saved for verl load with
    transformers; the dataset class is built by verl's own create_sft_dataset from that config and
    collated by verl's SFTTensorCollator."""
    from transformers import AutoConfig, AutoTokenizer
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    from mrloss.config import load_config
    from mrloss.data import encode
    from mrloss.formats import parse
    from mrloss.integrations.verl.__main__ import main, prepare_model, verl_overrides
    from mrloss.integrations.verl.dataset import MultiRegionSFTDataset
    from mrloss.integrations.verl.trainer import mrloss_options

    files = example_files(tmp_path)
    config_path = mrloss_config_file(tmp_path, files)
    ours = load_config(config_path)
    overrides = verl_overrides(ours, 4, str(tmp_path / "out dir"),
                               ["engine.ulysses_sequence_parallel_size=2", "+mrloss.chunk_size=8"])
    config = verl_config(overrides)
    assert config.trainer.default_local_dir == str(tmp_path / "out dir")
    prepare_model(ours, str(tmp_path / "out dir"))
    assert config.model.path == str(tmp_path / "out dir" / "initial_model")
    assert AutoConfig.from_pretrained(config.model.path).num_hidden_layers == 1
    model_tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    assert config.data.custom_cls.path == "pkg://mrloss.integrations.verl.dataset"
    assert config.data.train_batch_size == 2 * 2 * 2  # per device x accumulation x dp (4 ranks / sp 2)
    assert config.engine.ulysses_sequence_parallel_size == 2 and config.model.use_remove_padding
    assert mrloss_options(config) == {"loss": "mrloss", "backend": "torch", "chunk_size": 8, "softcap": None,
                                      "label_smoothing": 0.0}
    assert main(["--nproc", "2", "--config", str(config_path), "--save-path", str(tmp_path / "out"), "--dry-run",
                 "trainer.learning_rate=0.01", "verl.trainer.logger=[console]"]) == 0
    command = capsys.readouterr().out
    assert "-m mrloss.integrations.verl.trainer" in command and "optim.lr=0.01" in command

    dataset = create_sft_dataset(config.data.train_files, config.data, model_tokenizer, None, max_samples=-1)
    reference = [encode(parse(record), model_tokenizer, max_length=MAX_LENGTH)
                 for path in files for record in _raw_samples(path)]
    assert len(dataset) == len(reference)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        assert set(item) == {"input_ids", "position_ids", "loss_mask"}
        assert item["loss_mask"].dtype == torch.float32 and item["loss_mask"][0] == 0
        assert item["input_ids"].tolist() == reference[index]["input_ids"]
        assert item["loss_mask"].tolist() == pytest.approx(reference[index]["token_weights"])
        assert item["position_ids"].tolist() == list(range(len(item["input_ids"])))
    batch = SFTTensorCollator("no_padding")([dataset[i] for i in range(3)])
    assert all(batch[key].is_nested for key in ("input_ids", "position_ids", "loss_mask"))
    assert torch.equal(batch["loss_mask"].offsets(), batch["input_ids"].offsets())
    assert torch.equal(batch["loss_mask"].values(), torch.cat([dataset[i]["loss_mask"] for i in range(3)]))
    assert len(create_sft_dataset(files[0], config.data, model_tokenizer, None, max_samples=2)) == 2
    with pytest.raises(ValueError, match="no_padding"):
        MultiRegionSFTDataset(files[0], tokenizer(), {"pad_mode": "right"})


def test_trainer_entry_runs_verl_hydra_main(monkeypatch, capsys):
    """``-m mrloss.integrations.verl.trainer`` is verl's own hydra main (config found, our block in it)."""
    from verl.trainer import sft_trainer

    from mrloss.integrations.verl import trainer

    # main() installs the wrapper; monkeypatch puts verl's method back afterwards
    monkeypatch.setattr(sft_trainer.SFTTrainer, "_build_engine", sft_trainer.SFTTrainer._build_engine)
    monkeypatch.setattr(sys, "argv", ["trainer", "data.train_files=[x.jsonl]", "+mrloss.loss=mrloss",
                                      "data.custom_cls.path=pkg://mrloss.integrations.verl.dataset", "--cfg", "job"])
    trainer.main()
    assert sft_trainer.SFTTrainer._build_engine.mrloss_installed
    output = capsys.readouterr().out
    assert "mrloss:\n  loss: mrloss" in output and "pkg://mrloss.integrations.verl.dataset" in output


def _raw_samples(path):
    from mrloss.data.records import read_records

    return [record.sample for record in read_records(path)]


def test_install_switches_the_trainer_loss():
    """mrloss.loss=mrloss: SFTTrainer._build_engine installs our loss function and engine patches."""
    from omegaconf import OmegaConf
    from verl.trainer import sft_trainer

    from mrloss.integrations.verl import trainer
    from mrloss.integrations.verl.engine import mrloss_sft_loss

    class FakeClient:
        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

    def fake_build_engine(self):
        self.training_client = FakeClient()
        self.engine = types.SimpleNamespace(model_config=types.SimpleNamespace(use_fused_kernels=False),
                                            _build_module=None, prepare_model_inputs=None)

    original = sft_trainer.SFTTrainer._build_engine
    sft_trainer.SFTTrainer._build_engine = fake_build_engine
    try:
        trainer.install()
        for block, expected in ((None, None), ({"loss": "verl"}, None), ({"loss": "mrloss"}, mrloss_sft_loss)):
            fake = types.SimpleNamespace(config=OmegaConf.create({} if block is None else {"mrloss": block}))
            sft_trainer.SFTTrainer._build_engine(fake)
            installed = getattr(fake.training_client, "loss_fn", None)
            assert (installed.func if installed else None) is expected
        with pytest.raises(ValueError, match="mrloss.loss"):
            bad = types.SimpleNamespace(config=OmegaConf.create({"mrloss": {"loss": "x"}}))
            sft_trainer.SFTTrainer._build_engine(bad)
    finally:
        sft_trainer.SFTTrainer._build_engine = original


def tiny_model(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).float()


def make_engine(model, sp_size):
    """A real verl FSDPEngineWithLMHead whose methods run on CPU: attributes set by hand, no FSDP wrap."""
    from torch.distributed.device_mesh import init_device_mesh
    from verl.workers.engine.fsdp import transformer_impl

    engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
    engine.ulysses_sequence_parallel_size = sp_size
    engine.use_ulysses_sp = sp_size > 1
    engine.ulysses_device_mesh = engine.ulysses_parallel_group = None
    if sp_size > 1:
        engine.ulysses_device_mesh = init_device_mesh("cpu", (dist.get_world_size() // sp_size, sp_size),
                                                      mesh_dim_names=["dp", "sp"])
        engine.ulysses_parallel_group = engine.ulysses_device_mesh["sp"].get_group()
    engine.pad_to_length, engine.pad_to_length_bucket = False, 1024
    engine._autocast_dtype, engine.scaler = torch.float32, None
    engine.engine_config = types.SimpleNamespace(use_no_sync_for_gradient_accumulation=False)
    engine.model_config = types.SimpleNamespace(use_fused_kernels=False)
    engine._build_module = lambda: model
    return engine


def run_engine(engine, items, loss_function):
    """One train_batch of verl's engine on ``items`` (the same meta data as SFTTrainer.fit sends)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import SFTTensorCollator
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    meta = {"use_remove_padding": True, "use_dynamic_bsz": False, "max_token_len_per_gpu": 4096,
            "micro_batch_size_per_gpu": 2, "temperature": 1.0, "global_batch_size": len(items),
            "pad_mode": "no_padding", "pad_token_id": 1, "use_fused_kernels": False}
    data = tu.get_tensordict(tensor_dict=SFTTensorCollator("no_padding")(items), non_tensor_dict=meta)
    engine.module.zero_grad()
    set_ulysses_sequence_parallel_group(engine.ulysses_parallel_group)
    try:
        output = engine.forward_backward_batch(data, loss_function=loss_function)
    finally:
        set_ulysses_sequence_parallel_group(None)
    return output["loss"], {name: p.grad.clone() for name, p in engine.module.named_parameters()}


def engine_worker(rank, world_size, store_path, items, vocab_size):
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.utils.losses import sft_loss

    from mrloss.integrations.verl.engine import mrloss_sft_loss, patch_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    transformer_impl.get_device_id = transformer_impl.get_device_name = lambda: "cpu"
    try:
        for sp_size in (2, 1):
            dp_rank, dp_size = rank // sp_size, world_size // sp_size
            local_items = items[dp_rank::dp_size]  # each dp rank its samples; SP ranks share them
            engine = make_engine(tiny_model(vocab_size), sp_size)
            engine.module = engine._build_module()
            verl_losses, verl_grads = run_engine(engine, local_items, functools.partial(sft_loss, config=None))
            engine = patch_engine(make_engine(tiny_model(vocab_size), sp_size),
                                  {"backend": "torch", "chunk_size": 16})
            engine.module = engine._build_module()
            ours_losses, ours_grads = run_engine(engine, local_items, functools.partial(mrloss_sft_loss, config=None))
            where = f"sp={sp_size} dp={dp_size} rank={rank}"
            assert len(ours_losses) == len(verl_losses) == len(local_items) // 2, where  # micro-batches of 2
            torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(verl_losses), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{where} loss: {m}")
            for name, grad in verl_grads.items():
                torch.testing.assert_close(ours_grads[name], grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, name=name: f"{where} grad {name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mrloss_engine_matches_verl_sft_loss(tmp_path):
    """Per micro-batch loss and per-rank gradients of our patched engine equal verl's logits + sft_loss,
    with Ulysses SP=2 (verl slices and gathers over gloo) and with DP=2."""
    from mrloss.integrations.verl.dataset import MultiRegionSFTDataset

    files = example_files(tmp_path)
    dataset = MultiRegionSFTDataset(files[:1], tokenizer(), {"max_length": MAX_LENGTH, "truncation": "right"})
    items = [dataset[i] for i in range(8)]
    mp.spawn(engine_worker, args=(2, str(tmp_path / "store"), items, len(tokenizer())), nprocs=2, join=True)
