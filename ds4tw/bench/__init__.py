"""
C{ds4tw-bench}: ds4tw measured side by side with raw llama-cpp-python and
with llama-cpp-python's own server, in one run, on one machine.

The modules, each one concern:

  - L{ds4tw.bench.__main__}: the command line and the order of the run;
  - L{ds4tw.bench._settings}: what one run measures (full, C{--quick});
  - L{ds4tw.bench._workload}: prompts and request bodies, the same for
    every stack;
  - L{ds4tw.bench._sse}: HTTP/chunked/SSE parsing of timed socket reads
    (pure; the client side of every measurement);
  - L{ds4tw.bench._stats}: rates, ratios, gaps and summaries (pure);
  - L{ds4tw.bench._client}: a minimal socket client, sync and asyncio, that
    timestamps every read (minimal so that it steals as little CPU as
    possible from the server on a 2-core machine);
  - L{ds4tw.bench._servers}: starting and always stopping the server
    subprocesses (twistd, the peer, the scripted server);
  - L{ds4tw.bench._peer}: the peer's launcher (llama_cpp.server with the
    same AMX workaround as ds4tw);
  - L{ds4tw.bench._scripted_server}: a ds4tw server on a paced scripted
    engine, for CI smoke runs without a model;
  - L{ds4tw.bench._raw}: raw llama-cpp-python in-process, the physical limit;
  - L{ds4tw.bench._throughput}: decode tok/s, TTFT and prefill over HTTP;
  - L{ds4tw.bench._cancel}: cancel latency from the server's own log;
  - L{ds4tw.bench._keepalive}: the longest silence on a queued, prefilling,
    silently decoding stream;
  - L{ds4tw.bench._many}: many waiting clients (keepalive on time, RSS per
    connection, clean completion or cancellation);
  - L{ds4tw.bench._models}: several models in one server (load and first
    token cold, warm and after an eviction; RSS against the memory budget;
    two models decoding at once against one);
  - L{ds4tw.bench._report}: the JSON document, its schema check, the
    summary table, the targets and the PNG chart.

Covered by tests/unit/test_bench.py and tests/integration/test_bench_smoke.py.
"""
