"""Every Triton kernel, in every configuration its launcher chooses on a GPU, compiles with Triton's
real compiler for sm_80 and sm_90 (no GPU needed), without register spills and within the device's shared
memory. The interpreter accepts code that this compiler rejects, so the compiler runs in subprocesses without
TRITON_INTERPRET (the tests' own process imported triton interpreted).

Robust to a loaded machine: each case's result is cached (``compile_check.cache_key``: triton version, kernel
sources, case) in pytest's cache folder (or ``MRLOSS_COMPILE_CACHE``), so unchanged kernels compile nothing; on
a miss one subprocess compiles a small batch of missing cases, with a time limit per case, not per suite."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mrloss.ops.backends.triton import compile_check
from mrloss.ops.backends.triton.cross_entropy_rows import MAX_BLOCK_V, SMALL_BLOCK_V, rows_launch_config
from mrloss.ops.backends.triton.launch import GPU_CAPABILITIES, kernel_signature

CASES = [(capability, case) for capability in GPU_CAPABILITIES for case in compile_check.all_cases(capability)]
CASE_IDS = [case.case_id(capability) for capability, case in CASES]
BATCH = 16  # cases one subprocess compiles on a cache miss
SECONDS_PER_CASE = 300  # a case compiles in 2-10 s on a loaded 2-core machine
JOBS = min(2, os.cpu_count() or 1)


def _compiler_env() -> dict:
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def compile_cache(request, tmp_path_factory) -> Path:
    """The folder of cached compile results: MRLOSS_COMPILE_CACHE, else pytest's cache, else a temporary one."""
    if os.environ.get("MRLOSS_COMPILE_CACHE"):
        return Path(os.environ["MRLOSS_COMPILE_CACHE"])
    if getattr(request.config, "cache", None) is not None:  # None or absent: -p no:cacheprovider
        return request.config.cache.mkdir("compile_check")
    return tmp_path_factory.mktemp("compile_check")


def compiled_record(index: int, cache: Path) -> dict:
    """The record of ``CASES[index]``: from the cache, else compiled with the next missing cases of the batch."""
    capability, case = CASES[index]
    record = compile_check.cached_record(cache, case, capability)
    if record is not None:
        return record
    batch = [
        case_id
        for (capability, case), case_id in zip(CASES[index:], CASE_IDS[index:])
        if compile_check.cached_record(cache, case, capability) is None
    ][:BATCH]
    command = [sys.executable, "-m", "mrloss.ops.backends.triton.compile_check", "--cache", str(cache)]
    command += ["--jobs", str(JOBS)] + [argument for case_id in batch for argument in ("--case", case_id)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=_compiler_env(), timeout=SECONDS_PER_CASE * len(batch)
    )
    print(done.stdout)
    record = compile_check.cached_record(cache, case, capability)
    assert record is not None, done.stderr[-3000:]
    return record


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_kernel_compiles_for_gpu(index, compile_cache):
    record = compiled_record(index, compile_cache)
    assert compile_check.problems(record) == [], compile_check.table_row(record)


def test_cases_cover_every_kernel_dtype_and_option():
    names = {(case.kernel_name, case.dtype) for _, case in CASES}
    assert names >= {("cross_entropy_rows", dtype) for dtype in ("fp16", "bf16", "fp32", "fp64")}
    assert names >= {("linear_cross_entropy_forward", dtype) for dtype in ("fp16", "bf16", "fp32")}
    rows = [case.config for _, case in CASES if case.kernel_name == "cross_entropy_rows"]
    assert {(c.constexprs["BLOCK_V"], c.constexprs["HAS_SOFTCAP"], c.constexprs["WRITE_GRAD"]) for c in rows} == {
        (block, softcap, grad) for block in (SMALL_BLOCK_V, MAX_BLOCK_V) for softcap in (0, 1) for grad in (0, 1)
    }
    assert len(set(CASE_IDS)) == len(CASE_IDS)


def test_case_signatures_come_from_the_kernels_own_arguments():
    """Argument names and order from the kernel; pointers from the per-argument type map; floats from the kernel's
    annotations (the row kernel's in float64: exact for float64 rows); every other argument i32."""
    for _, case in CASES:  # the kernels' constexpr parameters are the upper-case ones
        assert list(case.signature) == [name for name in case.kernel.arg_names if not name.isupper()]
    rows = next(case for _, case in CASES if case.kernel_name == "cross_entropy_rows" and case.dtype == "fp64")
    assert rows.signature["logits_ptr"] == "*fp64" and rows.signature["targets_ptr"] == "*i64"
    assert rows.signature["label_smoothing"] == rows.signature["smoothing_per_class"] == "fp64"
    assert rows.signature["num_cols"] == "i32"
    forward = next(case for _, case in CASES if case.kernel_name == "linear_cross_entropy_forward")
    assert forward.signature["softcap"] == "fp32" and forward.signature["stride_weight_col"] == "constexpr"
    pointers = {name: kind for name, kind in rows.signature.items() if kind.startswith("*")}
    with pytest.raises(ValueError, match=r"unknown arguments \['vocab_size'\]"):
        kernel_signature(rows.kernel, dict(pointers, vocab_size="i32"))
    with pytest.raises(ValueError, match=r"pointers without a pointer type \['entropy_ptr'\]"):
        kernel_signature(rows.kernel, {name: kind for name, kind in pointers.items() if name != "entropy_ptr"})
    with pytest.raises(ValueError, match=r"annotated arguments typed otherwise \['softcap'\]"):
        kernel_signature(rows.kernel, dict(pointers, softcap="fp32"))


def test_cached_results_are_read_not_compiled(tmp_path):
    """A cached record is returned as it is (nothing compiles); the key changes with the case and the target."""
    capability, case = CASES[0]
    other_capability, other = CASES[-1]
    key = compile_check.cache_key(case, capability)
    assert key != compile_check.cache_key(case, other_capability) != compile_check.cache_key(other, capability)
    record = dict(id="cached", registers=1, key=key)
    (tmp_path / f"{key}.json").write_text(json.dumps(record))
    assert compile_check.check([case.case_id(capability)], cache=tmp_path) == [record]
    with pytest.raises(ValueError, match="no such compile case"):
        compile_check.check(["sm_90-no-such-case"], cache=tmp_path)


@pytest.mark.parametrize("vocab_size", [1, 5, 1000, 1024, 1025, 32000, 128256, 256000, 1 << 20])
def test_row_launch_config_is_one_of_the_compiled_ones(vocab_size):
    compiled_configs = {case.config.describe() for _, case in CASES if case.kernel_name == "cross_entropy_rows"}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for capability in GPU_CAPABILITIES:
            config = rows_launch_config(vocab_size, dtype, has_softcap=True, write_grad=True, capability=capability)
            assert config.describe() in compiled_configs


OLD_ROW_LOOP = """
import triton
import triton.language as tl
from mrloss.ops.backends.triton import compile_check
from mrloss.ops.backends.triton.launch import CompileCase, LaunchConfig


@triton.jit
def pair(a):
    return a, a * 2.0


@triton.jit
def old_loop_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    first, _ = pair(tl.load(x_ptr))  # the old row kernel's pattern: `_` a scalar here ...
    total = tl.zeros((), tl.float32)
    for start in range(0, n, BLOCK):
        tile, _ = pair(tl.load(x_ptr + start + tl.arange(0, BLOCK)))  # ... and a tile in the loop
        total += tl.sum(tile, axis=0)
    tl.store(out_ptr, total + first)


case = CompileCase("old", "fp32", old_loop_kernel, dict(x_ptr="*fp32", out_ptr="*fp32", n="i32"), (),
                   LaunchConfig(dict(BLOCK=1024), num_warps=4, num_stages=1))
print(compile_check.compile_case(case, (9, 0)).problems())
"""


def test_the_old_row_kernels_pattern_fails_this_check(tmp_path):
    script = tmp_path / "old_row_loop.py"
    script.write_text(textwrap.dedent(OLD_ROW_LOOP))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_compiler_env())
    assert "Loop-carried variable" in done.stdout, done.stdout + done.stderr[-2000:]
