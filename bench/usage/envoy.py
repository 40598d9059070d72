"""Envoy for the usage bench and its tests: a plain proxy to the upstream, with or without a usage
reader, and a JSON access log of what the reader put into `maas.usage`."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Service, http_get
from bench.usage.children import Children
from bench.usage.constants import (
    NS,
    Json,
)
from bench.usage.upstream import compact_json


def lua_filter(script: Path) -> Json:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"filename": str(script)},
        },
    }


LOCAL_REPLIES = {
    "/local401": "direct_response 401 (router)",
    "/local429": "direct_response 429 (router)",
    "/before403": "filter before the reader, 403 (as ext_authz)",
    "/after429": "filter after the reader, 429 (as the rate limit filter)",
}


def responder(path: str, status: int) -> Json:
    """A Lua filter that answers `path` itself: a local reply from that place in the chain."""
    body = compact_json({"error": {"message": f"local reply {status}", "code": status}})
    code = (
        "function envoy_on_request(handle)\n"
        f'  if handle:headers():get(":path") == "{path}" then\n'
        f'    handle:respond({{[":status"] = "{status}"}}, \'{body}\')\n'
        "  end\n"
        "end\n"
    )
    return {
        "name": f"responder{status}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


EXT_PROC_FILTER: Json = {
    "name": "envoy.filters.http.ext_proc",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
        "failure_mode_allow": False,
        "allow_mode_override": False,
        "message_timeout": "0.2s",
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # ext_proc may only write dynamic metadata into namespaces listed here
        "metadata_options": {"receiving_namespaces": {"untyped": [NS]}},
    },
}


def _cluster(name: str, port: int, http2: bool) -> Json:
    cluster: Json = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def envoy_config(
    filters: list[Json], upstream_port: int, extproc_port: int | None, access_log: Path
) -> Json:
    def local(path: str, status: int, message: str) -> Json:
        body = compact_json({"error": {"message": message, "code": status}})
        return {
            "match": {"path": path},
            "direct_response": {"status": status, "body": {"inline_string": body}},
        }

    hcm: Json = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "bench",
                    "domains": ["*"],
                    "routes": [
                        local("/local401", 401, "denied"),
                        local("/local429", 429, "rate limited"),
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "upstream", "timeout": "0s"},
                        },
                    ],
                }
            ],
        },
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                    ".FileAccessLog",
                    "path": str(access_log),
                    "log_format": {
                        "json_format": {
                            "id": "%REQ(X-BENCH-ID)%",
                            "status": "%RESPONSE_CODE%",
                            "flags": "%RESPONSE_FLAGS%",
                            "details": "%RESPONSE_CODE_DETAILS%",
                            "usage": f"%DYNAMIC_METADATA({NS})%",
                        }
                    },
                },
            }
        ],
    }
    clusters = [_cluster("upstream", upstream_port, http2=False)]
    if extproc_port is not None:
        clusters.append(_cluster("ext_proc", extproc_port, http2=True))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


@dataclass
class Envoy:
    service: Service
    admin: int
    port: int
    access_log: Path
    log: Path

    def stats(self, pattern: str = r"^http\.bench\.(lua|ext_proc)\.") -> dict[str, int]:
        query = urllib.parse.quote(pattern)
        text = http_get(f"http://127.0.0.1:{self.admin}/stats?filter={query}")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def cpu(self) -> float:
        return self.service.cpu()

    def log_lines(self, needle: str) -> list[str]:
        return [
            line for line in self.log.read_text(errors="replace").splitlines() if needle in line
        ]

    def entries(self) -> dict[str, Json]:
        if not self.access_log.exists():
            return {}
        out: dict[str, Json] = {}
        for line in self.access_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                out[str(entry.get("id"))] = entry
        return out

    def entry(self, request_id: str, wait: float = 2.0) -> Json | None:
        deadline = time.monotonic() + wait
        while True:
            found = self.entries().get(request_id)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def start_envoy(
    children: Children,
    work: Path,
    name: str,
    filters: list[Json],
    upstream_port: int,
    *,
    extproc_port: int | None = None,
) -> Envoy:
    from maas_demo.envoy import find_envoy  # noqa: PLC0415  (the project's binary lookup)

    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "envoy.yaml"  # JSON is YAML
    access_log = directory / "access.log"
    config.write_text(json.dumps(envoy_config(filters, upstream_port, extproc_port, access_log)))
    admin_path = directory / "admin.address"
    admin_path.unlink(missing_ok=True)
    argv = [
        str(find_envoy()),
        "-c", str(config),
        "--disable-hot-restart",
        "--log-level", "warn",
        "--concurrency", "1",
        "--admin-address-path", str(admin_path),
        "--file-flush-interval-msec", "50",
    ]  # fmt: skip
    service = children.launch(f"envoy-{name}", argv)
    proc = service.process
    assert proc is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy {name} exited; see {directory / 'envoy.log'}")
        if admin_path.exists() and admin_path.read_text().strip():
            admin = int(admin_path.read_text().strip().rsplit(":", 1)[1])
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{admin}/ready").strip() == "LIVE":
                    listeners = json.loads(
                        http_get(f"http://127.0.0.1:{admin}/listeners?format=json")
                    )
                    status = listeners["listener_statuses"][0]
                    port = int(status["local_address"]["socket_address"]["port_value"])
                    return Envoy(service, admin, port, access_log, service.log)
        time.sleep(0.02)
    children.stop(service)
    raise RuntimeError(f"envoy {name} not ready")
