"""Every variant of the fused kernels compiles for real GPUs, proven on a CPU.

The other kernel tests run through Triton's interpreter, which follows Python semantics and hides
compiler errors: a `return` inside a constexpr `if` passed all of them and compiled for no GPU.
Here `python -m vipo.kernels.aot` compiles, without a GPU and without the interpreter, every
variant the launchers can produce (derived from the launch code on meta tensors, for the SM
count of each target) for sm_80 and sm_90 (A100, H100: the GPUs we train on), and reads
registers, stack and shared memory from each cubin. VIPO_AOT_ARCHS=auto adds every other target
this Triton has (sm_100 where it ships Blackwell's ptxas), at half again the time. The per-group resource table is
printed at the end of the test run; the full one is written beside the JSON.
"""

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vipo.kernels import aot, poly_dpo_loss, sample_errors, triton_ops
from vipo.kernels.poly_dpo import use_fused

from vipo_testing import AOT_TABLE

COMPILER_ENV = {**os.environ, "TRITON_INTERPRET": "0"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8"}


def _run_python(script, code: str, timeout: int) -> subprocess.CompletedProcess:
    script.write_text(code)  # Triton reads a kernel's source from its file
    return subprocess.run(
        [sys.executable, str(script)], env=COMPILER_ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """Every variant for every target this Triton has, compiled once for the module."""
    out = tmp_path_factory.mktemp("aot") / "variants.json"
    jobs = max(1, os.cpu_count() or 1)
    cmd = [
        sys.executable,
        "-m",
        "vipo.kernels.aot",
        "--arch",
        os.environ.get("VIPO_AOT_ARCHS", "80,90"),
        "--jobs",
        str(jobs),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=COMPILER_ENV, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), f"the compile sweep wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    fields = {f for f in aot.Variant.__dataclass_fields__}
    results = [aot.Variant(**{k: v for k, v in row.items() if k in fields}) for row in data["variants"]]
    full = out.with_name("variants.txt")
    full.write_text(aot.table(results) + "\n")
    table = f"{aot.summary(results)}\n\n{proc.stdout.strip().splitlines()[-1]}\nevery variant: {full}"
    return data["triton"], results, table


def _where(v: aot.Variant) -> str:
    return f"{v.kernel} sm_{v.arch} {v.constexprs} warps={v.options['num_warps']} ({v.example})"


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_each_gpu_target(compiled, request):
    version, results, table = compiled
    request.node.user_properties.append((AOT_TABLE, table))  # printed at the end (conftest.py)
    archs = {v.arch for v in results}
    assert {80, 90} <= archs, f"targets compiled: {sorted(archs)}"
    failed = [f"{_where(v)}: {v.error}" for v in results if not v.ok]
    assert not failed, (
        f"{len(failed)} of {len(results)} variants do not compile with Triton {version}:\n"
        + "\n".join(failed[:20])
    )
    unread = [_where(v) for v in results if v.registers < 0]
    assert not unread, "cuobjdump gave no resource usage for:\n" + "\n".join(unread[:20])


def test_streaming_kernels_use_no_stack_on_sm90(compiled):
    _, results, _ = compiled
    spills = [
        f"{v.stack} B stack: {_where(v)}"
        for v in results
        if v.ok and v.arch == 90 and v.kernel in aot.STREAMING_KERNELS and (v.stack or v.local)
    ]
    assert not spills, "\n".join(spills)


def test_aligned_inputs_get_128_bit_global_loads_and_gradient_stores(compiled):
    _, results, _ = compiled
    aligned = [v for v in results if v.ok and v.aligned]
    assert {v.signature["pred_ptr"] for v in aligned} == {"*fp32", "*bf16", "*fp16"}
    narrow = [f"loads {v.vector_loads}: {_where(v)}" for v in aligned if not v.vector_loads.get("128")]
    narrow += [
        f"stores {v.vector_stores}: {_where(v)}"
        for v in aligned
        if v.kernel == "_poly_dpo_grad_kernel" and not v.vector_stores.get("128")
    ]
    assert not narrow, "\n".join(narrow)


def test_the_sweep_reaches_every_choice_the_launchers_make_on_a_gpu(compiled):
    """The compiled set is checked against the launch code's own choices, not a hand-kept list:
    grid_config over rows from 1 element to past 2^31, for each dtype and target's SM count."""
    _, results, _ = compiled
    for arch, sms in aot.ARCHS.items():
        got = [v for v in results if v.arch == arch]
        if not got:
            continue
        streaming = {
            (v.kernel, v.signature["pred_ptr"], v.constexprs["BLOCK"], v.options["num_warps"])
            for v in got
            if v.kernel in aot.STREAMING_KERNELS
        }
        sizes = sorted({int(1.37**k) for k in range(70)} | {2**k + d for k in range(33) for d in (-1, 0, 1)})
        for dtype in DTYPES:
            pointer = POINTER[dtype]
            for n_elems in sizes:
                for n_rows in (2, 16, 256, 4096, 65534):
                    block, iters, n_chunks, warps = triton_ops.grid_config(n_elems, n_rows, dtype, sms)
                    assert n_chunks * iters * block >= n_elems and 1 <= iters <= 64
                    for kernel in aot.STREAMING_KERNELS:
                        assert (kernel, pointer, block, warps) in streaming, (arch, dtype, n_elems, n_rows)
        # Every constexpr flag combination of each kernel.
        partial = {
            (
                v.signature["pred_ptr"],
                v.constexprs["HAS_REF"],
                v.constexprs["WEIGHT_MODE"],
                v.signature["weight_ptr"],
            )
            for v in got
            if v.kernel == "_errors_partial_kernel"
        }
        grad = {
            (v.signature["pred_ptr"], v.constexprs["WEIGHT_MODE"], v.signature["weight_ptr"])
            for v in got
            if v.kernel == "_poly_dpo_grad_kernel"
        }
        weight_ptrs = {POINTER[d] for d in triton_ops.WEIGHT_DTYPES}
        for pointer in ("*fp32", "*bf16", "*fp16"):
            for mode in (1, 2):
                for wp in weight_ptrs:
                    assert (pointer, mode, wp) in grad
                    for has_ref in (False, True):
                        assert (pointer, has_ref, mode, wp) in partial
            assert (pointer, 0) in {(p, m) for p, m, _ in grad}
        head = {
            (
                v.constexprs["HAS_REF_PRED"],
                v.constexprs["HAS_PAIR_WEIGHT"],
                v.constexprs["LOSS"],
                v.signature["partial_ptr"],
                v.signature["ref_err_ptr"],
                v.constexprs["BLOCK_P"],
                v.constexprs["BLOCK_C"],
            )
            for v in got
            if v.kernel == "_poly_dpo_head_kernel"
        }
        tile = triton_ops.head_config(7, 3, interpret=False)
        # Without ref_pred the head reads float64 partials and float64 reference errors.
        pointers = {False: ("*fp64", "*fp64"), True: ("*fp32", "*fp32")}
        assert head == {
            (r, w, code, *pointers[r], *tile)
            for r in (False, True)
            for w in (False, True)
            for code in triton_ops.LOSS_CODES.values()
        }
        # Rows past 2^31 elements (int64 sizes and offsets) compiled for both streaming kernels.
        wide = {v.kernel for v in got if v.constexprs.get("OFFS_64") and v.signature["n_elems"] == "i64"}
        assert wide == set(aot.STREAMING_KERNELS)


def test_in_row_offsets_go_int64_exactly_when_int32_could_overflow():
    need = triton_ops._needs_int64_offsets
    assert not need(2**30, 4096, 64, None)
    # The last program's lanes reach n_chunks * iters * BLOCK - 1: past 2^31 - 1 below N = 2^31.
    assert need(2**31 - 100, 4096, 1, None)
    assert not need(2**31 - 4096, 4096, 1, None)
    assert need(2**31 - 4096, 4096, 2, None)
    # A weight view whose strides reach past 2^31 inside one row of 192 elements.
    weight = torch.empty(3, 2**29, 64, device="meta")[:, :4].transpose(0, 1)
    assert weight.shape == (4, 3, 64) and need(192, 2048, 1, weight)
    assert not need(192, 2048, 1, torch.empty(4, 1, 64, device="meta").expand(4, 3, 64))


@pytest.mark.skipif(
    not use_fused(torch.empty(2)), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py)"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int64_offset_path_computes_what_the_int32_path_does(monkeypatch, seed, dtype):
    pred = torch.randn(6, 3, 5, 7).to(dtype).requires_grad_(True)
    target, ref = torch.randn(6, 3, 5, 7).to(dtype), torch.randn(6, 3, 5, 7).to(dtype)
    weight = torch.rand(6, 1, 5, 1)

    def run():
        pred.grad = None
        out = poly_dpo_loss(pred, target, ref_pred=ref, beta=300.0, alpha=2.0, elem_weight=weight)
        out.loss.backward()
        return out, pred.grad.clone(), sample_errors(pred.detach(), target, weight)

    narrow = run()
    monkeypatch.setattr(triton_ops, "_needs_int64_offsets", lambda *args: True)
    wide = run()
    for a, b in zip(narrow[0], wide[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(narrow[1], wide[1]) and torch.equal(narrow[2], wide[2])


def _jit_functions():
    for name, obj in vars(triton_ops).items():
        fn = getattr(obj, "fn", None)
        if callable(fn) and name.startswith("_") and hasattr(obj, "arg_names"):
            yield name, fn


def test_no_jit_function_returns_from_inside_a_branch_or_loop():
    """The bug class the interpreter hid: the compiler does not stop at a `return` inside a
    constexpr `if`. Every @triton.jit function has at most one return, as its last statement."""
    found = dict(_jit_functions())
    assert {
        "_errors_partial_kernel",
        "_poly_dpo_head_kernel",
        "_poly_dpo_grad_kernel",
        "_load_weight",
    } <= set(found)
    for name, fn in found.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        body = tree.body[0].body
        returns = [node for node in ast.walk(tree) if isinstance(node, ast.Return)]
        nested = [r for r in returns if r is not body[-1]]
        assert not nested, f"{name}: return on line {nested[0].lineno} is not the function's last statement"


def test_the_compile_check_fails_a_return_inside_a_constexpr_branch(tmp_path):
    """The harness can fail: the pattern that broke every WEIGHT_MODE=0 kernel is refused by the
    compiler the sweep uses (this is what the interpreter let through)."""
    code = textwrap.dedent(
        """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def weight(ptr, offs, MODE: tl.constexpr):
            if MODE == 0:
                return 1.0
            return tl.load(ptr + offs)

        @triton.jit
        def kernel(ptr, out, MODE: tl.constexpr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(out + offs, weight(ptr, offs, MODE) * 2.0)

        for mode in (0, 1):
            src = ASTSource(kernel, {"ptr": "*fp32", "out": "*fp32", "MODE": "constexpr", "BLOCK": "constexpr"},
                            {(2,): mode, (3,): 128})
            try:
                triton.compile(src, target=GPUTarget("cuda", 90, 32))
                print(mode, "compiled")
            except Exception as exc:
                print(mode, "refused", type(exc).__name__)
        """
    )
    proc = _run_python(tmp_path / "early_return.py", code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 refused" in proc.stdout and "1 compiled" in proc.stdout, proc.stdout
