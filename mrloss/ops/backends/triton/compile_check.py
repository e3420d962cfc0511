"""Compile every Triton kernel configuration with Triton's real compiler, for real GPUs, from a CPU.

The CPU interpreter accepts code that the GPU compiler rejects, so passing interpreted tests says
nothing about a GPU. This check compiles each ``CompileCase`` the kernel modules yield (exactly the
launch configurations their launchers choose on a GPU) for sm_80 and sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", major * 10 + minor, warp_size))``, and reads
registers and shared memory of the cubin with ``cuobjdump -res-usage`` from the triton wheel, and the
spill stores from ``ptxas -v``. A case is unfit when it fails to compile, spills registers (on either
target; only the configurations in ``SPILLS_ALLOWED`` may, each with its reason) or needs more shared memory
than the device has.

``python -m mrloss.ops.backends.triton.compile_check [--cache DIR] [--jobs N] [--json PATH]`` prints the table;
with ``--cache`` each result is kept under a key of (triton version, this package's sources, case), so a second
run with unchanged kernels compiles nothing. The kernels must be real ``JITFunction``s: run it with
TRITON_INTERPRET unset (the tests use a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mrloss.ops.backends.triton.launch import GPU_CAPABILITIES, Capability, CompileCase, triton_interpreted

SHARED_MEMORY_LIMIT = {(8, 0): 166912, (9, 0): 232448}  # bytes of shared memory per block (opt-in maximum)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores")
# (kernel name, dtype) -> why register spills are acceptable there. Every dtype a training or evaluation step uses
# (fp16, bf16, fp32) must compile without spills on every target, with every Triton version checked.
SPILLS_ALLOWED: dict[tuple[str, str], str] = {
    ("cross_entropy_rows", "fp64"): (
        "float64 is the tests' exactness dtype, never a training one; its IEEE divisions (softcap's tanh, the "
        "entropy) compile to subroutine calls, around which ptxas saves a few registers (8 B with softcap and "
        "metrics on triton 3.9, none on 3.6)"
    ),
}


@dataclass(frozen=True)
class CompileResult:
    """Resource use of one compiled case (bytes for memory); ``error`` is the compiler's message or None."""

    case: CompileCase
    capability: Capability
    registers: int = 0
    spill_bytes: int = 0  # register spill stores
    shared_bytes: int = 0
    error: str | None = None

    def record(self) -> dict:
        """This result as JSON data: the case, the target, the triton version and the resources."""
        import triton

        return dict(
            id=self.case.case_id(self.capability), kernel=self.case.kernel_name, dtype=self.case.dtype,
            config=self.case.config.describe(), capability=list(self.capability),
            ints16=any(not name.endswith("_ptr") for name in self.case.divisible_by_16), triton=triton.__version__,
            registers=self.registers, spill_bytes=self.spill_bytes, shared_bytes=self.shared_bytes, error=self.error,
        )  # fmt: skip

    def problems(self) -> list[str]:
        return problems(self.record())


def problems(record: dict) -> list[str]:
    """What makes a compiled case (its ``CompileResult.record()``) unfit for a GPU: a compile error, register
    spills (unless ``SPILLS_ALLOWED``), more shared memory than the target has."""
    if record["error"] is not None:
        return [f"compile error: {record['error']}"]
    found = []
    if record["spill_bytes"] and (record["kernel"], record["dtype"]) not in SPILLS_ALLOWED:
        found.append(f"{record['spill_bytes']} bytes of register spills")
    limit = SHARED_MEMORY_LIMIT[tuple(record["capability"])]
    if record["shared_bytes"] > limit:
        found.append(f"{record['shared_bytes']} bytes of shared memory > {limit}")
    return found


def table_row(record: dict) -> str:
    """One markdown row of ``TABLE_HEADER`` for a ``CompileResult.record()``."""
    arch = "sm_{}{}".format(*record["capability"])
    head = f"| {record['kernel']} | {arch} | {record['dtype']} | {record['config']} "
    if record["error"] is not None:
        return head + "| | error |||"
    ints = "yes" if record["ints16"] else "no"
    return head + f"| {ints} | {record['registers']} | {record['spill_bytes']} | {record['shared_bytes']} |"


TABLE_HEADER = (
    "| kernel | arch | dtype | config | ints % 16 | regs | spills (B) | smem (B) |\n|---|---|---|---|---|---|---|---|"
)


def all_cases(capability: Capability):
    """Every kernel's cases for ``capability`` ((major, minor)): an iterator of ``CompileCase``s."""
    from mrloss.ops.backends.triton import cross_entropy_rows, linear_cross_entropy_forward

    for module in (cross_entropy_rows, linear_cross_entropy_forward):
        yield from module.compile_cases(capability)


def compile_case(case: CompileCase, capability: Capability) -> CompileResult:
    """Compile ``case`` for ``capability`` (no GPU needed) and read its resource use.

    Args:
        case: the kernel configuration.
        capability: (major, minor) of the target GPU.

    Returns:
        A ``CompileResult``: registers, spill-store bytes and shared memory from the cubin, or the compiler's
        error.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = case.kernel.arg_names
    signature = {name: case.signature.get(name, "constexpr") for name in arg_names}
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in case.divisible_by_16}
    source = ASTSource(fn=case.kernel, signature=signature, constexprs=case.config.constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    try:
        compiled = triton.compile(source, target=target, options=case.config.options())
    except Exception as error:  # noqa: BLE001 - any compiler failure is this case's result
        message = str(error).strip().splitlines()
        return CompileResult(case, capability, error=message[-1] if message else type(error).__name__)
    registers, _stack, static_shared, _local = _cubin_resources(compiled.asm["cubin"])
    spill_bytes = _spill_store_bytes(compiled.asm["ptx"], capability)
    return CompileResult(case, capability, registers, spill_bytes, compiled.metadata.shared + static_shared)


def _cubin_resources(cubin: bytes) -> tuple[int, ...]:
    """(registers, stack bytes, static shared bytes, local bytes) of the one kernel in ``cubin``,
    from ``cuobjdump -res-usage`` (the stack frame also holds call frames, so spills come from ptxas)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report = _run_on_file(cubin, ".cubin", [tool, "-res-usage"])
    found = _RESOURCES.search(report)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{report}")
    return tuple(int(value) for value in found.groups())


def _spill_store_bytes(ptx: str, capability: Capability) -> int:
    """Bytes of register spill stores that ptxas (the one Triton itself uses) reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = capability[0] * 10 + capability[1]
    suffix = "a" if arch >= 90 else ""
    command = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", "-o", os.devnull]
    found = _SPILLS.search(_run_on_file(ptx.encode(), ".ptx", command))
    if found is None:
        raise RuntimeError("ptxas -v reported no spill line")
    return int(found.group(1))


def _run_on_file(content: bytes, suffix: str, command: list[str]) -> str:
    """stdout + stderr of ``command FILE`` with ``content`` written to a temporary FILE."""
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        file.write(content)
        file.flush()
        done = subprocess.run([*command, file.name], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def cache_key(case: CompileCase, capability: Capability) -> str:
    """The key of ``case``'s result on ``capability``: the triton version, the case id, every other source file of
    this package (kernels, launch configs, device functions) and the accumulation-dtype rule, and the functions of
    this module that compile and measure (the rest of it, e.g. what counts as a problem, is not in a result)."""
    import triton

    from mrloss.ops.backends import dtypes

    digest = hashlib.sha256(f"{triton.__version__}\n{case.case_id(capability)}".encode())
    sources = [path for path in sorted(Path(__file__).parent.glob("*.py")) if path.name != Path(__file__).name]
    for path in [*sources, Path(dtypes.__file__)]:
        digest.update(path.read_bytes())
    for function in (compile_case, _cubin_resources, _spill_store_bytes, _run_on_file, CompileResult.record):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()[:32]


def cached_record(cache: Path, case: CompileCase, capability: Capability) -> dict | None:
    """The cached ``CompileResult.record()`` of ``case`` on ``capability``, or None."""
    path = cache / f"{cache_key(case, capability)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def check(selected: list[str] | None = None, *, cache: Path | None = None, jobs: int = 1) -> list[dict]:
    """Records of every case (or of the case ids ``selected``) on every target, in order: from ``cache`` when
    there, else compiled by ``jobs`` processes (and stored in ``cache``)."""
    wanted = [
        (capability, case)
        for capability in GPU_CAPABILITIES
        for case in all_cases(capability)
        if selected is None or case.case_id(capability) in selected
    ]
    unknown = set(selected or ()) - {case.case_id(capability) for capability, case in wanted}
    if unknown:
        raise ValueError(f"no such compile case: {sorted(unknown)}")
    records = {key: cached_record(cache, case, key[0]) if cache else None for key, case in _keyed(wanted)}
    missing = [key for key, record in records.items() if record is None]
    with contextlib.ExitStack() as stack:
        compile_map = map  # one job: in this process; more: fresh processes (spawned, not forked)
        if jobs > 1 and len(missing) > 1:
            context = multiprocessing.get_context("spawn")
            compile_map = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=context)).map
        for key, record in zip(missing, compile_map(_compile_record, missing)):
            records[key] = record
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                (cache / f"{record['key']}.json").write_text(json.dumps(record, indent=1))
    return list(records.values())


def _keyed(wanted):
    """((capability, case id), case) pairs."""
    return [((capability, case.case_id(capability)), case) for capability, case in wanted]


def _compile_record(key: tuple[Capability, str]) -> dict:
    """Compile the case ``key`` = (capability, case id) in a worker process; its record with its cache key."""
    capability, case_id = key
    case = next(case for case in all_cases(capability) if case.case_id(capability) == case_id)
    return dict(compile_case(case, capability).record(), key=cache_key(case, capability))


def main(argv: list[str] | None = None) -> int:
    """Compile every case (or the ``--case`` ones) for every target and print the table (``--json PATH``: also
    write the records); exit status 1 when any case is unfit. Needs TRITON_INTERPRET unset."""
    parser = argparse.ArgumentParser(prog="python -m mrloss.ops.backends.triton.compile_check", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--cache", type=Path, help="read and keep results in this folder")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    parser.add_argument("--case", action="append", help="only this case id (repeatable)")
    args = parser.parse_args(argv)
    if triton_interpreted():
        parser.error("TRITON_INTERPRET=1 is set: the real compiler needs it unset")
    records = [dict(record, problems=problems(record)) for record in check(args.case, cache=args.cache, jobs=args.jobs)]
    print(TABLE_HEADER)
    for record in records:
        print(table_row(record))
        for problem in record["problems"]:
            print(f"  ^ {problem}")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1))
    return 1 if any(record["problems"] for record in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
