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

from ds4tw import no_extra_buffers


def main() -> None:
    from llama_cpp.server.__main__ import main as server_main

    with no_extra_buffers() as patched:
        print(f"ds4tw.bench._peer: use_extra_bufts=False patch applied: {patched}", flush=True)
        server_main()


if __name__ == "__main__":
    main()
