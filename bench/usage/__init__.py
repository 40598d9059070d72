"""Lua filter vs ext_proc for reading LLM usage, measured on the real Envoy (`make bench-usage`).

    .venv/bin/python -m bench.usage [--quick] [--out PATH] [--keep-work]

Starts, on free loopback ports, an upstream that answers like vLLM (upstream.py), then Envoy as a
plain HTTP proxy to it (no ext_authz, no rate limit), one configuration at a time (envoy.py):

  baseline       no usage reader
  lua            envoy/lua/usage.lua (the gateway's reader), unmodified
  ext_proc       a minimal grpc.aio ext_proc server (extproc.py) doing the response side of the
                 same job: response headers SEND, response body STREAMED, the same 4 KiB-tail scan
                 for the last "usage":{...}, returned as dynamic metadata `maas.usage` at end of
                 stream; failure_mode_allow false, message_timeout 200 ms
  lua-prefilter  usage.lua with a cheaper Scanner:feed (a proposal, CPU rows only)

Rows: `lua+inject` is the lua Envoy with clients that did not ask for usage (the filter injects
stream_options.include_usage and strips the usage event again).

Measures (measure.py), with sequential requests from a raw-socket client (client.py): latency added
to a streamed and to a JSON answer (median, p99 of first byte, first event, last byte); CPU per
token stream and per MB of a bulk stream (utime+stime of Envoy and of the ext_proc server from
/proc). How each reader behaves (usage read, resets, stripping, local replies, large requests,
failures) is not measured here but tested: tests/e2e/test_usage_readers.py, on the same parts.

Each Envoy: --disable-hot-restart --log-level warn --concurrency 1, and a JSON access log of
%DYNAMIC_METADATA(maas.usage)% per request (in all configurations, so its cost is the same):
that is how the run sees what each reader produced. The upstream and the ext_proc server are
child processes (`python -m bench.usage.upstream`, `... .extproc`) started by bench.procs.
Prints tables; writes everything to .bench/usage.json.
"""
