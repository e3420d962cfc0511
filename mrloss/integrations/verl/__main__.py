"""``python -m mrloss.integrations.verl --nproc N --config CONFIG --save-path DIR [overrides...]``

Builds verl's SFT launch from an mrloss YAML config and runs it:
``torchrun --standalone --nproc_per_node=N -m mrloss.integrations.verl.trainer <verl overrides>``
(verl's ``sft_trainer.main`` with our dataset class and loss). Overrides ``key.sub=value`` change the mrloss
config; ``verl.key.sub=value`` goes to verl verbatim (without the ``verl.`` prefix, replacing a generated
override of the same key), e.g. ``verl.engine.ulysses_sequence_parallel_size=2``. ``--dry-run`` prints
the command instead of running it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

DATASET_PATH = "pkg://mrloss.integrations.verl.dataset"
DATASET_NAME = "MultiRegionSFTDataset"


def _hydra_string(value) -> str:
    """A string as a hydra override value: bare when hydra's grammar allows it, else single-quoted."""
    text = str(value)
    if re.fullmatch(r"[\w./\-+:@~%]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_list(values) -> str:
    return "[" + ",".join(_hydra_string(value) for value in values) + "]"


def _hydra_value(value) -> str:
    """None, a bool, a number or a string as a hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _hydra_string(value) if isinstance(value, str) else str(value)


def initial_model_path(config, save_path: str) -> Path:
    """``model.path``, or where `prepare_model` saves the tiny model of a config whose model.path is null."""
    return Path(config.model.path if config.model.path is not None else Path(save_path) / "initial_model")


def prepare_model(config, save_path: str) -> None:
    """What verl needs on disk before it starts: the data files (``data.write_examples``) and, when
    ``model.path`` is null, the tiny model + BPE tokenizer that `mrloss train` would build, saved to
    ``initial_model_path``. Reuses `mrloss.training.build`'s builders."""
    from mrloss.training.build import build_model, build_tokenizer, ensure_data_files

    ensure_data_files(config.data)
    if config.model.path is not None:
        return
    config.trainer.output_dir = str(save_path)  # build_tokenizer keeps its trained tokenizer there
    tokenizer = build_tokenizer(config, None, is_main=True)
    model = build_model(config.model, tokenizer, max_length=config.data.max_length, seed=config.trainer.seed)
    directory = initial_model_path(config, save_path)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _mrloss_overrides(config, save_path: str) -> dict[str, str]:
    """The ``+mrloss.*`` block: the mrloss loss with the config's loss options (one override per field of its
    ``loss`` section), the monitor's directory and the weighting."""
    weighting = config.weighting
    return {
        "+mrloss.loss": "mrloss",
        **{f"+mrloss.{name}": _hydra_value(value) for name, value in dataclasses.asdict(config.loss).items()},
        "+mrloss.monitor_dir": _hydra_string(Path(config.monitor.output_dir or Path(save_path) / "monitor").resolve())
        if config.monitor.enabled
        else "null",
        "+mrloss.weighting": _hydra_string(json.dumps(dataclasses.asdict(weighting)))
        if weighting.dynamic_weights is not None or weighting.region_dependencies is not None
        else "null",
    }


def verl_overrides(config, nproc: int, save_path: str, verl_extra: list[str] = ()) -> list[str]:
    """verl hydra overrides for an mrloss `Config`; ``verl_extra`` (``key=value``) replace same-key ones."""
    if config.trainer.device == "cpu":
        raise ValueError("config trainer.device: verl's FSDP engine needs a GPU (cuda or npu), got cpu")
    extra = dict(item.partition("=")[::2] for item in verl_extra)
    sp_size = int(extra.get("engine.ulysses_sequence_parallel_size", 1))
    if nproc % sp_size:
        raise ValueError(f"--nproc {nproc} is not a multiple of engine.ulysses_sequence_parallel_size {sp_size}")
    trainer, data = config.trainer, config.data
    resume = trainer.resume_from_checkpoint
    generated = {
        "data.train_files": _hydra_list(Path(p).resolve() for p in data.train_files),
        "data.val_files": _hydra_list(Path(p).resolve() for p in data.val_files) if data.val_files else "null",
        "data.custom_cls.path": DATASET_PATH,
        "data.custom_cls.name": DATASET_NAME,
        "data.pad_mode": "no_padding",
        "data.max_length": _hydra_value(data.max_length),
        "data.truncation": data.truncation,
        "+data.format": data.format,
        "+data.extra_keys": data.extra_keys if isinstance(data.extra_keys, str) else _hydra_list(data.extra_keys),
        "+data.add_eos": _hydra_value(data.add_eos),
        "data.use_dynamic_bsz": "false",
        "data.micro_batch_size_per_gpu": str(trainer.per_device_batch_size),
        "data.train_batch_size": str(
            trainer.per_device_batch_size * trainer.gradient_accumulation_steps * (nproc // sp_size)
        ),
        "data.num_workers": str(trainer.dataloader_num_workers),
        "model.path": _hydra_string(initial_model_path(config, save_path).resolve()),
        "model.use_remove_padding": "true",
        "model.use_fused_kernels": "false",
        "model.enable_gradient_checkpointing": _hydra_value(config.model.gradient_checkpointing),
        "optim.lr": str(trainer.learning_rate),
        "optim.weight_decay": str(trainer.weight_decay),
        "optim.clip_grad": str(trainer.max_grad_norm),
        "optim.lr_warmup_steps_ratio": str(trainer.warmup_ratio),
        "optim.lr_scheduler_type": "cosine" if trainer.lr_scheduler == "cosine" else "constant",
        "trainer.default_local_dir": _hydra_string(Path(save_path).resolve()),
        "trainer.total_epochs": str(max(1, math.ceil(trainer.epochs))),
        "trainer.total_training_steps": _hydra_value(trainer.max_steps),
        "trainer.save_freq": str(trainer.save_steps or -1),
        "trainer.test_freq": str(trainer.eval_steps or -1),
        "trainer.seed": str(trainer.seed),
        "trainer.logger": _hydra_list(["console", *trainer.report_to]),
        "trainer.project_name": "mrloss",
        "trainer.experiment_name": _hydra_string(Path(save_path).resolve().name or "run"),
        "trainer.n_gpus_per_node": str(nproc),
        "trainer.resume_mode": "disable" if not resume else ("auto" if resume is True else "resume_path"),
        **_mrloss_overrides(config, save_path),
    }
    if isinstance(resume, str):
        generated["trainer.resume_from_path"] = _hydra_string(Path(resume).resolve())
    for key, value in extra.items():
        generated.pop("+" + key.lstrip("+"), None)
        generated.pop(key.lstrip("+"), None)
        generated[key] = value
    return [f"{key}={value}" for key, value in generated.items()]


def accelerator_available() -> bool:
    """Whether verl's FSDP engine can run here (it is registered for CUDA and NPU devices only)."""
    import torch

    npu = getattr(torch, "npu", None)
    return torch.cuda.is_available() or bool(npu is not None and npu.is_available())


def launch_command(nproc: int, overrides: list[str]) -> list[str]:
    """The torchrun command line (as argv) running verl's SFT trainer through our entry module."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mrloss.integrations.verl.trainer",
        *overrides,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mrloss.integrations.verl", description=__doc__.split("\n\n")[1])
    parser.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this node")
    parser.add_argument("--config", required=True, help="mrloss YAML config: a file or a built-in name")
    parser.add_argument("--save-path", required=True, help="checkpoint directory (trainer.default_local_dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (mrloss config) or verl.key.sub=value (verl)")
    args = parser.parse_args(argv)

    from mrloss.training.config import load_config

    verl_extra, config_overrides = [], []
    for item in args.overrides:
        plus, body = ("+", item[1:]) if item.startswith("+") else ("", item)
        if body.startswith("verl."):
            verl_extra.append(plus + body[len("verl.") :])
        else:
            config_overrides.append(item)
    try:
        config = load_config(args.config, config_overrides)
        command = launch_command(args.nproc, verl_overrides(config, args.nproc, args.save_path, verl_extra))
    except ValueError as error:  # ConfigError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    if not accelerator_available():
        print("error: verl's SFT trainer (its FSDP engine) needs a GPU (CUDA or NPU) and none is available here; "
              "train with mrloss train (--engine hf) instead", file=sys.stderr)  # fmt: skip
        return 2
    prepare_model(config, args.save_path)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])  # so workers import this mrloss checkout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
