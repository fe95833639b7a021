"""The one prepared GPU check: every measurement vipo owes to a GPU, in one command.

    benchmarks/gpu_check.sh --dry-run            # on a CPU: rehearse every step (imports, arguments)
    benchmarks/gpu_check.sh [--out DIR]          # on an H100/H200: run them, <= 9.5 minutes

A lent GPU machine has torch and Triton but not diffusers or PyAV (nor DALI, deepspeed): carry
wheels in .whl/ (`../shared/tools/gpu-wheels.sh diffusers==0.42.1 importlib_metadata==10.2.0
av==18.1.0`, 42 MB); gpu_check.sh installs them into a private folder. vipo itself is imported
from this checkout (no install).

Steps, in order of what they prove; each has a time limit, all of them share --budget seconds,
and a step that fails or runs out of time does not stop the next:

    environment   the device, its SM count and memory, versions, which optional packages import
    kernel-tests  `pytest -m gpu tests/kernels`: the compiled kernels against float64 on the GPU
    bench-kernel  benchmarks/bench_kernel.py: fused vs eager vs torch.compile, bandwidth vs a copy
    step-sd15-512, step-sdxl-1024
                  benchmarks/bench_step.py: vipo's training step vs the official-style baseline
    step-wan-720p vipo's Wan2.1-1.3B step at 1280x720, 21 frames, one GPU (context parallel 1)
    bench-loader  benchmarks/bench_loader.py: JPEG and clip decoding (PyAV and DALI where carried)

Every result lands in one folder (--out, default $OUT where the device tool sets it), at most 8
files: environment.json, kernel-tests.xml, kernel.json, step.json, loader.json, summary.json and
log.txt; the last thing printed is a summary table.

After the run, on any CPU: `python benchmarks/plan_vs_measured.py step.json --out FILE` sets
`vipo plan`'s traced peak of each measured vipo step beside its max_memory_allocated.

--dry-run runs each step's CPU rehearsal instead (the kernel tests collected, the benchmarks at
smoke size on CPU), with the packages the GPU image lacks made unimportable, and reports which
wheels are still to be carried.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# On the GPU image, as KINDS.md lists it: missing there, never carried (too large or not needed).
ABSENT_ON_GPU_IMAGE = ("deepspeed", "nvidia.dali")
# Missing there and carried as wheels: module -> (wheel, the steps that need it).
CARRIED = {
    "diffusers": ("diffusers==0.42.1", ("step-sd15-512", "step-sdxl-1024", "step-wan-720p")),
    "importlib_metadata": (
        "importlib_metadata==10.2.0",
        ("step-sd15-512", "step-sdxl-1024", "step-wan-720p"),
    ),
    "av": ("av==18.1.0", ("bench-loader",)),
}
DEFAULT_BUDGET_S = 570


@dataclass
class Step:
    name: str
    what: str
    command: list[str]  # on the GPU
    rehearsal: list[str] | None  # on CPU with --dry-run (None: the same command)
    timeout_s: int
    needs: tuple[str, ...] = ()  # modules; missing -> skipped with the reason
    result: str | None = None  # the file it writes, for the summary
    status: str = "not run"
    seconds: float = 0.0
    headline: str = ""
    notes: list[str] = field(default_factory=list)


def steps(out: Path, py: str, scratch: Path) -> list[Step]:
    bench = ROOT / "benchmarks"
    return [
        Step(
            "kernel-tests",
            "compiled kernels vs float64 on the GPU",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "tests/kernels",
                f"--junitxml={out / 'kernel-tests.xml'}",
            ],
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "--collect-only",
                "tests/kernels",
            ],
            timeout_s=90,
            result="kernel-tests.xml",
        ),
        Step(
            "bench-kernel",
            "fused loss vs eager vs torch.compile",
            [py, str(bench / "bench_kernel.py"), "--out", str(out / "kernel.json")],
            [py, str(bench / "bench_kernel.py"), "--smoke", "--out", str(scratch / "kernel.json")],
            timeout_s=100,
            result="kernel.json",
        ),
        Step(
            "step-sd15-512",
            "SD1.5 512px training step, vipo vs baseline",
            [py, str(bench / "bench_step.py"), "sd15-512", "--out", str(out / "step.json")],
            [py, str(bench / "bench_step.py"), "sd15-512", "--smoke", "--out", str(scratch / "step.json")],
            timeout_s=110,
            needs=("diffusers",),
            result="step.json",
        ),
        Step(
            "step-sdxl-1024",
            "SDXL 1024px training step, vipo vs baseline",
            [py, str(bench / "bench_step.py"), "sdxl-1024", "--out", str(out / "step.json")],
            [py, str(bench / "bench_step.py"), "sdxl-1024", "--smoke", "--out", str(scratch / "step.json")],
            timeout_s=130,
            needs=("diffusers",),
            result="step.json",
        ),
        Step(
            "step-wan-720p",
            "Wan2.1-1.3B 720p training step, one GPU, no context parallelism (21 frames: 21,600 tokens a clip)",
            [py, str(bench / "bench_step.py"), "wan-720p", "--frames", "21", "--steps", "3", "--no-baseline"]
            + ["--out", str(out / "step.json")],
            [
                py,
                str(bench / "bench_step.py"),
                "wan-720p",
                "--smoke",
                "--no-baseline",
                "--out",
                str(scratch / "step.json"),
            ],
            timeout_s=100,
            needs=("diffusers",),
            result="step.json",
        ),
        Step(
            "bench-loader",
            "JPEG and clip decoding rates",
            [py, str(bench / "bench_loader.py"), "--out", str(out / "loader.json")],
            [py, str(bench / "bench_loader.py"), "--smoke", "--out", str(scratch / "loader.json")],
            timeout_s=40,
            needs=("av",),
            result="loader.json",
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The environment a step runs in


def _importable(module: str, env: dict) -> bool:
    code = f"import importlib, sys; importlib.import_module({module!r})"
    return (
        subprocess.run(
            [env.get("VIPO_PYTHON", sys.executable), "-c", code], env=env, capture_output=True, timeout=120
        ).returncode
        == 0
    )


def vipo_path(scratch: Path) -> str | None:
    """A folder that makes `import vipo.engine` etc. find this checkout without an install (the
    GPU image has no registry to install from): vipo/<part> links to each part. None where vipo
    is importable already (an editable install)."""
    if (
        importlib.util.find_spec("vipo") is not None
        and importlib.util.find_spec("vipo.benchmarks") is not None
    ):
        return None
    shim = scratch / "vipo-src" / "vipo"
    shim.mkdir(parents=True, exist_ok=True)
    for part in ("engine", "kernels", "loaders", "configs", "benchmarks"):
        link = shim / part
        if not link.exists():
            link.symlink_to(ROOT / part, target_is_directory=True)
    return str(shim.parent)


def blocker(scratch: Path, modules: tuple[str, ...]) -> str:
    """A folder whose sitecustomize makes `modules` unimportable: the GPU image, rehearsed on CPU."""
    folder = scratch / "gpu-image"
    folder.mkdir(parents=True, exist_ok=True)
    # Absent as on the image: find_spec answers None (so `is_X_available()` checks say no) and an
    # import raises ModuleNotFoundError, though the packages are installed here.
    (folder / "sitecustomize.py").write_text(
        "import importlib.machinery as _m\n"
        f"_BLOCKED = {tuple(modules)!r}\n"
        "_find = _m.PathFinder.find_spec.__func__\n"
        "def _find_spec(cls, name, path=None, target=None):\n"
        "    if any(name == b or name.startswith(b + '.') for b in _BLOCKED):\n"
        "        return None\n"
        "    return _find(cls, name, path, target)\n"
        "_m.PathFinder.find_spec = classmethod(_find_spec)\n"
    )
    return str(folder)


def environment(out: Path, env: dict, py: str) -> dict:
    code = (
        "import json, platform, torch, triton\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "        'triton': triton.__version__, 'cuda_available': torch.cuda.is_available()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(device=p.name, sm_count=p.multi_processor_count, capability=f'{p.major}.{p.minor}',\n"
        "                memory_gib=round(p.total_memory / 2**30, 1))\n"
        "print(json.dumps(info))\n"
    )
    proc = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    info = (
        json.loads(proc.stdout.strip().splitlines()[-1])
        if proc.returncode == 0
        else {"error": proc.stderr[-2000:]}
    )
    info["optional_modules"] = {
        m: _importable(m, env) for m in (*CARRIED, *ABSENT_ON_GPU_IMAGE, "vipo.engine")
    }
    info["host"] = platform.node()
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = smi.stdout.strip()
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def carried_wheels() -> dict[str, str | None]:
    """module -> the carried wheel file in .whl/ (or .whl-parts/), None where it is missing."""
    found = {}
    for module, (spec, _) in CARRIED.items():
        name = spec.split("==")[0].replace("-", "_").lower()
        files = [
            p.name
            for folder in (ROOT / ".whl", ROOT / ".whl-parts")
            if folder.is_dir()
            for p in folder.iterdir()
            if p.name.lower().replace("-", "_").startswith(name + "_")
        ]
        found[module] = files[0] if files else None
    return found


# ---------------------------------------------------------------------------------------------
# Headlines for the summary table, read from each step's result file


def headline(step: Step, out: Path) -> str:
    if step.result is None:
        return ""
    path = out / step.result
    if not path.is_file():
        return "no result file"
    try:
        if step.name == "kernel-tests":
            import xml.etree.ElementTree as ET

            suite = ET.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            a = suite.attrib
            passed = int(a["tests"]) - int(a["failures"]) - int(a["errors"]) - int(a["skipped"])
            return f"{passed} passed, {a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped"
        data = json.loads(path.read_text())
        if step.name == "bench-kernel":
            cells = []
            for row in data["rows"]:
                cell = f"{row['shape_name']} x{row['speedup_vs_eager']:.1f} eager"
                if "speedup_vs_compiled" in row:
                    cell += f" x{row['speedup_vs_compiled']:.1f} compile"
                cells.append(cell + f" {row['fused_share_of_copy_bandwidth']:.0%} copy-bw")
            return "; ".join(cells)
        if step.name.startswith("step-"):
            recipe = step.name.removeprefix("step-")
            report = [r for r in data["runs"] if r["target"]["name"] == recipe][-1]
            vipo, ratios = report["runs"]["vipo"], report.get("ratios") or {}
            cells = [f"vipo {vipo['pairs_per_s']:.2f} pairs/s"]
            cells += [f"{k} x{v:.2f} of baseline" for k, v in ratios.items() if isinstance(v, (int, float))]
            return ", ".join(cells)
        if step.name == "bench-loader":
            cells = [
                f"{r['kind']} {r.get('codec') or ''} {r['backend']} "
                + (
                    f"{r['pairs_per_s']:.0f} pairs/s"
                    if "pairs_per_s" in r
                    else f"{r.get('frames_per_s', 0):.0f} frames/s"
                )
                for r in data["rows"]
                if "pairs_per_s" in r or "frames_per_s" in r
            ]
            cells += [f"{k} {v:.2f}x" for k, v in data.get("ratios", {}).items()]
            return "; ".join(" ".join(c.split()) for c in cells)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return f"unreadable result ({type(exc).__name__}: {exc})"
    return ""


# ---------------------------------------------------------------------------------------------


def run(args) -> int:
    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="vipo-gpu-check-"))
    out = Path(args.out or os.environ.get("OUT") or scratch / "out")
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w", encoding="utf-8")
    py = sys.executable
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    paths = [
        p for p in (vipo_path(scratch), blocker(scratch, ABSENT_ON_GPU_IMAGE) if args.dry_run else None) if p
    ]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    info = environment(out, env, py)
    mode = f"dry run on {platform.machine()} CPU" if args.dry_run else info.get("device", "no CUDA device")
    print(
        f"gpu_check: {mode}; torch {info.get('torch')}, triton {info.get('triton')}; results in {out}",
        flush=True,
    )
    if not args.dry_run and not info.get("cuda_available"):
        print("gpu_check: no CUDA device here; rehearse with --dry-run", file=sys.stderr)
        return 2
    wheels = carried_wheels()
    to_carry = [CARRIED[m][0] for m, f in wheels.items() if f is None]
    missing_modules = [m for m, ok in info["optional_modules"].items() if not ok]

    plan = steps(out, py, scratch)
    if args.only:
        unknown = set(args.only) - {s.name for s in plan}
        if unknown:
            print(
                f"gpu_check: --only {', '.join(sorted(unknown))}: steps are {', '.join(s.name for s in plan)}",
                file=sys.stderr,
            )
            return 2
        plan = [s for s in plan if s.name in args.only]
    for step in plan:
        absent = [m for m in step.needs if m in missing_modules]
        if absent:
            step.status = "skipped"
            step.headline = f"needs {', '.join(absent)}: carry {', '.join(CARRIED[m][0] for m in absent)}"
            continue
        left = args.budget - (time.monotonic() - start)
        timeout = int(min(step.timeout_s, left))
        if timeout < 10:
            step.status, step.headline = "skipped", "out of budget"
            continue
        command = step.rehearsal if args.dry_run and step.rehearsal else step.command
        print(f"--- {step.name}: {step.what} (limit {timeout} s)", flush=True)
        log.write(f"\n--- {step.name}: {' '.join(command)}\n")
        log.flush()
        began = time.monotonic()
        try:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            step.status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired:
            step.status = "timeout"
        step.seconds = time.monotonic() - began
        log.flush()
        if step.status != "ok":
            step.headline = _tail(out)
        elif args.dry_run and step.name == "kernel-tests":
            step.headline = next(
                (line for line in reversed(_log_lines(out)) if "collected" in line), "collected"
            )
        else:
            step.headline = headline(step, scratch if args.dry_run else out)
    log.close()

    rows = [(s.name, s.status, f"{s.seconds:.0f}", s.headline) for s in plan]
    summary = {
        "dry_run": args.dry_run,
        "environment": info,
        "total_s": round(time.monotonic() - start, 1),
        "steps": [
            dict(
                name=s.name,
                what=s.what,
                status=s.status,
                seconds=round(s.seconds, 1),
                headline=s.headline,
                command=" ".join(s.rehearsal if args.dry_run and s.rehearsal else s.command),
            )
            for s in plan
        ],
        "wheels_to_carry": to_carry,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'step':<{width}}  {'status':<11} {'s':>4}  headline")
    for name, status, seconds, text in rows:
        print(f"{name:<{width}}  {status:<11} {seconds:>4}  {text}")
    print(f"total {summary['total_s']:.0f} s of a {args.budget} s budget; results in {out}")
    if to_carry:
        print(f"wheels still to carry in .whl/: ../shared/tools/gpu-wheels.sh {' '.join(to_carry)}")
    return 1 if any(s.status not in ("ok", "skipped") for s in plan) else 0


def _log_lines(out: Path) -> list[str]:
    return (out / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()


def _tail(out: Path, lines: int = 3) -> str:
    return " | ".join(_log_lines(out)[-lines:])[-300:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse every step on a CPU")
    parser.add_argument("--out", help="results folder (default: $OUT, else a temporary folder)")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
