"""`maas-ratelimit` / `python -m maas_ratelimit`: the command line of the rate limit service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from maas_common.entrypoint import run_server_main
from maas_ratelimit.app import build_app, check_config, load_config
from maas_ratelimit.config import RateLimitConfig


async def _serve(config: RateLimitConfig, base_dir: Path) -> None:
    app = build_app(config, base_dir)
    await app.runtime.run_until_signal()


def main(argv: Sequence[str] | None = None) -> int:
    return run_server_main(
        prog="maas-ratelimit",
        description="Envoy rate limit service with token buckets for requests and LLM tokens",
        env_prefix="MAAS_RATELIMIT",
        load=load_config,
        server_section=lambda config: config.server,
        check=check_config,
        serve=_serve,
        argv=argv,
    )
