"""One HF Llama training step on the CPU, stock loss against the mrloss patch: ``python -m bench.hf_step``.

    python -m bench.hf_step [--code DIR ...] [--rounds 3] [--steps 3] [--out FILE.md]

Times forward + backward (no optimizer) of a small Llama (H=256, V=32000, 2 layers; B x T = 4 x 512 = 2048
tokens, the first half of every row weight 0 / label -100) with the stock HF loss ([B, T, V] logits) and with
`mrloss.integrations.hf.apply_mrloss` (token_weights), the latter with the token metrics (a step that logs, or
evaluation) and without them (every other training step, since MultiRegionTrainer asks for them only on steps that
log). Each (code, variant) runs in its own process, variants interleaved round by round; the median step of each
is divided by the stock step's median of the same round, and the table shows the median ratio over rounds (the
machine is shared: ratios, not absolute times). ``--code DIR`` adds another checkout's mrloss (e.g. the code
before a change: ``git archive REV mrloss | tar -x -C DIR``), timed with metrics (what it does every step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("stock", "patched-metrics", "patched-no-metrics")


def _worker(variant: str, steps: int, layers: int, tokens: int, threads: int) -> float:
    """Median milliseconds of one forward + backward of ``variant`` (this process's mrloss, from sys.path)."""
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
    model = transformers.LlamaForCausalLM(config)
    rows, length = 4, tokens // 4
    input_ids = torch.randint(0, config.vocab_size, (rows, length))
    token_weights = torch.ones(rows, length)
    token_weights[:, : length // 2] = 0.0
    labels = input_ids.masked_fill(token_weights == 0, -100)
    inputs = dict(input_ids=input_ids, labels=labels)
    if variant != "stock":
        from mrloss.integrations import hf

        hf.apply_mrloss(model)
        inputs["token_weights"] = token_weights
        if variant == "patched-no-metrics":
            model._mrloss_token_metrics = False  # what MultiRegionTrainer sets on a step that does not log

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**inputs).loss.backward()
        return (time.perf_counter() - start) * 1e3

    step()
    return statistics.median(step() for _ in range(steps))


def measure(code: Path, variant: str, options) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(REPO)]))
    args = [variant, str(options.steps), str(options.layers), str(options.tokens), str(options.threads)]
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r}); {_CALL}", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} ({code}) failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


_CALL = (
    "from bench.hf_step import _worker; a = sys.argv[1:]; "
    "print(_worker(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4])))"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout to time too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="B x T (B = 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the table and the raw numbers (Markdown + JSON) here")
    options = parser.parse_args(argv)
    runs = [(REPO, variant) for variant in VARIANTS] + [(code, "patched-metrics") for code in options.code]
    ratios: dict[str, list[float]] = {}
    raw = []
    for round_index in range(options.rounds):
        times = {}
        for code, variant in runs:
            label = variant if code == REPO else f"{variant} ({code})"
            times[label] = measure(code, variant, options)
            print(f"round {round_index + 1}: {label}: {times[label]:.0f} ms", file=sys.stderr, flush=True)
        raw.append(times)
        for label, ms in times.items():
            ratios.setdefault(label, []).append(ms / times["stock"])
    load = os.getloadavg()
    lines = [
        f"HF Llama step on the CPU (H=256, V=32000, {options.layers} layers, B x T = {options.tokens}, 50% weight 0), "
        f"{options.threads} thread(s), {options.rounds} rounds x {options.steps} steps, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}: median over rounds of (variant / stock of the same round)",
        "",
        "| variant | step / stock | median step ms |",
        "|---|---|---|",
    ]
    for label, values in ratios.items():
        median_ms = statistics.median(times[label] for times in raw)
        lines.append(f"| {label} | {statistics.median(values):.3f} | {median_ms:.0f} |")
    print("\n".join(lines))
    if options.out:
        options.out.write_text("\n".join(lines) + "\n")
        settings = {key: value for key, value in vars(options).items() if key not in ("code", "out")}
        record = {"settings": settings, "code": [str(code) for code in options.code], "rounds": raw}
        options.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
