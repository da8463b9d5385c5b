#!/usr/bin/env bash
# Install llama-cpp-python built with llama.cpp's RPC backend (-DGGML_RPC=ON,
# for `twistd ds4tw --rpc` and `ds4tw-rpc-worker`) into a venv:
#
#     scripts/install-llama.sh [PYTHON]      # default: .venv/bin/python
#
# The wheel is built from source once (several minutes: llama.cpp is C++)
# and kept outside the checkout, in ~/.cache/ds4tw-wheels/rpc/ (under
# $XDG_CACHE_HOME if set), keyed by the version and the CMake flags; later
# runs install it from there. A no-op, with no pip call, when the venv
# already has that version with libggml-rpc.
#
# CMAKE_ARGS from the environment is kept and -DGGML_RPC=ON appended, so
#     CMAKE_ARGS="-DGGML_CUDA=on" scripts/install-llama.sh
# gives CUDA and RPC. To change the flags of an installed build, uninstall
# it first (.venv/bin/python -m pip uninstall llama-cpp-python).
# LLAMA_CPP_PYTHON_VERSION picks another version (default: the one ds4tw
# is tested with).
#
# pip's own wheel cache cannot be used: its key ignores CMAKE_ARGS, and a
# wheel built without RPC would be reused silently. Hence --no-binary and
# --no-cache-dir for the build, and this cache instead.
set -euo pipefail
PY=${1:-$(dirname "$0")/../.venv/bin/python}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=ON"
if ! command -v "$PY" >/dev/null; then
    echo "install-llama.sh: no Python at $PY (give a venv's python as the argument)" >&2
    exit 1
fi

# Installed already: that version, with the RPC library.
if "$PY" - "$VERSION" <<'EOF'; then exit 0; fi
import importlib.metadata, importlib.util, os, sys
try:
    ok = importlib.metadata.version("llama-cpp-python") == sys.argv[1]
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
spec = importlib.util.find_spec("llama_cpp")
lib = os.path.join(next(iter(spec.submodule_search_locations)), "lib")
names = ("libggml-rpc.so", "libggml-rpc.dylib", "ggml-rpc.dll")
sys.exit(0 if ok and any(os.path.exists(os.path.join(lib, n)) for n in names) else 1)
EOF

KEY=$(printf '%s' "$ARGS" | sha256sum | cut -c1-12)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ds4tw-wheels/rpc/$VERSION-$KEY"
wheel() { compgen -G "$CACHE/llama_cpp_python-$VERSION-*.whl" | head -n 1; }

if [ -z "$(wheel)" ]; then
    echo "install-llama.sh: building llama-cpp-python $VERSION with CMAKE_ARGS=\"$ARGS\" (several minutes, once; cached in $CACHE)" >&2
    mkdir -p "$(dirname "$CACHE")"
    BUILD=$(mktemp -d "$CACHE.build.XXXXXX")
    trap 'rm -rf "$BUILD"' EXIT
    if ! CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
        "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python --no-cache-dir \
        -w "$BUILD" "llama-cpp-python==$VERSION" >"$BUILD/log" 2>&1; then
        cat "$BUILD/log" >&2
        echo "install-llama.sh: the build failed (log above)" >&2
        exit 1
    fi
    # Moved in whole: a build stopped half-way leaves no wheel in the cache.
    mkdir -p "$CACHE"
    mv "$BUILD"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/
    printf '%s\n' "$ARGS" >"$CACHE/CMAKE_ARGS"
fi

if "$PY" -c 'import importlib.metadata as m; m.version("llama-cpp-python")' 2>/dev/null; then
    # Replaces the build without RPC; its dependencies are there already.
    "$PY" -m pip install -q --force-reinstall --no-deps "$(wheel)"
else
    "$PY" -m pip install -q "$(wheel)"
fi
