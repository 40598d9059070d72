"""`maas-authz` / `python -m maas_authz`: the command line of the authorization server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from maas_authz.app import build_app, check_config, load_config
from maas_authz.config import AuthzConfig
from maas_common.entrypoint import run_server_main


async def _serve(config: AuthzConfig, base_dir: Path) -> None:
    app = await build_app(config, base_dir)
    await app.runtime.run_until_signal()


def main(argv: Sequence[str] | None = None) -> int:
    return run_server_main(
        prog="maas-authz",
        description="Envoy external authorization server for Models as a Service",
        env_prefix="MAAS_AUTHZ",
        load=load_config,
        server_section=lambda config: config.server,
        check=check_config,
        serve=_serve,
        argv=argv,
    )
