#!/usr/bin/env bash
# `pip wheel --no-build-isolation --no-deps .` makes a wheel that installs into a fresh virtual env
# and imports, with _C inside. The fresh env borrows torch from the build env through a .pth file
# (installing torch again would only re-test pip), everything else comes from the wheel.
set -euo pipefail
PY=${1:-.venv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/lorenza-*.whl)
# The listing is read by Python, not `unzip -l | grep -q`: under pipefail, grep -q leaving at the first
# match can kill unzip with SIGPIPE and fail the pipeline (and unzip need not be installed).
"$PY" - "$wheel" <<'PY' || exit 1
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if not any(n.startswith("lorenza_kernels/_C") and n.endswith((".so", ".pyd")) for n in names):
    sys.exit(f"check_wheel: _C missing from {sys.argv[1]}")
PY
base=$("$PY" -c "import sys; print(sys.base_prefix)")
"$base/bin/python3" -m venv "$work/env"
site=$("$work/env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
echo "$torch_site" > "$site/_borrowed_torch.pth"
"$work/env/bin/python" -m pip install -q --no-deps --no-index "$wheel"
cd "$work"
"$work/env/bin/python" - <<'PY'
import lorenza_kernels as lk, lorenza
info = lk.backend_info()
assert info["extension"], info["extension_error"]
assert lk.__file__.startswith(__import__("sys").prefix), lk.__file__
import torch
t = torch.zeros(10)
lk.seeded_axpby_([t], 1, 1.0, 0.0)
assert torch.allclose(t, lk.gaussian(10, 1, 0))
print("check_wheel: OK,", lk.__file__, "backends:", info["ops"]["seeded_axpby_"])
PY
