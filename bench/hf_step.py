"""One HF Llama training step on the CPU, stock loss against the mrloss patch: ``python -m bench.hf_step``.

    python -m bench.hf_step [--code DIR ...] [--all-variants] [--steps 7] [--out FILE.md]

Times forward + backward (no optimizer) of a small Llama (H=256, V=32000, 2 layers; B x T = 4 x 512 = 2048
tokens, the first half of every row weight 0 / label -100) with the stock HF loss ([B, T, V] logits) and with
`mrloss.integrations.hf.apply_mrloss` (token_weights), the latter with the token metrics (a step that logs, or
evaluation) and without them (every other training step: MultiRegionTrainer asks for them only on steps that log).
The machine this runs on is shared and loaded, so the variants are paired: one process holds a model per variant
(same weights) and runs them in turn, step after step (rotating the order), and each step of a variant is divided
by the stock step next to it; the table shows the median of those ratios. ``--code DIR`` times another checkout's
mrloss the same way in its own process against its own stock steps (e.g. the code before a change:
``git archive REV mrloss | tar -x -C DIR``), with metrics (what it computed on every step); ``--all-variants``
also without them, for code that already has the switch (``model._mrloss_token_metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.linear_ce import device_name

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("stock", "patched-metrics", "patched-no-metrics")


def _worker(variants: list[str], steps: int, layers: int, tokens: int, threads: int) -> dict[str, list[float]]:
    """{variant: milliseconds of each of ``steps`` forward + backward passes}, the variants run in turn."""
    import copy
    import time

    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=tokens,
    )
    stock = transformers.LlamaForCausalLM(config)
    rows, length = 4, tokens // 4
    input_ids = torch.randint(0, config.vocab_size, (rows, length))
    token_weights = torch.ones(rows, length)
    token_weights[:, : length // 2] = 0.0
    labels = input_ids.masked_fill(token_weights == 0, -100)
    runs = {}
    for variant in variants:
        inputs = dict(input_ids=input_ids, labels=labels)
        model = stock
        if variant != "stock":
            from mrloss.integrations import hf

            model = hf.apply_mrloss(copy.deepcopy(stock))
            inputs["token_weights"] = token_weights
            if variant == "patched-no-metrics":
                model._mrloss_token_metrics = False  # what MultiRegionTrainer sets on a step that does not log
        runs[variant] = (model, inputs)

    def step(variant) -> float:
        model, inputs = runs[variant]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**inputs).loss.backward()
        return (time.perf_counter() - start) * 1e3

    for variant in variants:  # warm-up
        step(variant)
    times = {variant: [] for variant in variants}
    for index in range(steps):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times[variant].append(step(variant))
    return times


def measure(code: Path, variants: list[str], options) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(REPO)]))
    args = [",".join(variants), str(options.steps), str(options.layers), str(options.tokens), str(options.threads)]
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r}); {_CALL}", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variants} ({code}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_CALL = (
    "import json; from bench.hf_step import _worker; a = sys.argv[1:]; "
    "print(json.dumps(_worker(a[0].split(','), int(a[1]), int(a[2]), int(a[3]), int(a[4]))))"
)


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """{variant: median over steps of (its step / the stock step of the same round)}."""
    return {
        variant: statistics.median(ms / stock for ms, stock in zip(values, times["stock"]))
        for variant, values in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout to time too")
    parser.add_argument(
        "--all-variants", action="store_true", help="time the --code checkouts without token metrics too"
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="B x T (B = 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the table (Markdown) and the raw times (.json) here")
    options = parser.parse_args(argv)
    load_before = os.getloadavg()
    runs = {"this checkout": measure(REPO, list(VARIANTS), options)}
    for code in options.code:
        runs[str(code)] = measure(code, list(VARIANTS if options.all_variants else VARIANTS[:2]), options)
    load_after = os.getloadavg()
    lines = [
        f"HF Llama step on the CPU ({device_name('cpu')}; H=256, V=32000, {options.layers} layers, "
        f"B x T = {options.tokens}, 50% weight 0, forward + backward), {options.threads} thread(s), {options.steps} "
        f"paired steps per variant; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared "
        "machine: ratios, not absolute times).",
        "",
        "| code | variant | step / stock step (median of pairs) | median step ms |",
        "|---|---|---|---|",
    ]
    for code, times in runs.items():
        for variant, ratio in paired_ratios(times).items():
            lines.append(f"| {code} | {variant} | {ratio:.3f} | {statistics.median(times[variant]):.0f} |")
    print("\n".join(lines))
    if options.out:
        options.out.write_text("\n".join(lines) + "\n")
        settings = {key: value for key, value in vars(options).items() if key not in ("code", "out")}
        options.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "times": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
