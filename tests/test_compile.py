"""Every Triton kernel, in every configuration its launcher chooses on a GPU, compiles with Triton's
real compiler for sm_80 and sm_90 (no GPU needed), without register spills on sm_90 and within the
device's shared memory. The interpreter accepts code that this compiler rejects, so the compiler runs
in a subprocess without TRITON_INTERPRET (the tests' own process imported triton interpreted)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mrloss.ops.backends.triton import compile_check
from mrloss.ops.backends.triton.cross_entropy_rows import MAX_BLOCK_V, SMALL_BLOCK_V, rows_launch_config
from mrloss.ops.backends.triton.launch import GPU_CAPABILITIES

CASES = [(capability, case) for capability in GPU_CAPABILITIES for case in compile_check.all_cases(capability)]
CASE_IDS = [case.case_id(capability) for capability, case in CASES]


def _compiler_env() -> dict:
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Results of ``python -m mrloss.ops.backends.triton.compile_check`` by case id; prints its table."""
    output = tmp_path_factory.mktemp("compile") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "mrloss.ops.backends.triton.compile_check", "--json", str(output)],
        capture_output=True, text=True, env=_compiler_env(), timeout=1200,
    )  # fmt: skip
    print("\n" + done.stdout)
    assert output.exists(), done.stderr[-3000:]
    return {result["id"]: result for result in json.loads(output.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_for_gpu(case_id, compiled):
    result = compiled[case_id]
    assert result["problems"] == [], result["row"]


def test_cases_cover_every_kernel_dtype_and_option():
    names = {(case.kernel_name, case.dtype) for _, case in CASES}
    assert names >= {("cross_entropy_rows", dtype) for dtype in ("fp16", "bf16", "fp32", "fp64")}
    assert names >= {("linear_cross_entropy_forward", dtype) for dtype in ("fp16", "bf16", "fp32")}
    rows = [case.config for _, case in CASES if case.kernel_name == "cross_entropy_rows"]
    assert {(c.constexprs["BLOCK_V"], c.constexprs["HAS_SOFTCAP"], c.constexprs["WRITE_GRAD"]) for c in rows} == {
        (block, softcap, grad) for block in (SMALL_BLOCK_V, MAX_BLOCK_V) for softcap in (0, 1) for grad in (0, 1)
    }
    assert len(set(CASE_IDS)) == len(CASE_IDS)


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
