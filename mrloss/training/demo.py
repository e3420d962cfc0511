"""`mrloss demo`: the whole pipeline on a laptop CPU in seconds, no downloads.

1. writes the example data set (three formats) to ``OUTPUT_DIR/data``;
2. shows the loss mask of one sample in the terminal (`mrloss.debug.LossMaskVisualizer`);
3. trains a tiny Llama with a BPE tokenizer trained on the data (`mrloss.training.run`), on CPU;
4. prints the loss of every region type before and after, and where the outputs are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mrloss.formats import FORMATS
from mrloss.training.config import Config, DataConfig, ModelConfig, MonitorConfig, TrainerConfig


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = time.perf_counter()

    from mrloss.data import encode, write_examples
    from mrloss.debug import LossMaskVisualizer
    from mrloss.training.evaluate import evaluate_region_losses
    from mrloss.training.run import finish_run, prepare_run

    output_dir = Path(args.output_dir)
    paths = write_examples(output_dir / "data")
    print(f"[1/4] example data ({', '.join(sorted(paths))}) written to {output_dir / 'data'}")

    config = _demo_config(paths[args.format], args.format, output_dir / "run", args.steps)
    run = prepare_run(config)
    dataset = run.train_dataset

    index = _sample_to_show(dataset)
    region_text = dataset.region_texts[index]
    encoding = encode(region_text, run.tokenizer, max_length=config.data.max_length)
    print(f"\n[2/4] loss mask of sample {dataset.sample_ids[index]} (token weights; 0 = not learned)")
    LossMaskVisualizer(run.tokenizer).print_detailed_analysis(
        encoding["input_ids"], encoding["token_weights"], encoding, region_text=region_text
    )

    before = evaluate_region_losses(run.trainer, dataset)
    print(
        f"\n[3/4] training a tiny llama ({sum(p.numel() for p in run.trainer.model.parameters()):,} parameters, "
        f"{len(dataset)} samples) for {args.steps} steps on CPU"
    )
    finish_run(run)
    after = evaluate_region_losses(run.trainer, dataset)
    _print_results(before, after, config.trainer.output_dir)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mrloss demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", default="mrloss-demo", help="where data, model and logs go (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--format",
        default="tag_based",
        choices=FORMATS,
        help="which copy of the example data to train on (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _demo_config(train_file: Path, format: str, run_dir: Path, steps: int) -> Config:
    """The demo's run: a tiny llama trained on CPU for ``steps`` steps on ``train_file`` (in ``format``)."""
    return Config(
        data=DataConfig(train_files=[str(train_file)], format=format, max_length=256),
        model=ModelConfig(
            arch="llama",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=512,
        ),
        trainer=TrainerConfig(
            output_dir=str(run_dir),
            max_steps=steps,
            learning_rate=5e-3,
            per_device_batch_size=4,
            warmup_ratio=0.05,
            lr_scheduler="cosine",
            logging_steps=max(steps // 6, 1),
            device="cpu",
            overwrite_output_dir=True,  # the demo rewrites its own directory, data included
        ),
        monitor=MonitorConfig(enabled=True),
    )


def _print_results(before: dict, after: dict, run_dir: str) -> None:
    """The loss of each region type before and after training, and where the outputs are."""
    print("\n[4/4] mean token loss per region type (nats), over the training set")
    width = max(len(name) for name in before)
    print(f"  {'region':<{width}}  {'start':>7}  {'end':>7}")
    for name in before:
        print(f"  {name:<{width}}  {before[name]:7.3f}  {after[name]:7.3f}")
    print(f"\nmodel + tokenizer: {run_dir}   metrics: {Path(run_dir) / 'metrics.json'}")
    print(f"per-region statistics: {Path(run_dir) / 'monitor' / 'region_stats.jsonl'}  (plot: mrloss plot {run_dir})")


def _sample_to_show(dataset) -> int:
    """The shortest sample among the untruncated ones with the most distinct region types."""
    truncated = {sample_id for sample_id, _ in dataset.truncated}

    def key(i):
        region_text = dataset.region_texts[i]
        return (
            dataset.sample_ids[i] in truncated,
            -len({region.type for region in region_text.regions}),
            len(region_text.text),
        )

    return min(range(len(dataset)), key=key)
