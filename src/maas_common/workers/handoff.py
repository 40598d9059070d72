"""What a supervisor and its workers exchange: environment variables and files.

The supervisor starts each worker with WORKER_* variables naming its slot and a private run
directory; there it leaves the payload (what to serve), and the worker leaves a report once it
serves (its ports) or an error when its configuration is refused. Files are written then renamed,
so neither side ever reads half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORKER_INDEX_ENV = "MAAS_WORKER_INDEX"
WORKER_DIR_ENV = "MAAS_WORKER_DIR"
SUPERVISOR_PID_ENV = "MAAS_WORKER_SUPERVISOR_PID"
# read by prometheus_client when it is imported: workers get it from their first instruction on
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PAYLOAD_FILE = "payload"


def report_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.json"


def error_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.error.json"


def write_json(path: Path, data: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data), encoding="utf-8")
    partial.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
