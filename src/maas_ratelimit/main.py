"""`maas-ratelimit` / `python -m maas_ratelimit`: the command line of the rate limit service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from maas_common.entrypoint import run_server_main
from maas_ratelimit.app import build_app, check_config, load_config
from maas_ratelimit.config import RateLimitConfig

# settings a deployment sets per pod (k8s/components/ledger sets them from the environment)
EXTRA_FLAGS = {
    "ledger.url": ("--ledger-url", "the usage ledger: sqlite:///FILE or postgresql://..."),
    "ledger.password_file": ("--ledger-password-file", "the ledger database's password, a file"),
    "ledger.spool_dir": ("--ledger-spool-dir", "this process's usage journal (a directory)"),
}


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
        extra_flags=EXTRA_FLAGS,
    )
