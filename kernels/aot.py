"""Compile every variant of the fused kernels ahead of time for NVIDIA GPUs, on any machine.

    python -m vipo.kernels.aot --arch 80,90 [--json OUT] [--jobs 2]

Triton's interpreter, which runs the kernels in the CPU tests, follows Python semantics and hides
compiler errors: a `return` inside a constexpr `if` passed every CPU test and compiled for no GPU.
This module proves the compiled path without a GPU:

- The variants are the launchers' own: `triton_ops.partials_launch`, `head_launch` and
  `grad_launch` are called on meta tensors over a sweep of shapes, dtypes, weight layouts and
  reference options, with the SM count of each target, so every BLOCK, num_warps and constexpr
  flag that `grid_config` / `head_config` can pick on that GPU is reached.
- Each launch is bound the way Triton's JIT binds it on a GPU (the same specialisation of
  pointers and integers: 16-byte alignment, divisibility by 16, integers equal to 1, int64 above
  2^31), then compiled to a cubin with the ptxas Triton ships.
- cuobjdump (also shipped with Triton) reads registers, stack and shared memory of each cubin;
  the PTX gives the width of every global load and store.

Needs Triton without the interpreter (TRITON_INTERPRET unset or 0) and no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# SM counts of the GPUs each target stands for (A100, H100 SXM, B200): grid_config depends on it.
ARCHS = {80: 108, 90: 132, 100: 148}
STREAMING_KERNELS = ("_errors_partial_kernel", "_poly_dpo_grad_kernel")
_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "bool", "float64")


@dataclass
class Variant:
    """One compiled kernel: what the JIT would compile for one class of launches."""

    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    example: str  # one launch that produces it
    ok: bool = False
    error: str = ""
    registers: int = -1
    stack: int = -1
    shared: int = -1
    local: int = -1
    vector_loads: dict = field(default_factory=dict)  # width in bits -> count, global loads
    vector_stores: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def aligned(self) -> bool:
        """A streaming variant whose pred and target (one dtype) are 16-byte aligned, N divisible
        by 16 and each thread holds at least 16 contiguous bytes of a row: 128-bit access is due."""
        sig = self.signature
        if self.kernel not in STREAMING_KERNELS or sig.get("target_ptr") != sig.get("pred_ptr"):
            return False
        bytes_per_elem = {"*fp32": 4, "*bf16": 2, "*fp16": 2}[sig["pred_ptr"]]
        per_thread = self.constexprs["BLOCK"] // (32 * self.options["num_warps"]) * bytes_per_elem
        return (
            self.attrs.get("pred_ptr") == "D"
            and self.attrs.get("target_ptr") == "D"
            and self.attrs.get("n_elems") == "D"
            and per_thread >= 16
        )


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit(
            "vipo.kernels.aot compiles for GPUs and needs Triton's compiler: run it with "
            "TRITON_INTERPRET=0 (the interpreter was on)"
        )


# ---------------------------------------------------------------------------------------------
# The sweep: launches built by the launchers themselves


def _cases(sms: int):
    """(description, Launch) for every launch the sweep builds, on meta tensors."""
    import torch

    from . import triton_ops as ops

    meta = dict(device="meta")
    dtypes = [getattr(torch, d) for d in _DTYPES]

    def weights(rows, sample):
        """Weight layouts that reach weight modes 1 and 2 with each weight dtype."""
        yield "none", None
        c, m = sample
        for wd in _WEIGHT_DTYPES:
            dt = getattr(torch, wd)
            yield f"full:{wd}", torch.empty(rows, c, m, dtype=dt, **meta)  # mode 1, stride 1
            yield f"per-sample:{wd}", torch.empty(rows, 1, 1, dtype=dt, **meta)  # mode 1, stride 0
            yield f"map:{wd}", torch.empty(rows, 1, m, dtype=dt, **meta)  # mode 2
            yield f"channel:{wd}", torch.empty(1, c, 1, dtype=dt, **meta)  # mode 2

    # Per-sample shapes (2, m), N = 2m: every power of two up to above the largest BLOCK (each
    # BLOCK and num_warps the heuristic picks), N not divisible by 16 (no alignment hint), and a
    # row of more than 2^31 elements (int64 sizes and offsets).
    samples = [(2, 2**k) for k in range(0, 14)] + [(2, 4097), (2, 2**30 + 8)]
    rows_options = (2, 64)
    for dtype in dtypes:
        for sample in samples:
            for rows in rows_options:
                huge = sample[1] > 2**20
                pred = torch.empty(rows, *sample, dtype=dtype, **meta)
                for wname, weight in weights(rows, sample):
                    if huge and wname not in ("none", "full:float32"):
                        continue
                    for with_ref in (False, True):
                        ref = pred if with_ref else None
                        desc = f"pred/target {dtype} [{rows},{sample[0]},{sample[1]}] weight={wname} ref={with_ref}"
                        launch, partial, n_elems = ops.partials_launch(pred, pred, ref, weight, sms)
                        yield desc, launch
                    coef = torch.empty(rows, dtype=torch.float32, **meta)
                    scale = torch.empty((), dtype=torch.float32, **meta)
                    launch, _ = ops.grad_launch(scale, pred, pred, weight, coef, sms)
                    yield f"grad {desc.split(' ref=')[0]}", launch
    # Mixed input dtypes (the API widens each input on load): every (pred, target, ref) triple.
    for pd in dtypes:
        for td in dtypes:
            for rd in dtypes:
                pred = torch.empty(4, 2, 4096, dtype=pd, **meta)
                target = torch.empty(4, 2, 4096, dtype=td, **meta)
                ref = torch.empty(4, 2, 4096, dtype=rd, **meta)
                desc = f"pred {pd} target {td} ref {rd} [4,2,4096]"
                yield desc, ops.partials_launch(pred, target, ref, None, sms)[0]
                yield desc, ops.partials_launch(pred, target, None, None, sms)[0]
                coef = torch.empty(4, dtype=torch.float32, **meta)
                scale = torch.empty((), dtype=torch.float32, **meta)
                yield f"grad {desc}", ops.grad_launch(scale, pred, target, None, coef, sms)[0]
    # The head kernel: every tile shape head_config picks, with and without ref_pred / pair weights,
    # for every loss type; partials and reference errors in the dtypes poly_dpo_fwd passes.
    for pairs in (1, 16, 17, 32, 64, 1000, 32767):
        for n_chunks in (1, 16, 17, 33, 64, 5000):
            for has_ref_pred in (False, True):
                for has_pw in (False, True):
                    for loss_type in ops.LOSS_TYPES:
                        partial = torch.empty(
                            3 if has_ref_pred else 1,
                            2 * pairs,
                            n_chunks,
                            dtype=ops.partial_dtype(has_ref_pred),
                            **meta,
                        )
                        ref_err = (
                            None if has_ref_pred else torch.empty(2 * pairs, dtype=torch.float64, **meta)
                        )
                        pw = torch.empty(pairs, **meta) if has_pw else None
                        alpha = 8.0 if loss_type == "sigmoid" else 0.0
                        desc = (
                            f"head pairs={pairs} chunks={n_chunks} ref_pred={has_ref_pred} "
                            f"pair_weight={has_pw} loss={loss_type}"
                        )
                        launch = ops.head_launch(
                            partial, ref_err, pw, 4096, 500.0, alpha, has_ref_pred, sms, loss_type
                        )[0]
                        yield desc, launch


def _bind(launch, target):
    """(signature, constexprs, attrs, options) as Triton's JIT computes them for `target`."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.options)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, options


def variants(arch: int) -> list[Variant]:
    """Every distinct compilation the launchers can ask for on a GPU of compute capability `arch`."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    found: dict[str, Variant] = {}
    for desc, launch in _cases(ARCHS[arch]):
        signature, constexprs, attrs, options = _bind(launch, target)
        names = launch.kernel.arg_names
        named_constexprs = {names[k[0]]: _plain(v) for k, v in constexprs.items()}
        named_attrs = {names[k[0]]: _attr_word(v) for k, v in attrs.items()}
        opts = {k: options.__dict__[k] for k in ("num_warps", "num_stages", "enable_fp_fusion")}
        key = json.dumps(
            [launch.kernel.__name__, signature, named_constexprs, named_attrs, opts], sort_keys=True
        )
        if key not in found:
            found[key] = Variant(
                launch.kernel.__name__, arch, dict(signature), named_constexprs, named_attrs, opts, desc
            )
    return list(found.values())


def _plain(value):
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _attr_word(value) -> str:
    """The JIT's specialisation of an argument as one word: 'D' (divisible by 16) or ''."""
    return "D" if "tt.divisibility" in str(value) else ""


# ---------------------------------------------------------------------------------------------
# Compiling and reading the cubin


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.(b|f|u|s)(\d+)\b")


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def _compile_one(variant: Variant) -> Variant:
    import torch  # noqa: F401  (triton_ops needs it)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_ops as ops

    start = time.perf_counter()
    fn = getattr(ops, variant.kernel)
    names = fn.arg_names
    constexprs = {(names.index(k),): v for k, v in variant.constexprs.items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in variant.attrs.items() if v == "D"}
    src = ASTSource(fn, variant.signature, constexprs, attrs)
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", variant.arch, 32), options=dict(variant.options)
        )
    except Exception as exc:  # every failure is reported, none is fatal to the sweep
        variant.error = f"{type(exc).__name__}: {exc}"[:2000]
        variant.seconds = time.perf_counter() - start
        return variant
    variant.ok = True
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    match = _RESOURCE.search(usage)
    if match:
        variant.registers, variant.stack, variant.shared, variant.local = map(int, match.groups())
    else:
        variant.error = f"cuobjdump printed no resource line: {usage.strip()[:300]}"
    for op, vec, _, bits in _GLOBAL_ACCESS.findall(compiled.asm["ptx"]):
        width = str(int(vec or 1) * int(bits))
        counts = variant.vector_loads if op == "ld" else variant.vector_stores
        counts[width] = counts.get(width, 0) + 1
    variant.seconds = time.perf_counter() - start
    return variant


def compile_all(archs, jobs: int = 1) -> list[Variant]:
    _require_compiler()
    todo = [v for arch in archs for v in variants(arch)]
    if jobs <= 1:
        return [_compile_one(v) for v in todo]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, todo, chunksize=8))


def check(results: list[Variant]) -> list[str]:
    """The properties every variant must have; returns one line per violation."""
    problems = []
    for v in results:
        where = f"{v.kernel} sm_{v.arch} {v.constexprs} warps={v.options['num_warps']} ({v.example})"
        if not v.ok:
            problems.append(f"does not compile: {where}: {v.error}")
            continue
        if v.registers < 0:
            problems.append(f"no resource usage read: {where}: {v.error}")
        if v.kernel in STREAMING_KERNELS and v.arch == 90 and (v.stack > 0 or v.local > 0):
            problems.append(f"uses {v.stack} B of stack ({v.local} B local): {where}")
        if v.aligned:
            if not v.vector_loads.get("128"):
                problems.append(f"no 128-bit global loads for aligned inputs: {where}: {v.vector_loads}")
            if v.kernel == "_poly_dpo_grad_kernel" and not v.vector_stores.get("128"):
                problems.append(
                    f"no 128-bit global stores for an aligned gradient: {where}: {v.vector_stores}"
                )
    return problems


def _flags(v: Variant) -> str:
    return " ".join(f"{k}={val}" for k, val in sorted(v.constexprs.items()) if k.isupper())


def table(results: list[Variant]) -> str:
    """Every variant, one line each: its signature's dtypes, constexprs, warps and resources."""
    head = (
        f"{'kernel':<23} {'sm':>3} {'pred':>4} {'tgt':>4} {'wt':>4} {'N':>4} {'constexprs':<58} "
        f"{'warps':>5} {'regs':>4} {'stack':>5} {'smem':>5} {'ld128':>5} {'st128':>5}"
    )
    lines = [head, "-" * len(head)]
    for v in sorted(results, key=lambda v: (v.kernel, v.arch, json.dumps(v.signature), _flags(v))):
        sig = v.signature
        dtypes = " ".join(
            f"{sig.get(k, '-').lstrip('*'):>4}" for k in ("pred_ptr", "target_ptr", "weight_ptr")
        )
        n = sig.get("n_elems", "-") + ("/16" if v.attrs.get("n_elems") == "D" else "")
        if not v.ok:
            lines.append(
                f"{v.kernel:<23} {v.arch:>3} {dtypes} {n:>4} {_flags(v):<58} FAILED: {v.error[:100]}"
            )
            continue
        lines.append(
            f"{v.kernel:<23} {v.arch:>3} {dtypes} {n:>4} {_flags(v):<58} {v.options['num_warps']:>5} "
            f"{v.registers:>4} {v.stack:>5} {v.shared:>5} {v.vector_loads.get('128', 0):>5} "
            f"{v.vector_stores.get('128', 0):>5}"
        )
    return "\n".join(lines)


def summary(results: list[Variant]) -> str:
    """One line per (kernel, target, pred dtype, reference, weight mode, warps): how many variants,
    their register range, the most stack and shared memory any uses, and whether every aligned
    variant among them (`Variant.aligned`) has 128-bit global loads."""
    groups: dict[tuple, list[Variant]] = {}
    for v in results:
        key = (
            v.kernel,
            v.arch,
            v.signature.get("pred_ptr", "-").lstrip("*"),
            str(v.constexprs.get("HAS_REF", v.constexprs.get("HAS_REF_PRED", "-"))),
            str(v.constexprs.get("WEIGHT_MODE", v.constexprs.get("HAS_PAIR_WEIGHT", "-"))),
            v.options["num_warps"],
        )
        groups.setdefault(key, []).append(v)
    head = (
        f"{'kernel':<23} {'sm':>3} {'pred':>4} {'ref':>5} {'wmode':>5} {'warps':>5} {'n':>4} "
        f"{'regs':>9} {'stack':>5} {'smem':>5} {'128-bit':>8}"
    )
    lines = [head, "-" * len(head)]
    for key in sorted(groups):
        vs = groups[key]
        ok = [v for v in vs if v.ok]
        if len(ok) < len(vs):
            lines.append(
                f"{key[0]:<23} {key[1]:>3} {key[2]:>4} {key[3]:>5} {key[4]:>5} {key[5]:>5} {len(vs):>4} "
                f"{len(vs) - len(ok)} FAILED"
            )
            continue
        regs = f"{min(v.registers for v in ok)}-{max(v.registers for v in ok)}"
        aligned = [v for v in ok if v.aligned]
        wide = (
            "-" if not aligned else ("all" if all(v.vector_loads.get("128") for v in aligned) else "NOT ALL")
        )
        lines.append(
            f"{key[0]:<23} {key[1]:>3} {key[2]:>4} {key[3]:>5} {key[4]:>5} {key[5]:>5} {len(vs):>4} {regs:>9} "
            f"{max(v.stack for v in ok):>5} {max(v.shared for v in ok):>5} {wide:>8}"
        )
    return "\n".join(lines)


def available_archs() -> list[int]:
    """The targets of ARCHS this Triton can compile for (sm_100 needs Triton's Blackwell ptxas)."""
    from triton import knobs

    archs = [80, 90]
    try:
        if knobs.nvidia.ptxas_blackwell.path:
            archs.append(100)
    except (AttributeError, RuntimeError):
        pass
    return archs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipo.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch", default="auto", help="comma-separated compute capabilities, e.g. 80,90 (auto: all)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every variant with its resources to this file")
    parser.add_argument("--list", action="store_true", help="list the variants without compiling")
    parser.add_argument("--full", action="store_true", help="print every variant, not one line per group")
    args = parser.parse_args(argv)
    _require_compiler()
    archs = available_archs() if args.arch == "auto" else [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--arch {unknown[0]}: known compute capabilities are {', '.join(map(str, ARCHS))}")
    if args.list:
        for arch in archs:
            for v in variants(arch):
                print(v.kernel, arch, v.signature, v.constexprs, v.attrs, v.options)
        return 0
    start = time.perf_counter()
    results = compile_all(archs, args.jobs)
    import triton

    print(table(results) if args.full else summary(results))
    problems = check(results)
    print(
        f"\n{len(results)} variants for sm_{', sm_'.join(map(str, archs))} with Triton {triton.__version__} "
        f"in {time.perf_counter() - start:.0f} s: {sum(v.ok for v in results)} compiled, {len(problems)} problems"
    )
    for line in problems:
        print("PROBLEM", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "variants": [asdict(v) for v in results]}, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
