#!/usr/bin/env bash
# Build the C++ example against the tvm-ffi headers and libtvm_runtime.so from the pip wheels.
#   examples/cpp/build.sh                       # -> examples/cpp/build/sige_run
#   python examples/cpp/prepare.py m.host.sige /tmp/work && examples/cpp/build/sige_run /tmp/work
# PYTHON defaults to the repository's .venv. Not part of CI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
ffi="$("$PYTHON" -c 'import tvm_ffi, os; print(os.path.dirname(tvm_ffi.__file__))')"
tvmlib="$("$PYTHON" -c 'import importlib.util, os; s = importlib.util.find_spec("tvm"); print(os.path.join(list(s.submodule_search_locations)[0], "lib"))')"
mkdir -p "$here/build"
"${CXX:-g++}" -std=c++17 -O2 -o "$here/build/sige_run" "$here/sige_run.cc" \
  -I"$ffi/include" -L"$ffi/lib" -L"$tvmlib" \
  -Wl,--no-as-needed -ltvm_ffi -ltvm_runtime -Wl,-rpath,"$ffi/lib" -Wl,-rpath,"$tvmlib"
echo "built $here/build/sige_run"
