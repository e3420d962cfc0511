"""mrloss inside verl 0.9.1's SFT trainer, checked against verl's own code on CPU.

- the dataset through verl's own ``create_sft_dataset`` and ``SFTTensorCollator`` (no_padding);
- the launcher's overrides composed with verl's real ``sft_trainer_engine`` config (hydra);
- the loss: verl's real ``FSDPEngineWithLMHead.forward_backward_batch`` (on CPU/gloo, without FSDP
  wrapping) with verl's ``sft_loss`` on logits vs our patched engine + ``mrloss_sft_loss``: same loss per
  micro-batch and same gradients on every rank, for SP=2 (Ulysses slicing and gather) and DP=2;
- the region tools in that engine: weighting-adjusted weights give verl's loss on the adjusted mask (same
  normalizer), the monitor's JSONL rows equal a hand count and the HF path's statistics of the same
  micro-batches, the weighting's update gets the per-type means over all data-parallel ranks.
"""

import functools
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="needs verl (the verl extra)")

MAX_LENGTH = 48
WEIGHTING = {
    "dynamic_weights": {"difficulty_scaling": True, "ema_decay": 0.0},
    "region_dependencies": {
        "learned_threshold": 0.0,
        "region_dependencies": {"methodology": {"requires": ["definition"], "penalty_factor": 0.5}},
    },
}
FIRST_STEP_MULTIPLIERS = {"concept": 1.0, "definition": 1.0, "methodology": 0.5}  # nothing learned yet
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
    return [
        str(paths["tag_based"]),
        str(write_samples(directory / "structured.json", structured)),
        str(write_samples(directory / "position_based.parquet", position)),
    ]


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
        "trainer:\n  per_device_batch_size: 2\n  gradient_accumulation_steps: 2\n  max_steps: 3\n"
        "weighting:\n  region_dependencies:\n    region_dependencies:\n      methodology: {requires: [definition]}\n"
    )
    return path


def test_import_mrloss_does_not_import_verl():
    code = (
        "import sys, mrloss, mrloss.parallel, mrloss.integrations.verl, mrloss.integrations.verl.dataset, "
        "mrloss.integrations.verl.engine, mrloss.integrations.verl.trainer, mrloss.integrations.verl.__main__; "
        "assert 'verl' not in sys.modules, 'verl imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_launcher_overrides_compose_with_verl_config(tmp_path, capsys):
    """Our overrides are valid for verl's own config; the tiny model + tokenizer saved for verl load with
    transformers; the dataset class is built by verl's own create_sft_dataset from that config and
    collated by verl's SFTTensorCollator."""
    from transformers import AutoConfig, AutoTokenizer
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    from mrloss.data import encode
    from mrloss.formats import parse
    from mrloss.integrations.verl.__main__ import main, prepare_model, verl_overrides
    from mrloss.integrations.verl.dataset import MultiRegionSFTDataset
    from mrloss.integrations.verl.trainer import mrloss_options
    from mrloss.training.config import load_config

    files = example_files(tmp_path)
    config_path = mrloss_config_file(tmp_path, files)
    ours = load_config(config_path)
    overrides = verl_overrides(
        ours, 4, str(tmp_path / "out dir"), ["engine.ulysses_sequence_parallel_size=2", "+mrloss.chunk_size=8"]
    )
    config = verl_config(overrides)
    assert config.trainer.default_local_dir == str(tmp_path / "out dir")
    prepare_model(ours, str(tmp_path / "out dir"))
    assert config.model.path == str(tmp_path / "out dir" / "initial_model")
    assert AutoConfig.from_pretrained(config.model.path).num_hidden_layers == 1
    model_tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    assert config.data.custom_cls.path == "pkg://mrloss.integrations.verl.dataset"
    assert config.data.train_batch_size == 2 * 2 * 2  # per device x accumulation x dp (4 ranks / sp 2)
    assert config.engine.ulysses_sequence_parallel_size == 2 and config.model.use_remove_padding
    assert mrloss_options(config) == {
        "loss": "mrloss",
        "backend": "torch",
        "chunk_size": 8,
        "softcap": None,
        "label_smoothing": 0.0,
        "memory": "fast",
        "z_loss_scale": 0.0,
        "monitor_dir": str((tmp_path / "out dir" / "monitor").resolve()),
        "weighting": {
            "dynamic_weights": None,
            "region_dependencies": {"region_dependencies": {"methodology": {"requires": ["definition"]}}},
        },
    }
    assert (
        main(
            [
                "--nproc",
                "2",
                "--config",
                str(config_path),
                "--save-path",
                str(tmp_path / "out"),
                "--dry-run",
                "trainer.learning_rate=0.01",
                "verl.trainer.logger=[console]",
            ]
        )
        == 0
    )
    command = capsys.readouterr().out
    assert "-m mrloss.integrations.verl.trainer" in command and "optim.lr=0.01" in command

    dataset = create_sft_dataset(config.data.train_files, config.data, model_tokenizer, None, max_samples=-1)
    reference = [
        encode(parse(record), model_tokenizer, max_length=MAX_LENGTH) for path in files for record in _raw_samples(path)
    ]
    assert len(dataset) == len(reference)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        assert set(item) == {"input_ids", "position_ids", "loss_mask", "region_type_ids"}
        assert item["loss_mask"].dtype == torch.float32 and item["loss_mask"][0] == 0
        assert item["input_ids"].tolist() == reference[index]["input_ids"]
        assert item["loss_mask"].tolist() == pytest.approx(reference[index]["token_weights"])
        assert item["position_ids"].tolist() == list(range(len(item["input_ids"])))
        encoding = reference[index]
        assert item["region_type_ids"].tolist() == [
            -1 if r < 0 else dataset.region_types.index(encoding["region_types"][r]) for r in encoding["region_ids"]
        ]
    batch = SFTTensorCollator("no_padding")([dataset[i] for i in range(3)])
    assert all(batch[key].is_nested for key in ("input_ids", "position_ids", "loss_mask", "region_type_ids"))
    assert torch.equal(batch["region_type_ids"].offsets(), batch["input_ids"].offsets())
    assert torch.equal(batch["loss_mask"].offsets(), batch["input_ids"].offsets())
    assert torch.equal(batch["loss_mask"].values(), torch.cat([dataset[i]["loss_mask"] for i in range(3)]))
    assert len(create_sft_dataset(files[0], config.data, model_tokenizer, None, max_samples=2)) == 2
    with pytest.raises(ValueError, match="no_padding"):
        MultiRegionSFTDataset(files[0], tokenizer(), {"pad_mode": "right"})
    assert config.data.extra_keys == "error"


def test_launcher_without_a_gpu_is_one_line_before_torchrun(tmp_path, capsys, monkeypatch):
    """Before (#23 tracebacks): on a machine without a GPU the launcher started torchrun, whose workers printed a
    wall of errors. Now it stops first: one line, exit 2, nothing written, nothing launched."""
    from mrloss.integrations.verl import __main__ as launcher

    monkeypatch.setattr(launcher, "accelerator_available", lambda: False)
    monkeypatch.setattr(launcher.subprocess, "call", lambda *a, **k: pytest.fail("torchrun must not start"))
    config_path = mrloss_config_file(tmp_path, example_files(tmp_path))
    save = tmp_path / "out"
    assert launcher.main(["--nproc", "1", "--config", str(config_path), "--save-path", str(save)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: verl's SFT trainer (its FSDP engine) needs a GPU (CUDA or NPU)") and err.count("\n") == 1
    )
    assert not save.exists()


def test_dataset_takes_verls_own_columns_as_metadata_and_extra_keys_from_the_config(tmp_path):
    from omegaconf import OmegaConf

    from mrloss.formats import FormatError
    from mrloss.integrations.verl.dataset import VERL_METADATA_KEYS, MultiRegionSFTDataset

    sample = {"text": "q <LEARN>a</LEARN>", **dict.fromkeys(VERL_METADATA_KEYS, "x")}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(sample) + "\n" + json.dumps({**sample, "score": 1}) + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match=f"sample {path}:2, field 'score': unknown key 'score'"):
        MultiRegionSFTDataset(str(path), tokenizer(), {})
    for extra_keys in ("keep", ["score"], OmegaConf.create({"k": ["score"]}).k):
        assert len(MultiRegionSFTDataset(str(path), tokenizer(), {"extra_keys": extra_keys})) == 2


def test_trainer_entry_runs_verl_hydra_main(monkeypatch, capsys):
    """``-m mrloss.integrations.verl.trainer`` is verl's own hydra main (config found, our block in it)."""
    from verl.trainer import sft_trainer

    from mrloss.integrations.verl import trainer

    # main() installs the wrapper; monkeypatch puts verl's method back afterwards
    monkeypatch.setattr(sft_trainer.SFTTrainer, "_build_engine", sft_trainer.SFTTrainer._build_engine)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "trainer",
            "data.train_files=[x.jsonl]",
            "+mrloss.loss=mrloss",
            "data.custom_cls.path=pkg://mrloss.integrations.verl.dataset",
            "--cfg",
            "job",
        ],
    )
    trainer.main()
    assert sft_trainer.SFTTrainer._build_engine.mrloss_installed
    output = capsys.readouterr().out
    assert "mrloss:\n  loss: mrloss" in output and "pkg://mrloss.integrations.verl.dataset" in output


def _raw_samples(path):
    from mrloss.data.records import read_records

    return [record.sample for record in read_records(path)]


def test_install_switches_the_trainer_loss(tmp_path, monkeypatch):
    """mrloss.loss=mrloss: SFTTrainer._build_engine installs our loss function and engine patches, and the
    region tools when mrloss.monitor_dir / mrloss.weighting ask for them (monitor on rank 0 only); fit()
    gives them the resumed step and epoch length, a fresh run restarts the stats file, and the weighting's
    state goes into every verl checkpoint and comes back on resume."""
    from omegaconf import OmegaConf
    from verl.trainer import sft_trainer

    from mrloss.integrations.verl import trainer
    from mrloss.integrations.verl.engine import mrloss_sft_loss

    class FakeClient:
        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

    def fake_build_engine(self):
        self.training_client = FakeClient()
        self.engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(use_fused_kernels=False),
            _build_module=None,
            prepare_model_inputs=None,
            forward_backward_batch=None,
        )

    def fake_fit(self):
        self.ckpt_handler.save_checkpoint(self.resume_global_step + 3)

    # install() wraps both methods; monkeypatch puts verl's back afterwards
    monkeypatch.setattr(sft_trainer.SFTTrainer, "_build_engine", fake_build_engine)
    monkeypatch.setattr(sft_trainer.SFTTrainer, "fit", fake_fit)
    trainer.install()
    for block, expected in ((None, None), ({"loss": "verl"}, None), ({"loss": "mrloss"}, mrloss_sft_loss)):
        fake = types.SimpleNamespace(config=OmegaConf.create({} if block is None else {"mrloss": block}))
        sft_trainer.SFTTrainer._build_engine(fake)
        installed = getattr(fake.training_client, "loss_fn", None)
        assert (installed.func if installed else None) is expected
        assert getattr(fake, "mrloss_region_tools", None) is None
    with pytest.raises(ValueError, match="mrloss.loss"):
        bad = types.SimpleNamespace(config=OmegaConf.create({"mrloss": {"loss": "x"}}))
        sft_trainer.SFTTrainer._build_engine(bad)
    with pytest.raises(ValueError, match="need mrloss.loss=mrloss"):
        bad = types.SimpleNamespace(config=OmegaConf.create({"mrloss": {"loss": "verl", "monitor_dir": "x"}}))
        sft_trainer.SFTTrainer._build_engine(bad)

    def fake_trainer(rank, resume_global_step=0):
        block = {"loss": "mrloss", "monitor_dir": str(tmp_path / "monitor"), "weighting": json.dumps(WEIGHTING)}
        fake = types.SimpleNamespace(
            rank=rank,
            resume_global_step=resume_global_step,
            steps_per_epoch=5,
            config=OmegaConf.create({"mrloss": block, "trainer": {"default_local_dir": str(tmp_path)}}),
            train_dataset=types.SimpleNamespace(region_types=list(FIRST_STEP_MULTIPLIERS)),
            ckpt_handler=types.SimpleNamespace(save_checkpoint=lambda step: (tmp_path / f"global_step_{step}").mkdir()),
        )
        sft_trainer.SFTTrainer._build_engine(fake)
        return fake

    assert fake_trainer(rank=1).mrloss_region_tools.monitor is None
    fresh = fake_trainer(rank=0)
    tools = fresh.mrloss_region_tools
    assert tools.monitor.stats_path == tmp_path / "monitor" / "region_stats.jsonl"
    assert tools.weighting.dynamic_weights.difficulty_scaling and tools.weighting.region_dependencies is not None
    tools.monitor.stats_path.parent.mkdir()
    tools.monitor.stats_path.write_text("{}\n")
    tools.weighting.update({"concept": 2.0, "definition": 0.5})
    sft_trainer.SFTTrainer.fit(fresh)  # saves global_step_3
    assert not tools.monitor.stats_path.exists()
    assert (tools.step, tools.steps_per_epoch) == (0, 5)
    resumed = fake_trainer(rank=0, resume_global_step=3)
    resumed.mrloss_region_tools.monitor.stats_path.write_text("{}\n")
    sft_trainer.SFTTrainer.fit(resumed)
    resumed_tools = resumed.mrloss_region_tools
    assert resumed_tools.monitor.stats_path.exists() and resumed_tools.step == 3
    assert resumed_tools.weighting.state_dict() == tools.weighting.state_dict()
    assert resumed_tools.epoch == 1 and (setattr(resumed_tools, "step", 6) or resumed_tools.epoch == 2)


def tiny_model(vocab_size, context_free=False):
    """A tiny Llama; ``context_free``: attention output zeroed, so each token's loss depends on that token
    only (on CPU the eager attention of an SP shard sees only the shard: no Ulysses all-to-all without
    flash-attn, which verl's patch needs, so shard-local context differs from the HF path's)."""
    model = tiny_causal_lm(vocab_size, num_hidden_layers=1, tie_word_embeddings=False, attn_implementation="eager")
    if context_free:
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model


def make_engine(model, sp_size):
    """A real verl FSDPEngineWithLMHead whose methods run on CPU: attributes set by hand, no FSDP wrap."""
    from torch.distributed.device_mesh import init_device_mesh
    from verl.workers.engine.fsdp import transformer_impl

    engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
    engine.ulysses_sequence_parallel_size = sp_size
    engine.use_ulysses_sp = sp_size > 1
    engine.ulysses_device_mesh = engine.ulysses_parallel_group = None
    if sp_size > 1:
        engine.ulysses_device_mesh = init_device_mesh(
            "cpu", (dist.get_world_size() // sp_size, sp_size), mesh_dim_names=["dp", "sp"]
        )
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

    meta = {
        "use_remove_padding": True,
        "use_dynamic_bsz": False,
        "max_token_len_per_gpu": 4096,
        "micro_batch_size_per_gpu": 2,
        "temperature": 1.0,
        "global_batch_size": len(items),
        "pad_mode": "no_padding",
        "pad_token_id": 1,
        "use_fused_kernels": False,
    }
    data = tu.get_tensordict(tensor_dict=SFTTensorCollator("no_padding")(items), non_tensor_dict=meta)
    engine.module.zero_grad()
    set_ulysses_sequence_parallel_group(engine.ulysses_parallel_group)
    try:
        output = engine.forward_backward_batch(data, loss_function=loss_function)
    finally:
        set_ulysses_sequence_parallel_group(None)
    return output["loss"], {name: p.grad.clone() for name, p in engine.module.named_parameters()}


def adjusted_items(items, region_types, multipliers):
    """``items`` with ``loss_mask`` multiplied by the region type multipliers (what the weighting does)."""
    from mrloss.weighting.common import apply_type_multipliers

    return [
        {
            **item,
            "loss_mask": apply_type_multipliers(item["loss_mask"], item["region_type_ids"], region_types, multipliers),
        }
        for item in items
    ]


def check_region_tools(rank, sp_size, local_items, vocab_size, region_types, output_dir):
    """One training step of the patched engine with the weighting and (rank 0) the monitor: same loss and
    gradients as verl's sft_loss on the adjusted loss_mask; writes rank 0's weighting state for the test."""
    from verl.workers.utils.losses import sft_loss

    from mrloss.debug import MultiRegionTrainingMonitor
    from mrloss.integrations.verl.engine import mrloss_sft_loss, patch_engine
    from mrloss.integrations.verl.region_tools import EngineRegionTools
    from mrloss.weighting import RegionWeighting

    where = f"region tools sp={sp_size} rank={rank}"
    engine = make_engine(tiny_model(vocab_size, context_free=True), sp_size)
    engine.module = engine._build_module()
    verl_losses, verl_grads = run_engine(
        engine,
        adjusted_items(local_items, region_types, FIRST_STEP_MULTIPLIERS),
        functools.partial(sft_loss, config=None),
    )
    monitor = MultiRegionTrainingMonitor(output_dir, region_types) if rank == 0 else None
    tools = EngineRegionTools(region_types, weighting=RegionWeighting.from_config(WEIGHTING), monitor=monitor)
    engine = patch_engine(
        make_engine(tiny_model(vocab_size, context_free=True), sp_size), {"backend": "torch", "chunk_size": 16}, tools
    )
    engine.module = engine._build_module()
    ours_losses, ours_grads = run_engine(engine, local_items, functools.partial(mrloss_sft_loss, config=None))
    assert tools.step == 1 and tools.weighting.multipliers() == FIRST_STEP_MULTIPLIERS, where
    torch.testing.assert_close(
        torch.tensor(ours_losses), torch.tensor(verl_losses), atol=1e-5, rtol=1e-5, msg=lambda m: f"{where} loss: {m}"
    )
    for name, grad in verl_grads.items():
        torch.testing.assert_close(
            ours_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{where} grad {name}: {m}"
        )
    if rank == 0:
        with open(f"{output_dir}/ema.json", "w") as handle:
            json.dump(tools.weighting.dynamic_weights.ema.values, handle)


def check_fsdp2(sp_size, local_items, vocab_size, verl_losses, verl_grads, *, reshard_after_forward):
    """The patched engine on a model wrapped by verl's own ``apply_fsdp2`` (fully_shard on each decoder layer,
    then the root, over every rank; fp32 MixedPrecisionPolicy with cast_forward_inputs, as verl's fsdp2 strategy):
    the same per micro-batch losses, and full gradients equal to the mean over ranks of verl's unwrapped
    per-rank gradients (what FSDP's reduction gives verl's own loss); fp32, atol 1e-5 / rtol 1e-4."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor
    from verl.utils.fsdp_utils import apply_fsdp2

    from mrloss.integrations.verl.engine import mrloss_sft_loss, patch_engine

    model = tiny_model(vocab_size)
    fsdp_kwargs = {
        "mesh": init_device_mesh("cpu", (dist.get_world_size(),)),
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True
        ),
        "reshard_after_forward": reshard_after_forward,
    }
    apply_fsdp2(model, fsdp_kwargs, {})
    engine = patch_engine(make_engine(model, sp_size), {"backend": "torch", "chunk_size": 16})
    engine.module = engine._build_module()
    losses, grads = run_engine(engine, local_items, functools.partial(mrloss_sft_loss, config=None))
    where = f"fsdp2 sp={sp_size} reshard_after_forward={reshard_after_forward} rank={dist.get_rank()}"
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(verl_losses), atol=1e-5, rtol=1e-5, msg=lambda m: f"{where} loss: {m}"
    )
    for name, grad in verl_grads.items():
        mean = grad.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        ours = grads[name].full_tensor() if isinstance(grads[name], DTensor) else grads[name]
        torch.testing.assert_close(ours, mean, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{where} {name}: {m}")


def engine_worker(rank, world_size, store_path, items, vocab_size, region_types, output_dir):
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
            engine = patch_engine(make_engine(tiny_model(vocab_size), sp_size), {"backend": "torch", "chunk_size": 16})
            engine.module = engine._build_module()
            ours_losses, ours_grads = run_engine(engine, local_items, functools.partial(mrloss_sft_loss, config=None))
            where = f"sp={sp_size} dp={dp_size} rank={rank}"
            assert len(ours_losses) == len(verl_losses) == len(local_items) // 2, where  # micro-batches of 2
            torch.testing.assert_close(
                torch.tensor(ours_losses),
                torch.tensor(verl_losses),
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m: f"{where} loss: {m}",
            )
            for name, grad in verl_grads.items():
                torch.testing.assert_close(
                    ours_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{where} grad {name}: {m}"
                )
            check_region_tools(rank, sp_size, local_items, vocab_size, region_types, f"{output_dir}/sp{sp_size}")
            check_fsdp2(sp_size, local_items, vocab_size, verl_losses, verl_grads, reshard_after_forward=sp_size == 2)
        dist.barrier()  # no rank tears gloo down while a peer still talks (an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mrloss_engine_matches_verl_sft_loss(tmp_path):
    """Per micro-batch loss and per-rank gradients of our patched engine equal verl's logits + sft_loss,
    with Ulysses SP=2 (verl slices and gathers over gloo) and with DP=2; with the region tools, the
    monitor's rows (rank 0: its dp rank's micro-batches of 2) equal a hand count and the statistics of the HF
    path (`apply_mrloss` token losses -> `MultiRegionTrainingMonitor`) for the same micro-batches, and the
    weighting's EMA (decay 0) holds the per-type mean losses over all 8 samples (all dp ranks)."""
    from mrloss.data import MultiRegionCollator
    from mrloss.debug import MultiRegionTrainingMonitor
    from mrloss.debug.plot import find_stats_file, per_step_series
    from mrloss.integrations.hf import apply_mrloss, model_inputs
    from mrloss.integrations.verl.dataset import MultiRegionSFTDataset

    files = example_files(tmp_path)
    dataset = MultiRegionSFTDataset(files[:1], tokenizer(), {"max_length": MAX_LENGTH, "truncation": "right"})
    items = [dataset[i] for i in (0, 1, 4, 5, 10, 21, 8, 9)]  # learned tokens of every type on both dp ranks
    types = dataset.region_types
    assert set(types) == set(FIRST_STEP_MULTIPLIERS)
    mp.spawn(
        engine_worker,
        args=(2, str(tmp_path / "store"), items, len(tokenizer()), types, str(tmp_path)),
        nprocs=2,
        join=True,
    )

    hf_model = apply_mrloss(tiny_model(len(tokenizer()), context_free=True), backend="torch")
    collator, hf_monitor = MultiRegionCollator(pad_token_id=0), MultiRegionTrainingMonitor(None, types)
    adjusted = adjusted_items(items, types, FIRST_STEP_MULTIPLIERS)

    def hf_record(micro_items):
        batch = collator(
            [
                {
                    "input_ids": item["input_ids"],
                    "token_weights": item["loss_mask"],
                    "region_type_ids": item["region_type_ids"],
                }
                for item in micro_items
            ]
        )
        with torch.no_grad():
            token_losses = hf_model(**model_inputs(batch)).token_losses
        return hf_monitor.log_batch_stats(batch, 1, token_losses, multipliers=FIRST_STEP_MULTIPLIERS)

    loss_sums = {name: [0.0, 0] for name in types}
    for record in (hf_record(adjusted[i : i + 2]) for i in range(0, 8, 2)):
        for name in types:
            stats = record["regions"][name]
            if stats["learned_tokens"]:
                loss_sums[name][0] += stats["mean_loss"] * stats["learned_tokens"]
                loss_sums[name][1] += stats["learned_tokens"]
    expected_ema = {name: total / count for name, (total, count) in loss_sums.items()}
    for sp_size, rank0_items in ((2, adjusted), (1, adjusted[0::2])):
        rows = [
            json.loads(line) for line in (tmp_path / f"sp{sp_size}" / "region_stats.jsonl").read_text().splitlines()
        ]
        assert len(rows) == len(rank0_items) // 2, sp_size
        for row, start in zip(rows, range(0, len(rank0_items), 2)):
            micro_items = rank0_items[start : start + 2]
            assert row["step"] == 1 and row["multipliers"] == FIRST_STEP_MULTIPLIERS
            type_ids = torch.cat([item["region_type_ids"] for item in micro_items])
            weights = torch.cat([item["loss_mask"] for item in micro_items])
            for index, name in enumerate(types):  # hand count
                in_type = type_ids == index
                assert row["regions"][name]["tokens"] == int(in_type.sum())
                assert row["regions"][name]["learned_tokens"] == int((in_type & (weights > 0)).sum())
                assert row["regions"][name]["weight_sum"] == pytest.approx(float(weights[in_type].sum()), rel=1e-6)
            expected = hf_record(micro_items)
            for name, stats in [*expected["regions"].items(), ("total", expected["total"])]:
                got = row["total"] if name == "total" else row["regions"][name]
                assert {key for key, value in got.items() if value is None} == {
                    key for key, value in stats.items() if value is None
                }, (sp_size, start, name)
                assert {key: value for key, value in got.items() if value is not None} == pytest.approx(
                    {key: value for key, value in stats.items() if value is not None}, rel=1e-5, abs=1e-7
                ), (sp_size, start, name)
        series = per_step_series(find_stats_file(tmp_path / f"sp{sp_size}"))  # what `mrloss plot` draws
        assert series["steps"] == [1] and series["multipliers"]["methodology"] == [0.5]
        ema = json.loads((tmp_path / f"sp{sp_size}" / "ema.json").read_text())
        assert ema == pytest.approx(expected_ema, rel=1e-5), sp_size


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("granite", {"logits_scaling": 2.5}),
        ("cohere", {"logit_scale": 0.37}),
        ("gemma2", {"final_logit_softcapping": 0.7}),
        ("llama", {}),
    ],
)
def test_patched_forward_applies_the_architecture_head(model_type, extra):
    """verl's patched forward (one shard, no SP) gives the loss of the model's own logits -- Granite's
    logits_scaling, Cohere's logit_scale, Gemma2's softcap -- from the same head description as the HF patch."""
    from mrloss.integrations.verl.engine import ShardBatch, patch_causal_lm_forward
    from mrloss.ops.reference import reference_linear_cross_entropy
    from mrloss.parallel import shift_targets

    vocab = 61
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tiny_causal_lm(
        vocab, model_type, num_hidden_layers=1, head_dim=8, attn_implementation="eager", **special, **extra
    )
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, vocab, (17,), generator=g)
    weights = torch.rand(17, generator=g) * 2
    weights[0] = 0.0
    with torch.no_grad():
        logits = model(input_ids=input_ids[None]).logits[0]
    expected = reference_linear_cross_entropy(
        logits, torch.eye(vocab, dtype=torch.float64), input_ids, weights, shift=True
    )
    targets, shifted_weights = shift_targets(input_ids, weights)
    patch_causal_lm_forward(model, {"backend": "torch"})
    with torch.no_grad():
        loss = model(
            input_ids=input_ids[None],
            position_ids=torch.arange(17)[None],
            mrloss_shard=ShardBatch(targets, shifted_weights, None, None),
        ).loss
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_patched_forward_rejects_unknown_heads_and_options():
    from transformers import TrOCRConfig, TrOCRForCausalLM

    from mrloss.integrations.verl.engine import patch_causal_lm_forward

    trocr = TrOCRForCausalLM(TrOCRConfig(vocab_size=50, d_model=16, decoder_layers=1, decoder_attention_heads=2))
    with pytest.raises(TypeError, match="cannot patch TrOCRForCausalLM.*not the mean cross-entropy of the labels"):
        patch_causal_lm_forward(trocr)  # its own loss does not shift the labels
    with pytest.raises(TypeError, match="unknown loss option.*'reduction'"):
        patch_causal_lm_forward(tiny_model(50), {"reduction": "sum"})
