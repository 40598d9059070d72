"""A tiny random-weight Llama model that a real vLLM (CPU) can serve, built once into a cache.

:func:`build_tiny_model` runs ``tiny_model_builder.py`` (beside this file) with the vLLM venv's
python, which has torch, transformers and tokenizers (the project venv has none of them), and
keeps the result in ``CACHE_DIR/tiny-llama-<TINY_MODEL_VERSION>/``. A directory that is complete
(its marker names this version and this builder) is reused; anything else is rebuilt. Building
takes a few seconds and is deterministic (fixed seeds): ~0.46 M parameters, a 512-token byte-level
BPE, a chat template; text is gibberish but token counts are real.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

from tests.support.vllm_server import find_vllm_python, vllm_env

__all__ = ["BUILDER", "TINY_MODEL_VERSION", "build_tiny_model"]

# Bump when the model or tokenizer changes in a way the builder's own text does not show.
TINY_MODEL_VERSION = "1"
BUILDER = pathlib.Path(__file__).with_name("tiny_model_builder.py")
_MARKER = ".maas-tiny-model.json"
_REQUIRED = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def _builder_sha256() -> str:
    return hashlib.sha256(BUILDER.read_bytes()).hexdigest()


def _expected_marker() -> dict[str, str]:
    return {"version": TINY_MODEL_VERSION, "builder_sha256": _builder_sha256()}


def _is_complete(model_dir: pathlib.Path, expected: dict[str, str]) -> bool:
    try:
        marker = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if any(marker.get(k) != v for k, v in expected.items()):
        return False
    return all((model_dir / name).is_file() for name in _REQUIRED)


def build_tiny_model(
    cache_dir: pathlib.Path,
    *,
    python: pathlib.Path | None = None,
    timeout: float = 300.0,
) -> pathlib.Path:
    """The tiny model's directory under ``cache_dir``, building it first if needed.

    ``python`` is the vLLM venv's interpreter (default: :func:`find_vllm_python`). Safe to call
    from several processes at once (a lock file serializes builds). Raises RuntimeError if there
    is no vLLM venv or the build fails.
    """
    cache_dir = pathlib.Path(cache_dir)
    target = cache_dir / f"tiny-llama-{TINY_MODEL_VERSION}"
    expected = _expected_marker()
    if _is_complete(target, expected):
        return target

    interpreter = python or find_vllm_python()
    if interpreter is None:
        raise RuntimeError(
            "no vLLM venv to build the tiny model with: run scripts/provision-vllm.sh"
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".tiny-llama-{TINY_MODEL_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target, expected):  # built by another process while we waited
            return target
        work = pathlib.Path(
            tempfile.mkdtemp(prefix=f".tiny-llama-{TINY_MODEL_VERSION}.", dir=cache_dir)
        )
        try:
            out = work / "model"
            try:
                proc = subprocess.run(
                    [str(interpreter), str(BUILDER), str(out)],
                    cwd=work,
                    env=vllm_env({"PYTHONHASHSEED": "0"}),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"tiny model build timed out after {timeout:.0f}s") from exc
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).splitlines()[-40:]
                raise RuntimeError(
                    f"tiny model build failed (exit {proc.returncode}): {interpreter} {BUILDER}\n"
                    + "\n".join(output)
                )
            missing = [name for name in _REQUIRED if not (out / name).is_file()]
            if missing:
                raise RuntimeError(f"tiny model build left out {missing}; output:\n{proc.stdout}")
            (out / _MARKER).write_text(json.dumps(expected, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    return target
