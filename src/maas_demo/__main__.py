"""`python -m maas_demo`: run the local stack in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from maas_demo.stack import TOPOLOGIES, LocalStack, Ports, StackError

CURL_HELP = """
The MaaS gateway is up on {url}
({path} -> demo model llm/tiny; the platform's default limits)

The operator console: {console}  (admin key sk-demo-admin; sk-demo-viewer reads only)
  and from a shell (maas-ctl --help):
  MAAS_ADMIN_URL={console} MAAS_ADMIN_TOKEN=sk-demo-admin .venv/bin/maas-ctl decisions -f
  Policy edits go to {workdir}/config/ (copied afresh from the package at every start).
  Usage ledger ({workdir}/ledger.db, kept across restarts):
  curl -s '{console}admin/v1/usage?user=demo-enterprise&group_by=day' \\
       -H 'Authorization: Bearer sk-demo-admin'
  MAAS_ADMIN_URL={console} MAAS_ADMIN_TOKEN=sk-demo-admin .venv/bin/maas-ctl usage --records

  # what the caller has left (consumes nothing)
  curl -s {url}/v1/quota -H 'Authorization: Bearer sk-demo-free'

  # free tier, allowed
  curl -s {url}/llm/tiny/v1/chat/completions -H 'Authorization: Bearer sk-demo-free' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"tiny","messages":[{{"role":"user","content":"Hello!"}}],"max_tokens":8}}'

  # streaming, premium tier
  curl -sN {url}/llm/tiny/v1/chat/completions -H 'Authorization: Bearer sk-demo-premium' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"tiny","messages":[{{"role":"user","content":"Hi"}}],"stream":true}}'

  # the free tier allows 5 requests per 2 minutes: the 6th gets 429 with Retry-After
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' \\
       {url}/llm/tiny/v1/chat/completions -H 'Authorization: Bearer sk-demo-free' \\
       -H 'Content-Type: application/json' \\
       -d '{{"messages":[{{"role":"user","content":"hi"}}]}}'; done

  # the free tier has 100 LLM tokens per minute, charged after each answer: here the 4th gets 429
  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{{http_code}}\\n' \\
       {url}/llm/tiny/v1/chat/completions -H 'Authorization: Bearer sk-demo-tokens' \\
       -H 'Content-Type: application/json' \\
       -d '{{"messages":[{{"role":"user","content":"a long story"}}],"max_tokens":40}}'; done

  # 401 (no key), 403 (no access to the model), 404 (no model in the path)
  curl -si {url}/llm/tiny/v1/chat/completions -d '{{}}'
  curl -si {url}/llm/tiny/v1/chat/completions -H 'Authorization: Bearer sk-demo-noaccess' -d '{{}}'
  curl -si {url}/nothing -H 'Authorization: Bearer sk-demo-free'

  # MaaS's subscription flow: an sk-oai- key, the model named in the body
  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer sk-oai-demobasic_DemoBasicSecret1' \
       -H 'Content-Type: application/json' \
       -d '{{"model":"tiny","messages":[{{"role":"user","content":"Hello!"}}],"max_tokens":8}}'

  # subscription demo-small: 10 tokens a minute, so the 3rd gets 429
  for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}}\n' {url}/v1/chat/completions \
       -H 'Authorization: Bearer sk-oai-demosmall_DemoSmallSecret1' \
       -H 'Content-Type: application/json' \
       -d '{{"model":"tiny","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4}}'; done

  # the servers themselves
  .venv/bin/grpcurl -plaintext 127.0.0.1:{authz_grpc} list
{ratelimit_grpcurl}  curl -s http://127.0.0.1:{authz_http}/metrics | grep maas_authz_decisions
  curl -s http://127.0.0.1:{limiter_http}/metrics | grep maas_ratelimit_decisions

Keys: sk-demo-free, sk-demo-tokens (free), sk-demo-premium, sk-demo-enterprise,
sk-demo-budget (trial: 200 tokens a month, then 429 budget_exceeded), sk-demo-noaccess
(tiers); sk-oai-demobasic_DemoBasicSecret1, sk-oai-demosmall_DemoSmallSecret1,
sk-oai-demorevoked_DemoRevokedSecret1 (subscriptions).
Logs: {logs}.  Ctrl-C stops everything.
"""


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m maas_demo", description=__doc__)
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("MAAS_DEMO_PORT", "8080")),
        help="Envoy's listening port (env MAAS_DEMO_PORT, default 8080)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--quiet", action="store_true", help="do not echo the servers' logs")
    parser.add_argument(
        "--topology", choices=TOPOLOGIES, default=os.environ.get("MAAS_DEMO_TOPOLOGY", "two-hop"),
        help="two-hop: maas-authz and maas-ratelimit; one-hop: maas-authz alone, limiting "
        "inline (env MAAS_DEMO_TOPOLOGY, default two-hop)",
    )  # fmt: skip
    args = parser.parse_args()

    # During start-up a signal interrupts at once (LocalStack.start stops what it started);
    # afterwards it only asks the loop below to stop everything in order.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    stack = LocalStack(
        args.workdir, Ports(envoy=args.port), echo=not args.quiet, topology=args.topology
    )
    try:
        stack.start()
    except (StackError, FileNotFoundError) as exc:
        print(f"demo: could not start the stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted during start-up; stopped", file=sys.stderr)
        return 130
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    p = stack.ports
    print(
        CURL_HELP.format(
            url=stack.gateway_url,
            authz_grpc=p.authz_grpc,
            authz_http=p.authz_http,
            path=(
                "Envoy -> maas-authz, limiting inline (one hop)"
                if args.topology == "one-hop"
                else "Envoy -> maas-authz -> maas-ratelimit"
            ),
            ratelimit_grpcurl=(
                ""
                if args.topology == "one-hop"
                else f"  .venv/bin/grpcurl -plaintext 127.0.0.1:{p.ratelimit_grpc} list\n"
            ),
            limiter_http=stack.limiter_http_port,
            logs=args.workdir.resolve(),
            console=f"http://127.0.0.1:{p.authz_admin}/",
            workdir=args.workdir.resolve(),
        ),
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            dead = stack.dead_child()
            if dead is not None:
                print(f"demo: {dead.name} exited; stopping.\n{dead.log_tail()}", file=sys.stderr)
                return 1
    finally:
        stack.stop()
        print("demo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
