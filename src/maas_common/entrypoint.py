"""The `main()` both servers share: parse flags, load config, log set-up, serve, exit codes.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration problem (one line on
stderr naming file, key and expectation), 1 for anything unexpected.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from maas_common import event_loop
from maas_common.errors import ConfigError
from maas_common.logs import setup_logging
from maas_common.settings import CommandLine, ServerSection, parse_command_line

C = TypeVar("C")
log = logging.getLogger(__name__)


def run_server_main(
    *,
    prog: str,
    description: str,
    env_prefix: str,
    load: Callable[[CommandLine], C],
    server_section: Callable[[C], ServerSection],
    check: Callable[[C, Path], str],
    serve: Callable[[C, Path], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None = None,
    extra_flags: Mapping[str, tuple[str, str]] | None = None,
) -> int:
    try:
        command_line = parse_command_line(
            prog=prog,
            description=description,
            env_prefix=env_prefix,
            argv=argv,
            extra_flags=extra_flags,
        )
        config = load(command_line)
        base_dir = command_line.config.parent if command_line.config else Path.cwd()
        server = server_section(config)
        setup_logging(server.log_level, server.log_format)
        if command_line.check_only:
            print(check(config, base_dir))
            return 0
        event_loop.run(serve(config, base_dir), server.event_loop)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("%s stopped by an unexpected error", prog)
        return 1
    return 0
