"""Measure one implementation on one case, in a process of its own (``python -m bench.measure``).

The command ``bench.linear_ce`` starts one such process per (implementation, case), so that a peak
(RSS on a CPU) or a crash of one never shows in another. Modes:

- ``time``: ``warmup`` untimed forward+backward steps, then ``reps`` timed steps. Each step times the
  forward (loss) and the backward (``loss.backward()``) apart: CUDA events around each on the GPU,
  ``time.perf_counter`` on a CPU. Reported: the median of forward, of backward and of their sum.
  The first timed step also measures the peak extra memory; the outputs of the last one are compared
  with the reference.
- ``verify``: one step, only the errors (Triton kernels under the CPU interpreter: never timed).
- ``reference``: the oracle of a case, saved for the other processes: row chunks of
  ``mrloss.reference.reference_linear_cross_entropy`` in ``--ref-dtype`` (float64, or float32 when
  float64 is too slow on a CPU), gradients by autograd, stored as float32.
- ``ceiling``: the matmul rate of the device in the case dtype (a large square matmul, fastest rep).

Peak extra memory = peak during the step - memory before it - the gradients of hidden and weight
(which the step must produce): memory beyond inputs and gradients. CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU: the kernel's resident-set high-water mark (``VmHWM``, reset by
writing 5 to /proc/self/clear_refs) minus ``VmRSS`` before the step; the command runs this process with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the kernel at once and the RSS follows
the live tensors.

Errors: relative, against the reference: |loss - ref| / |ref|, and ||g - g_ref||_2 / ||g_ref||_2 for the
gradients of hidden and weight. The result is one JSON object written to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
import traceback

import torch

from bench.baselines import resolve
from bench.cases import Case, make_inputs

REFERENCE_CHUNK_ELEMENTS = 1 << 27  # logits elements per reference chunk


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


class PeakMemory:
    """Peak bytes allocated during a ``with`` block, above what was allocated at its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = _proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self.start
        return False


def step(loss_fn, inputs: dict, softcap, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """One forward+backward from fresh gradients: (loss, forward ms, backward ms)."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    hidden.grad = weight.grad = None
    args = (hidden, weight, inputs["targets"], inputs["token_weights"], softcap)
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        loss = loss_fn(*args)
        marks[1].record()
        loss.backward()
        marks[2].record()
        torch.cuda.synchronize()
        return loss.detach(), marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
    start = time.perf_counter()
    loss = loss_fn(*args)
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return loss.detach(), (middle - start) * 1e3, (end - middle) * 1e3


def errors(loss: torch.Tensor, inputs: dict, reference: dict) -> dict:
    """Relative errors of the loss and of both gradients against the reference."""

    def rel_norm(value: torch.Tensor, ref: torch.Tensor) -> float:
        return float((value.float() - ref).norm() / ref.norm().clamp_min(1e-30))

    ref_loss = reference["loss"]
    return {
        "loss": float(loss),
        "loss_rel_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_hidden_rel_err": rel_norm(inputs["hidden"].grad, reference["grad_hidden"]),
        "grad_weight_rel_err": rel_norm(inputs["weight"].grad, reference["grad_weight"]),
    }


def measure_time(impl_name: str, case: Case, device, warmup: int, reps: int, reference_path: str) -> dict:
    """Timings and peak extra memory; errors of the last step (the reference is loaded only then, so
    it takes no device memory while the implementation runs)."""
    loss_fn = resolve(impl_name).loss_fn
    inputs = make_inputs(case, device)
    for _ in range(warmup):
        step(loss_fn, inputs, case.head.softcap, device)
    inputs["hidden"].grad = inputs["weight"].grad = None
    with PeakMemory(device) as peak:
        loss, forward_ms, backward_ms = step(loss_fn, inputs, case.head.softcap, device)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (inputs["hidden"], inputs["weight"]))
    times = [(forward_ms, backward_ms)]
    for _ in range(reps - 1):
        loss, forward_ms, backward_ms = step(loss_fn, inputs, case.head.softcap, device)
        times.append((forward_ms, backward_ms))
    return {
        "status": "ok",
        "forward_ms": statistics.median(f for f, _ in times),
        "backward_ms": statistics.median(b for _, b in times),
        "fwd_bwd_ms": statistics.median(f + b for f, b in times),
        "reps": len(times),
        "peak_extra_mib": (peak.peak_bytes - grad_bytes) / 2**20,
        **errors(loss, inputs, torch.load(reference_path, map_location=device)),
    }


def measure_verify(impl_name: str, case: Case, device, reference_path: str) -> dict:
    inputs = make_inputs(case, device)
    loss, _, _ = step(resolve(impl_name).loss_fn, inputs, case.head.softcap, device)
    return {
        "status": "verified",
        "reason": "Triton interpreter on CPU: errors checked, not timed",
        **errors(loss, inputs, torch.load(reference_path, map_location=device)),
    }


def compute_reference(case: Case, device, ref_dtype: torch.dtype) -> dict:
    """Loss and gradients in ``ref_dtype``, row chunk by row chunk; gradients stored as float32."""
    from mrloss.ops.reference import reference_linear_cross_entropy

    inputs = make_inputs(case, device)
    hidden = inputs["hidden"].detach().to(ref_dtype).requires_grad_()
    weight = inputs["weight"].detach().to(ref_dtype).requires_grad_()
    targets, token_weights = inputs["targets"], inputs["token_weights"]
    total_weight = token_weights.to(ref_dtype).sum()
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // case.head.vocab)
    loss = 0.0
    for start in range(0, case.tokens, rows):
        chunk = slice(start, start + rows)
        chunk_loss = (
            reference_linear_cross_entropy(
                hidden[chunk],
                weight,
                targets[chunk],
                token_weights[chunk],
                softcap=case.head.softcap,
                reduction="sum",
                compute_dtype=ref_dtype,
            )
            / total_weight
        )
        chunk_loss.backward()
        loss += float(chunk_loss)
    return {"loss": loss, "grad_hidden": hidden.grad.float(), "grad_weight": weight.grad.float()}


def matmul_ceiling(device, dtype: torch.dtype, size: int, warmup: int, reps: int) -> dict:
    """Rate of a [size, size] @ [size, size] matmul: ``tflops`` from the fastest rep (the ceiling; on a
    shared CPU the median is dragged down by other jobs), ``median_tflops`` from the median."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    times = []
    for index in range(warmup + reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            a @ b
            elapsed = (time.perf_counter() - begin) * 1e3
        if index >= warmup:
            times.append(elapsed)
    flop = 2 * size**3
    return {
        "status": "ok",
        "shape": [size, size, size],
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": statistics.median(times),
        "best_ms": min(times),
        "median_tflops": flop / (statistics.median(times) * 1e-3) / 1e12,
        "tflops": flop / (min(times) * 1e-3) / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["time", "verify", "reference", "ceiling"], required=True)
    parser.add_argument("--impl", default=None)
    parser.add_argument("--case", default=None, help="the case as JSON (bench.cases.Case.to_json)")
    parser.add_argument("--reference", default=None, help="reference file (written in mode reference, read else)")
    parser.add_argument("--ref-dtype", default="float64")
    parser.add_argument("--dtype", default="float32", help="matmul dtype (mode ceiling)")
    parser.add_argument("--size", type=int, default=4096, help="matmul size (mode ceiling)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    case = Case.from_json(json.loads(args.case)) if args.case else None
    try:
        if args.mode == "ceiling":
            result = matmul_ceiling(device, getattr(torch, args.dtype), args.size, args.warmup, args.reps)
        elif args.mode == "reference":
            torch.save(compute_reference(case, device, getattr(torch, args.ref_dtype)), args.reference)
            result = {"status": "ok"}
        elif args.mode == "verify":
            result = measure_verify(args.impl, case, device, args.reference)
        else:
            result = measure_time(args.impl, case, device, args.warmup, args.reps, args.reference)
    except torch.OutOfMemoryError as error:
        result = {"status": "oom", "reason": str(error).splitlines()[0][:300]}
    except Exception as error:  # noqa: BLE001 -- recorded in the results, with the traceback on stderr
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(error).__name__}: {str(error)[:500]}"}
    result["num_threads"] = torch.get_num_threads()
    with open(args.out, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
