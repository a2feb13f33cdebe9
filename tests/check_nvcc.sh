#!/usr/bin/env bash
# CI compile check of the CUDA sources; needs nvcc, no GPU and no CUDA build of torch.
#
#  1. every csrc/cuda/*.cu compiles with nvcc -c for each architecture (default sm_80 and sm_90)
#     with setup.py's flags, and again without --use_fast_math on the last one (the kernels pin
#     their intrinsics in inline PTX, so both must build); ptxas warnings (spills, local memory)
#     are errors, and the register / spill report is printed;
#  2. the pybind11 launchers (csrc/cuda/*.cpp) pass g++ -fsyntax-only, when python has pybind11;
#  3. the host self-test of the Philox and Box-Muller code runs, plainly and with each pattern of
#     worst-case intrinsic errors (tests/cuda/philox_gauss_selftest.cu), and the host self-test of
#     the rounding stream's words and integer rounding (tests/cuda/stochastic_round_selftest.cu).
#
# Environment: CUDA_HOME (default: nvcc on PATH, then /usr/local/cuda), LORENZA_CHECK_ARCHS
# (default "80 90"), PYTHON (default python3). Usage: tests/check_nvcc.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc > /dev/null; then
  NVCC="$(command -v nvcc)"
else
  NVCC=/usr/local/cuda/bin/nvcc
fi
[[ -x "$NVCC" ]] || { echo "check_nvcc: no nvcc found (set CUDA_HOME)" >&2; exit 1; }
ARCHS=(${LORENZA_CHECK_ARCHS:-80 90})
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
COMMON=(-std=c++17 -O3 -Xcompiler -fPIC -Icsrc -Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror)

compile() {  # compile SRC ARCH [extra flags...]
  local src="$1" arch="$2"
  shift 2
  if ! "$NVCC" -c "$src" -o "$TMP/out.o" "${COMMON[@]}" -gencode "arch=compute_$arch,code=sm_$arch" "$@" \
    2> "$TMP/log"; then
    cat "$TMP/log" >&2
    echo "check_nvcc: FAILED $src sm_$arch $*" >&2
    exit 1
  fi
  # One line per kernel: name, registers, stack frame and spills.
  awk '/Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); name = substr($0, RSTART, RLENGTH) }
       /bytes stack frame/ { frame = $0; sub(/^ +/, "", frame) }
       /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/)
                                 print name "\t" substr($0, RSTART, RLENGTH) " | " frame }' \
    "$TMP/log" | { command -v c++filt > /dev/null && c++filt || cat; } |
    sed -E 's/^void //; s/[a-z_]+::|\(anonymous namespace\):://g; s/\([^)]*\)//' |
    awk -F '\t' '{ printf "    %-34s %s\n", $1, $2 }'
  echo "  ok  $src sm_$arch $*"
}

shopt -s nullglob
sources=(csrc/cuda/*.cu)
[[ ${#sources[@]} -gt 0 ]] || { echo "check_nvcc: no csrc/cuda/*.cu" >&2; exit 1; }
echo "== nvcc: $("$NVCC" --version | tail -1)"
for src in "${sources[@]}"; do
  for arch in "${ARCHS[@]}"; do
    compile "$src" "$arch" --use_fast_math
  done
  compile "$src" "${ARCHS[-1]}"
done

echo "== launchers (g++ -fsyntax-only)"
if "$PYTHON" -c "import pybind11" 2> /dev/null; then
  CUDA_INC="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
  read -r -a PYINC <<< "$("$PYTHON" -m pybind11 --includes)"
  for src in csrc/cuda/*.cpp; do
    g++ -fsyntax-only -std=c++17 -Wall -Werror -DLORENZA_WITH_CUDA=1 -Icsrc -I"$CUDA_INC" "${PYINC[@]}" "$src"
    echo "  ok  $src"
  done
else
  echo "  skipped: $PYTHON has no pybind11"
fi

echo "== host self-test of csrc/cuda/philox_gauss.cuh"
for err in 0 1 2 3 4; do
  "$NVCC" -std=c++17 -O2 -Icsrc -DLORENZA_MUFU_ERROR=$err tests/cuda/philox_gauss_selftest.cu -o "$TMP/selftest"
  "$TMP/selftest"
done
echo "== host self-test of the rounding stream (csrc/common/stochastic_round.h, rounding4)"
"$NVCC" -std=c++17 -O2 -Icsrc tests/cuda/stochastic_round_selftest.cu -o "$TMP/srtest"
"$TMP/srtest"
echo "check_nvcc: all passed"
