"""
Run llama-cpp-python's own server (the peer) with the same AMX
workaround as ds4tw.

llama-cpp-python 0.3.36's ggml segfaults in its AMX matmul on the first
multi-token batch of the Q4_1 demo model on CPUs with AMX; ds4tw loads
with C{use_extra_bufts=False} there (L{ds4tw.open_llama}).
The peer must load the same way, or the comparison is between different
matmul kernels (and the peer crashes). llama_cpp.server has no option
for it, so this launcher patches the default model parameters for the
whole process and then runs the server's own C{main}.

    python -m ds4tw.bench._peer --model M.gguf --port 8001 ...

Covered by tests/unit/test_bench.py (the patch; CI has no peer server,
the full run on the demo model exercises the launcher).
"""

from __future__ import annotations

from typing import Any


def patch_default_params(amx: bool | None = None) -> bool:
    """
    Make every model load without extra buffer types when the CPU has AMX
    (the condition ds4tw itself uses, the CPU's C{amx_tile} flag; C{amx}
    overrides the detection).
    Returns whether it patched.
    """
    from ._report import cpu_info

    if not (cpu_info()[1] if amx is None else amx):
        return False
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    return True


def main() -> None:
    patched = patch_default_params()
    print(f"ds4tw.bench._peer: use_extra_bufts=False patch applied: {patched}", flush=True)
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
