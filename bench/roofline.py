"""Predicted GPU time of one forward + backward of the weighted LM-head loss, launch by launch: a PREDICTION.

``python -m bench.roofline [--launches IMPL] [--case CASE_ID] [--markdown]`` prints, for the goal cases (preset
``gpu-goals``: Llama-3-8B and Gemma-2-2B heads, bf16, N=16384, 0 / 50 / 90 % zero weights), the FLOPs and
bytes of every launch of each algorithm as its code is written, and the time a roofline predicts on the lent
H100 and H200: each launch takes max(FLOPs / matmul rate, bytes / memory bandwidth) (no overlap between
launches; elementwise math is free; the rates are the ones measured on the lent machines, ``DEVICES``). The
ratio column divides by the step's matmul time, 6 * N_learned * H * V at the matmul rate (the issue's yardstick:
the goal is <= 1.2 for mrloss). Until a device runs ``bench/gpu_pass.sh`` (whose summary prints these next to
the measured times) nothing here is measured.

Algorithms (reduction "mean", no bias, bf16 inputs; N_learned rows where the code compacts them, all N rows
where it does not):

- ``mrloss-fast`` (after #24) and ``mrloss-fast-before``: mrloss.ops.chunked with the Triton row op. Before:
  chunks of C ~ N H / V rows (at least 256), each chunk's bf16 weight-gradient product written by vocabulary
  slices and added into the float32 [V, H] buffer (~12 V H bytes per chunk), buffer zero-filled; backward scaled
  the buffers in place, then cast the weight gradient to bf16. After: C from ``default_chunk_size`` (2048 where
  the memory budget allows). With few learned rows (``defers_weight_grad``: the [M, V] bf16 logit gradients no
  larger than the float32 [V, H] buffer, M <= 2 H) the logit gradients are kept and backward makes the weight
  gradient in one GEMM with K = M, written once in bf16; otherwise ``add_product``: one cuBLAS
  addmm(out_dtype=float32) into the buffer per chunk (8 V H bytes, 4 for the first, which overwrites it), and
  backward scales and casts it in one pass (6 V H bytes). grad_hidden is scaled in place in one pass.
- ``mrloss-low``: memory="low": a loss-only pass over the chunks, then per vocabulary slice x chunk: the block
  recomputed, the slice gradient, both products added in float32 (``add_product``).
- ``liger``: Liger-Kernel's fused_linear_cross_entropy (0.8.x, accum_dtype None): all N rows, chunks of
  next_pow2(N / ceil(V / H)), bf16 logits, its CE kernel (two passes), grad_input mm, grad_weight addmm in
  bf16 in place (4 V H bytes per chunk); backward skips the scaling when grad_output == 1.
- ``cce``: Cut Cross-Entropy (impl "cce"): learned rows only, a fused LSE forward (2 M H V) and a fused backward
  (6 M H V: logits again and both gradients); bytes are the compulsory ones (inputs read once per kernel,
  dE / dC written once, bf16): its locked read-modify-write of dE / dC tiles is not counted (L2-dependent), nor
  the blocks its gradient filter skips (data-dependent; none on random inputs).
- ``torch-chunked``: torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (CUDA bf16 auto:
  "compact", chunking "aspect_ratio:2"): all N rows, chunks of next_pow2(N / ceil(V / H)) / 2, float32 logits
  through cuBLAS out_dtype, ~7 float32 passes over each chunk (max, exp, sum, gradient, downcast), grad_input mm,
  weight gradient addmm into a float32 [V, H] buffer (8 V H bytes per chunk), cast at the end. Approximate.
- ``trl``: TRL's ChunkedLogProbFunction (SFTTrainer's fused LM head): learned rows (compacted), token chunks of
  4096 x vocabulary chunks of 32768; forward: tile mm + fold kernel; backward: tile recomputed, gradient in place,
  float32 addmm of both gradients (8 M H V FLOPs in all), float32 buffers cast at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

import torch

from bench.cases import PRESETS, Case
from bench.cases import learned_tokens as _count_learned
from mrloss.ops.chunked import MIN_CHUNK_SIZE, default_chunk_size, defers_weight_grad, vocab_slice_size

BF16 = 2  # bytes per element of the inputs
FP32 = 4


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bytes_per_s: float  # device-memory bandwidth, bytes read + written
    flops_per_s: float  # bf16 matmul rate
    source: str


DEVICES = {
    "h100": Device(
        "H100 80GB HBM3 (nvidia-h100-x1)",
        3.0e12,
        798e12,
        "KINDS.md, seen 2026-11-13: device-to-device copy ~3.0 TB/s; 8192^3 bf16 matmul 798 TFLOP/s (random data)",
    ),
    "h200": Device(
        "H200 (nvidia-h200)",
        4.3e12,
        788e12,
        "KINDS.md, seen 2026-10-28 / 11-04: device-to-device copy ~4.3 TB/s; 8192^3 bf16 matmul 788 TFLOP/s",
    ),
}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch (or ``count`` identical ones): matmul FLOPs and device-memory bytes each."""

    name: str
    flops: float
    bytes: float
    count: int = 1

    def seconds(self, device: Device) -> float:
        return self.count * max(self.flops / device.flops_per_s, self.bytes / device.bytes_per_s)


@functools.cache
def learned_tokens(case: Case) -> int:
    return _count_learned(case)


def _chunks(rows: int, chunk: int) -> list[int]:
    return [min(chunk, rows - start) for start in range(0, rows, chunk)]


def _next_pow2(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


def old_default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """The chunk rule before #24: C ~ N H / V, at least MIN_CHUNK_SIZE, a multiple of 8."""
    chunk = -(-num_tokens * hidden_size // vocab_size)
    return max(MIN_CHUNK_SIZE, -(-chunk // 8) * 8)


def mrloss_fast(case: Case, *, chunk_size: int | None = None, before: bool = False) -> list[Launch]:
    """memory="fast" as written (``before``: as it was before #24). After: where ``defers_weight_grad`` allows
    (M <= 2 H for bf16) the chunks' logits and then their gradients go into one [M, V] bf16 buffer and backward
    makes the weight gradient in one GEMM with K = M written once in bf16 (the upstream scale folded into the
    [M, H] hidden rows); otherwise each chunk adds its product into the float32 buffer and backward scales and
    casts it in one pass."""
    n, h, v, m = case.tokens, case.head.hidden, case.head.vocab, learned_tokens(case)
    deferred = not before and defers_weight_grad(m, h, torch.bfloat16)
    chunk = chunk_size or (old_default_chunk_size if before else default_chunk_size)(n, h, v)
    launches = [
        Launch("learned rows: mask, nonzero, gathers [N]", 0, 40 * n),
        Launch("grad_hidden zeros [N, H] bf16", 0, BF16 * n * h),
    ]
    if before:
        launches.append(Launch("grad_weight float32 buffer zeros [V, H]", 0, FP32 * v * h))
    for index, c in enumerate(_chunks(m, chunk)):
        launches += [
            Launch("gather chunk rows of hidden", 0, 2 * BF16 * c * h),
            Launch("logits GEMM h_c W^T -> [C, V] bf16", 2 * c * h * v, BF16 * (c * h + v * h + c * v)),
            Launch("row op (Triton: read, then read + write the gradient)", 0, 3 * BF16 * c * v),
            Launch("grad_hidden GEMM G W", 2 * c * h * v, BF16 * (c * v + v * h + c * h)),
            Launch("index_copy_ grad_hidden rows", 0, 2 * BF16 * c * h),
        ]
        if deferred:
            continue
        if before:
            slices = math.ceil(v / vocab_slice_size(c, h, v))
            launches += [
                Launch(
                    "weight-grad GEMMs G^T h_c by vocab slice -> bf16",
                    2 * c * h * v,
                    BF16 * (c * v + slices * c * h + v * h),
                ),
                Launch("float32 buffer += bf16 product (by slice)", 0, BF16 * v * h + 2 * FP32 * v * h),
            ]
        else:
            buffer_bytes = FP32 * v * h * (1 if index == 0 else 2)
            launches.append(
                Launch(
                    "weight-grad addmm(out_dtype=float32) into the buffer",
                    2 * c * h * v,
                    BF16 * (c * v + c * h) + buffer_bytes,
                )
            )
    if before:
        return launches + [
            Launch("backward: scale grad_hidden in place (bf16 via float32 blocks)", 0, (2 * BF16 + 2 * FP32) * n * h),
            Launch("backward: scale float32 weight buffer in place", 0, 2 * FP32 * v * h),
            Launch("backward: cast weight gradient to bf16", 0, (FP32 + BF16) * v * h),
        ]
    launches.append(Launch("backward: scale grad_hidden in place (one pass)", 0, 2 * BF16 * n * h))
    if deferred:
        return launches + [
            Launch("backward: gather learned hidden rows [M, H], scale them in place", 0, 4 * BF16 * m * h),
            Launch("backward: weight-grad GEMM G^T h -> bf16 (K = M)", 2 * m * h * v, BF16 * (m * v + m * h + v * h)),
        ]
    return launches + [Launch("backward: scale float32 weight buffer into bf16 (one pass)", 0, (FP32 + BF16) * v * h)]


def mrloss_low(case: Case, *, chunk_size: int | None = None) -> list[Launch]:
    n, h, v, m = case.tokens, case.head.hidden, case.head.vocab, learned_tokens(case)
    chunk = chunk_size or default_chunk_size(n, h, v)
    slice_rows = min(vocab_slice_size(chunk, h, v), -(-v // 2))
    launches = [Launch("learned rows: mask, nonzero, gathers [N]", 0, 40 * n)]
    for c in _chunks(m, chunk):  # the loss-only pass (lse of the very logits backward recomputes)
        launches += [
            Launch("forward: gather chunk rows of hidden", 0, 2 * BF16 * c * h),
            Launch("forward: logits GEMM -> [C, V] bf16", 2 * c * h * v, BF16 * (c * h + v * h + c * v)),
            Launch("forward: row op, loss only (one read)", 0, BF16 * c * v),
        ]
    launches.append(Launch("backward: hidden float32 accumulator zeros [M, H]", 0, FP32 * m * h))
    for s in _chunks(v, slice_rows):
        for index, c in enumerate(_chunks(m, chunk)):
            launches += [
                Launch("backward: gather chunk rows of hidden", 0, 2 * BF16 * c * h),
                Launch("backward: block GEMM h_c W_s^T", 2 * c * h * s, BF16 * (c * h + s * h + c * s)),
                Launch("backward: slice gradient op (read + write)", 0, 2 * BF16 * c * s),
                Launch(
                    "backward: hidden addmm(out_dtype=float32)",
                    2 * c * h * s,
                    BF16 * (c * s + s * h) + 2 * FP32 * c * h,
                ),
                Launch(
                    "backward: weight-slice addmm(out_dtype=float32)",
                    2 * c * h * s,
                    BF16 * (c * s + c * h) + FP32 * s * h * (1 if index == 0 else 2),
                ),
            ]
        launches.append(Launch("backward: weight slice float32 -> bf16 gradient", 0, (FP32 + BF16) * s * h))
    launches += [
        Launch(
            "backward: hidden accumulator -> bf16, zeros, index_copy_",
            0,
            (FP32 + BF16) * m * h + BF16 * n * h + 2 * BF16 * m * h,
        )
    ]
    return launches


def liger(case: Case) -> list[Launch]:
    n, h, v = case.tokens, case.head.hidden, case.head.vocab
    chunk = min(_next_pow2(-(-n // -(-v // h))), n)
    launches = [
        Launch("grad_input zeros [N, H]", 0, BF16 * n * h),
        Launch("grad_weight zeros [V, H] bf16", 0, BF16 * v * h),
    ]
    for c in _chunks(n, chunk):
        launches += [
            Launch("logits mm -> [C, V] bf16", 2 * c * h * v, BF16 * (c * h + v * h + c * v)),
            Launch("CE kernel (two passes, gradient in place)", 0, 3 * BF16 * c * v),
            Launch("grad_input mm", 2 * c * h * v, BF16 * (c * v + v * h + c * h)),
            Launch("grad_weight addmm, bf16 in place", 2 * c * h * v, BF16 * (c * v + c * h + 2 * v * h)),
        ]
    return launches


def cce(case: Case) -> list[Launch]:
    n, h, v, m = case.tokens, case.head.hidden, case.head.vocab, learned_tokens(case)
    return [
        Launch("valid-row filter [N]", 0, 20 * n),
        Launch("fused LSE forward (compulsory bytes)", 2 * m * h * v, BF16 * (m * h + v * h)),
        Launch("dE, dC zeros (bf16)", 0, BF16 * (m * h + v * h)),
        Launch(
            "fused backward: logits again + both gradients (compulsory bytes)",
            6 * m * h * v,
            3 * BF16 * (m * h + v * h),
        ),
    ]


def torch_chunked(case: Case) -> list[Launch]:
    n, h, v = case.tokens, case.head.hidden, case.head.vocab
    chunk = max(1, _next_pow2(-(-n // -(-v // h))) // 2)
    launches = [
        Launch("grad_weight float32 zeros [V, H]", 0, FP32 * v * h),
        Launch("grad_input [N, H]", 0, BF16 * n * h),
    ]
    for c in _chunks(n, chunk):
        launches += [
            Launch("logits mm(out_dtype=float32) -> [C, V]", 2 * c * h * v, BF16 * (c * h + v * h) + FP32 * c * v),
            Launch("softmax / gradient / downcast (~7 float32 passes)", 0, 7 * FP32 * c * v),
            Launch("grad_input mm", 2 * c * h * v, BF16 * (c * v + v * h + c * h)),
            Launch("weight-grad addmm into float32 buffer", 2 * c * h * v, BF16 * (c * v + c * h) + 2 * FP32 * v * h),
        ]
    launches.append(Launch("weight gradient float32 -> bf16", 0, (FP32 + BF16) * v * h))
    return launches


def trl(case: Case) -> list[Launch]:
    n, h, v, m = case.tokens, case.head.hidden, case.head.vocab, learned_tokens(case)
    token_chunk, vocab_chunk = 4096, 32768
    launches = [Launch("compact rows with a target [N]", 0, 20 * n)]
    for t in _chunks(m, token_chunk):
        for s in _chunks(v, vocab_chunk):
            launches += [
                Launch("forward: tile mm", 2 * t * h * s, BF16 * (t * h + s * h + t * s)),
                Launch("forward: fold kernel (online lse)", 0, BF16 * t * s),
            ]
    launches.append(Launch("backward: float32 grad zeros [M, H] + [V, H]", 0, FP32 * (m * h + v * h)))
    for t in _chunks(m, token_chunk):
        for s in _chunks(v, vocab_chunk):
            launches += [
                Launch("backward: tile mm again", 2 * t * h * s, BF16 * (t * h + s * h + t * s)),
                Launch("backward: gradient in place", 0, 2 * BF16 * t * s),
                Launch("backward: grad_hidden addmm float32", 2 * t * h * s, BF16 * (t * s + s * h) + 2 * FP32 * t * h),
                Launch("backward: grad_weight addmm float32", 2 * t * h * s, BF16 * (t * s + t * h) + 2 * FP32 * s * h),
            ]
    launches.append(Launch("backward: float32 grads -> bf16", 0, (FP32 + BF16) * (m * h + v * h)))
    return launches


ALGORITHMS = {
    "mrloss-fast": mrloss_fast,
    "mrloss-fast-before": lambda case: mrloss_fast(case, before=True),
    "mrloss-low": mrloss_low,
    "liger": liger,
    "cce": cce,
    "torch-chunked": torch_chunked,
    "trl": trl,
}
# bench.baselines implementation -> algorithm here ("@C": chunk_size=C)
BENCH_IMPLS = {"mrloss-triton": "mrloss-fast", "mrloss-triton-low": "mrloss-low", "liger": "liger", "cce": "cce"}
BENCH_IMPLS.update({"torch-chunked": "torch-chunked", "trl": "trl"})


def matmul_seconds(case: Case, device: Device) -> float:
    """6 * N_learned * H * V at the matmul rate: the step's matmul time, the yardstick of the ratios."""
    return 6.0 * learned_tokens(case) * case.head.hidden * case.head.vocab / device.flops_per_s


def predict(case: Case, algorithm: str, device: Device, chunk_size: int | None = None) -> dict:
    """{"flops", "bytes", "seconds", "ratio"} of one algorithm on one case (ratio: to ``matmul_seconds``)."""
    if chunk_size is not None:
        launches = (mrloss_low if algorithm == "mrloss-low" else mrloss_fast)(case, chunk_size=chunk_size)
    else:
        launches = ALGORITHMS[algorithm](case)
    seconds = sum(launch.seconds(device) for launch in launches)
    return {
        "flops": sum(launch.count * launch.flops for launch in launches),
        "bytes": sum(launch.count * launch.bytes for launch in launches),
        "seconds": seconds,
        "ratio": seconds / matmul_seconds(case, device),
    }


def predict_bench_impl(case: Case, impl: str, device: Device) -> dict | None:
    """The prediction for a bench implementation name (``mrloss-triton@2048`` included), None if not modelled."""
    name, _, chunk = impl.partition("@")
    algorithm = BENCH_IMPLS.get(name)
    if algorithm is None:
        return None
    return predict(case, algorithm, device, int(chunk) if chunk else None)


def device_for(name: str) -> Device | None:
    """The modelled device of a GPU name ('NVIDIA H100 80GB HBM3' -> h100), None if not modelled."""
    lowered = name.lower()
    return next((device for key, device in DEVICES.items() if key in lowered), None)


def goal_cases() -> list[Case]:
    return PRESETS["gpu-goals"].cases()


def table(cases: list[Case], algorithms: list[str]) -> list[str]:
    """Markdown rows: case, algorithm, TFLOP, GB, then per device predicted ms and ratio to the matmul time."""
    header = (
        "| case | algorithm | TFLOP | GB moved | "
        + " | ".join(f"{key.upper()} ms | {key.upper()} x matmul" for key in DEVICES)
        + " |"
    )
    lines = [header, "|" + "---|" * (4 + 2 * len(DEVICES))]
    for case in cases:
        for algorithm in algorithms:
            cells = []
            for device in DEVICES.values():
                result = predict(case, algorithm, device)
                cells += [f"{result['seconds'] * 1e3:.1f}", f"{result['ratio']:.2f}"]
            lines.append(
                f"| {case.head.name} z{case.zero_frac:g} | {algorithm} | {result['flops'] / 1e12:.1f} | "
                f"{result['bytes'] / 1e9:.1f} | " + " | ".join(cells) + " |"
            )
    return lines


def launch_listing(case: Case, algorithm: str, device: Device) -> list[str]:
    """Every launch of one algorithm on one case, identical ones merged: count, TFLOP, GB, predicted ms."""
    merged: dict[tuple, int] = {}
    for launch in ALGORITHMS[algorithm](case):
        key = (launch.name, launch.flops, launch.bytes)
        merged[key] = merged.get(key, 0) + launch.count
    lines = [f"{algorithm} on {case.id}, {device.name}:", f"{'count':>5} {'TFLOP':>8} {'GB':>8} {'ms':>8}  launch"]
    for (name, flops, nbytes), count in merged.items():
        launch = Launch(name, flops, nbytes, count)
        totals = f"{count * flops / 1e12:8.3f} {count * nbytes / 1e9:8.3f} {launch.seconds(device) * 1e3:8.3f}"
        lines.append(f"{count:5d} {totals}  {name}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help=f"comma-separated subset of {list(ALGORITHMS)}"
    )
    parser.add_argument("--launches", metavar="ALGORITHM", help="list every launch of this algorithm")
    parser.add_argument("--case", help="one case id of preset gpu-goals (default: all)")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100", help="device of --launches")
    options = parser.parse_args(argv)
    cases = goal_cases()
    if options.case:
        cases = [case for case in cases if case.id == options.case]
        if not cases:
            parser.error(f"unknown case {options.case!r}; known: {[case.id for case in goal_cases()]}")
    if options.launches:
        if options.launches not in ALGORITHMS:
            parser.error(f"unknown algorithm {options.launches!r}; known: {list(ALGORITHMS)}")
        for case in cases:
            print("\n".join(launch_listing(case, options.launches, DEVICES[options.device])) + "\n")
        return 0
    algorithms = options.algorithms.split(",")
    unknown = [name for name in algorithms if name not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; known: {list(ALGORITHMS)}")
    print("PREDICTION (roofline, not measured): " + "; ".join(f"{k.upper()}: {d.source}" for k, d in DEVICES.items()))
    print("\n".join(table(cases, algorithms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
