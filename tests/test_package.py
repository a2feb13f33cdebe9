"""The package without its extension, the backend report, and forcing a backend by environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import warnings, json
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lorenza_kernels as lk
    import lorenza_kernels  # a second import says nothing more
import torch
info = lk.backend_info()
t = torch.zeros(6)
lk.seeded_axpby_([t], 1, 1.0, 0.0, first_stream=1)
print(json.dumps({
    "warnings": [str(w.message) for w in caught if "lorenza_kernels" in str(w.message)],
    "extension": info["extension"],
    "forced": info["forced"],
    "selected": lk._registry.active("seeded_axpby_", "cpu"),
    "values": t.tolist(),
}))
"""


def _run(env_extra: dict) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")]), **env_extra}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPECTED = [-0.1650479, 2.6764474, -1.5598533, 0.7548958, 1.5844943, -0.6431312]  # docs/rng.md, seed 1 stream 1


def test_imports_and_works_without_the_extension():
    res = _run({"LORENZA_KERNELS_NO_EXT": "1"})
    assert res["extension"] is False
    assert res["selected"] == "reference"
    assert len(res["warnings"]) == 1 and "reference" in res["warnings"][0]
    assert res["values"] == pytest.approx(EXPECTED, abs=1e-5)


def test_environment_forces_a_backend():
    res = _run({"LORENZA_KERNELS_BACKEND": "reference"})
    assert res["forced"] == "reference" and res["selected"] == "reference"
    assert res["values"] == pytest.approx(EXPECTED, abs=1e-5)


def test_unknown_backend_in_environment_is_a_clear_error():
    env = {**os.environ, "PYTHONPATH": ROOT, "LORENZA_KERNELS_BACKEND": "fortran"}
    out = subprocess.run([sys.executable, "-c", "import lorenza_kernels"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "LORENZA_KERNELS_BACKEND" in out.stderr and "fortran" in out.stderr
