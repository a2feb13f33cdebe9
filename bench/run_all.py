"""Run every benchmark in bench/ (``bench_*.py``) in one go, and merge what they measured.

Each script runs in its own process (a crash or an out-of-memory in one does not stop the others)
with ``--json <tmp> --device <device>`` (and ``--quick`` when given). Written beside each other:

  bench/results/<device-slug>.json   {"environment", "benches": {name: its JSON, or its failure}}
  bench/results/<device-slug>.md     one markdown table per benchmark, failures with their output

The exit status is 1 when any benchmark failed, after both files are written.

  python bench/run_all.py [--quick] [--device cpu|cuda] [--only seeded_ops,optimizer_step]
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common


def discover(bench_dir: str, only: str | None) -> list[str]:
    scripts = sorted(glob.glob(os.path.join(bench_dir, "bench_*.py")))
    if only:
        wanted = {w.strip().removeprefix("bench_").removesuffix(".py") for w in only.split(",") if w.strip()}
        scripts = [s for s in scripts if name_of(s) in wanted]
        missing = wanted - {name_of(s) for s in scripts}
        if missing:
            raise SystemExit(f"run_all: no bench_<name>.py in {bench_dir} for {sorted(missing)}")
    return scripts


def name_of(script: str) -> str:
    return os.path.basename(script)[len("bench_") : -len(".py")]


def run_one(script: str, device: str, quick: bool, timeout: float | None) -> dict:
    """Run one benchmark; its JSON, or {"error", "returncode", "output_tail"}; "seconds" either way."""
    root = os.path.dirname(os.path.abspath(os.path.dirname(script)))
    env = dict(os.environ)
    # A checkout works without `pip install -e .`: the repo and python_api come first on the path.
    paths = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "python_api")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, script, "--json", out, "--device", device] + (["--quick"] if quick else [])
        print(f"\n=== {' '.join(os.path.relpath(c) if c == script else c for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            output, code = output + f"\n[timed out after {timeout} s]", None
        seconds = time.perf_counter() - t0
        print(output, end="" if output.endswith("\n") else "\n", flush=True)
        tail = output[-4000:]
        if code != 0:
            return {"error": f"exit status {code}", "returncode": code, "output_tail": tail, "seconds": seconds}
        try:
            with open(out) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            return {
                "error": f"no JSON written ({type(e).__name__}: {e})",
                "returncode": code,
                "output_tail": tail,
                "seconds": seconds,
            }
    data["seconds"] = seconds
    return data


def markdown(merged: dict) -> str:
    env = merged["environment"]
    quick = ", quick sizes" if merged["quick"] else ""
    about = f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['time']}{quick}"
    lines = [f"# Benchmarks on {env['device']}", "", f"{about}; written by `bench/run_all.py`.", ""]
    for name, data in merged["benches"].items():
        lines += [f"## {name} (`bench/bench_{name}.py`, {data.get('seconds', 0):.0f} s)", ""]
        if "error" in data:
            lines += [
                f"**failed**: {data['error']}",
                "",
                "```",
                data.get("output_tail", "").rstrip()[-2000:],
                "```",
                "",
            ]
            continue
        report = common.Report(data.get("bench", name), "cpu")
        report.rows = [common.Row(**row) for row in data.get("rows", [])]
        lines += [report.table() if report.rows else "(no rows)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma list of benchmark names (bench_<name>.py)")
    p.add_argument("--bench-dir", default=HERE)
    p.add_argument("--results-dir", default=None, help="default: <bench-dir>/results")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    args = p.parse_args(argv)
    scripts = discover(args.bench_dir, args.only)
    if not scripts:
        raise SystemExit(f"run_all: no bench_*.py in {args.bench_dir}")
    t0 = time.perf_counter()
    benches = {name_of(s): run_one(s, args.device, args.quick, args.timeout) for s in scripts}
    slug = common.device_slug(args.device)
    merged = {
        "device_slug": slug,
        "quick": args.quick,
        "environment": common.environment(args.device),
        "benches": benches,
        "seconds": time.perf_counter() - t0,
    }
    results = args.results_dir or os.path.join(args.bench_dir, "results")
    os.makedirs(results, exist_ok=True)
    json_path, md_path = os.path.join(results, f"{slug}.json"), os.path.join(results, f"{slug}.md")
    with open(json_path, "w") as f:
        json.dump(merged, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(merged))
    failed = [n for n, d in benches.items() if "error" in d]
    print(
        f"\nrun_all: {len(benches) - len(failed)}/{len(benches)} benchmarks ok in {merged['seconds']:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; wrote {json_path} and {md_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
