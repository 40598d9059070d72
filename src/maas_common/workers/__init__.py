"""Several worker processes serving one gRPC port, under a supervisor.

Python's gRPC server spends a whole core in one process; with SO_REUSEPORT several processes bind
the same port and the kernel spreads incoming connections across them. Two sides, one module each:
:mod:`.supervisor` (the process an operator starts) and :mod:`.worker` (the processes it starts);
:mod:`.handoff` is what they exchange.
"""

from maas_common.workers.handoff import (
    SUPERVISOR_PID_ENV,
    WORKER_DIR_ENV,
    WORKER_INDEX_ENV,
    error_path,
    report_path,
)
from maas_common.workers.supervisor import (
    Supervisor,
    SupervisorSettings,
    WorkerState,
    aggregate_readiness,
    check_port_free,
    describe_exit,
    fan_out_post,
    restart_delay,
    sum_counts,
    worker_readiness_detail,
)
from maas_common.workers.worker import WorkerEnvironment, current_worker, run_worker_main

__all__ = [
    "SUPERVISOR_PID_ENV",
    "WORKER_DIR_ENV",
    "WORKER_INDEX_ENV",
    "Supervisor",
    "SupervisorSettings",
    "WorkerEnvironment",
    "WorkerState",
    "aggregate_readiness",
    "check_port_free",
    "current_worker",
    "describe_exit",
    "error_path",
    "fan_out_post",
    "report_path",
    "restart_delay",
    "run_worker_main",
    "sum_counts",
    "worker_readiness_detail",
]
