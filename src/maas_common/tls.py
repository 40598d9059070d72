"""Optional TLS for the gRPC and operator API listeners, for clusters without a mesh.

The certificate and key (a mounted Secret, e.g. cert-manager's) are re-read when their files
change, without a restart: gRPC asks `_GrpcCertificates.fetch` before each handshake (gRPC
core's dynamic credentials; it runs on gRPC's own thread and only stats the files unless they
changed); the HTTP listener's SSLContext is reloaded by `HttpCertificates.watch` every
`reload_interval`. Connections already open keep the certificate they were opened with. A
half-written pair (a Secret mid-update) keeps the previous certificate until a read succeeds.
With `client_ca_file`, clients must present a certificate signed by that CA (mutual TLS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from maas_common.clock import Clock, SystemClock
from maas_common.config import Duration, StrictModel
from maas_common.errors import ConfigError
from maas_common.logs import LogThrottle

log = logging.getLogger(__name__)


class TlsSection(StrictModel):
    cert_file: Path  # PEM certificate chain, leaf first
    key_file: Path  # PEM private key
    client_ca_file: Path | None = None  # set: clients need a certificate signed by this CA
    reload_interval: Duration = 10.0  # how often the HTTP listener looks for a new pair


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    """What tells a rewritten file (Kubernetes swaps a Secret's files by renaming a symlink)."""
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class _Files:
    def __init__(self, section: TlsSection, setting: str) -> None:
        self.section = section
        self.setting = setting
        self.paths = [section.cert_file, section.key_file]
        if section.client_ca_file is not None:
            self.paths.append(section.client_ca_file)
        self.throttle = LogThrottle(SystemClock(), 30.0)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        section = self.section
        ca = section.client_ca_file.read_bytes() if section.client_ca_file else None
        return section.cert_file.read_bytes(), section.key_file.read_bytes(), ca

    def first_read(self) -> tuple[bytes, bytes, bytes | None]:
        """At start: a pair that cannot be read or used fails start-up, naming the key."""
        for key in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self.section, key)
            if path is not None and not path.is_file():
                raise ConfigError(self.setting, key, f"{path}: no such file")
        try:
            cert, key_pem, ca = self.read()
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            probe.load_cert_chain(self.section.cert_file, self.section.key_file)
            if self.section.client_ca_file is not None:
                probe.load_verify_locations(cafile=str(self.section.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                self.setting, "cert_file", f"not a usable PEM certificate and key: {exc}"
            ) from None
        return cert, key_pem, ca

    def failed(self, exc: Exception) -> None:
        self.throttle.log(
            log,
            logging.WARNING,
            "new TLS certificate files could not be loaded (keeping the previous): %s",
            exc,
        )


class _GrpcCertificates:
    """gRPC core calls `fetch` before each handshake, on a thread of its own."""

    def __init__(self, files: _Files) -> None:
        self.files = files
        self.stamp = _stamp(files.paths)
        self.lock = threading.Lock()

    def config(
        self, cert: bytes, key: bytes, ca: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed, else None (keep the current one)."""
        with self.lock:
            try:
                stamp = _stamp(self.files.paths)
                if stamp == self.stamp:
                    return None
                cert, key, ca = self.files.read()
                # checked before handing it over: gRPC would fail every handshake on a bad pair
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                    self.files.section.cert_file, self.files.section.key_file
                )
            except (OSError, ssl.SSLError) as exc:
                self.files.failed(exc)
                return None
            self.stamp = stamp
            log.info("TLS certificate reloaded for the gRPC listener")
            return self.config(cert, key, ca)


def grpc_credentials(section: TlsSection, setting: str = "server.tls") -> grpc.ServerCredentials:
    files = _Files(section, setting)
    cert, key, ca = files.first_read()
    certificates = _GrpcCertificates(files)
    return grpc.dynamic_ssl_server_credentials(
        certificates.config(cert, key, ca),
        certificates.fetch,
        require_client_authentication=ca is not None,
    )


class HttpCertificates:
    """The SSLContext of an HTTP listener, reloaded in place when the files change."""

    def __init__(self, section: TlsSection, setting: str = "server.tls") -> None:
        self.files = _Files(section, setting)
        self.files.first_read()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(self.context)
        self.stamp = _stamp(self.files.paths)

    def _load(self, context: ssl.SSLContext) -> None:
        section = self.files.section
        context.load_cert_chain(section.cert_file, section.key_file)
        if section.client_ca_file is not None:
            context.load_verify_locations(cafile=str(section.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED

    def reload_if_changed(self) -> bool:
        try:
            stamp = _stamp(self.files.paths)
            if stamp == self.stamp:
                return False
            # checked on a scratch context first: a bad pair must not half-replace the live one
            self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            # on the loop's thread, where handshakes run: a few kB from a mounted Secret,
            # once per rotation
            self._load(self.context)
        except (OSError, ssl.SSLError) as exc:
            self.files.failed(exc)
            return False
        self.stamp = stamp
        log.info("TLS certificate reloaded for the operator API listener")
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.files.section.reload_interval)
            self.reload_if_changed()


class ClientTlsSection(StrictModel):
    """TLS to one of our servers (maas-authz's peeks at maas-ratelimit)."""

    ca_file: Path  # the CA that signed the server's certificate
    cert_file: Path | None = None  # with key_file: a client certificate, for mutual TLS
    key_file: Path | None = None
    server_name: str | None = None  # the name to verify, when the target's host is not in it
    reload_interval: Duration = 10.0  # how often the files are looked at for a renewal

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.ca_file, self.cert_file, self.key_file) if p is not None]

    def channel(self, target: str, setting: str) -> grpc.aio.Channel:
        """A TLS channel to `target` from the files as they are now (ConfigError if unusable)."""
        cert_file, key_file = self.cert_file, self.key_file
        try:
            ca = self.ca_file.read_bytes()
            cert = cert_file.read_bytes() if cert_file else None
            key = key_file.read_bytes() if key_file else None
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            # gRPC would only fail the handshakes: files that cannot work are refused here
            probe.load_verify_locations(cadata=ca.decode())
            if cert_file is not None and key_file is not None:
                probe.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(setting, "tls", f"cannot be read: {exc}") from None
        if (cert is None) != (key is None):
            raise ConfigError(setting, "tls", "cert_file and key_file go together")
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(target, credentials, options=options)


class ReloadingClientChannel:
    """A TLS client channel that follows its files: at most every reload_interval, `current()`
    stats them; when they changed (a renewed client certificate, a rotated CA) and can be used,
    the next calls go on a new channel and the old one closes once its calls are done. Files that
    cannot be used keep the previous channel (a warning at most every 30 s)."""

    CLOSE_GRACE = 10.0  # the old channel's calls get this long to finish

    def __init__(
        self, section: ClientTlsSection, target: str, setting: str, clock: Clock | None = None
    ) -> None:
        self._section = section
        self._target = target
        self._setting = setting
        self._clock = clock or SystemClock()
        try:
            self._stamp = _stamp(section.paths)
        except OSError as exc:
            raise ConfigError(setting, "tls", f"cannot be read: {exc}") from None
        self._channel = section.channel(target, setting)
        self._next_check = self._clock.monotonic() + section.reload_interval
        self._closing: set[asyncio.Task[None]] = set()
        self._throttle = LogThrottle(SystemClock(), 30.0)
        self.reloads = 0

    def current(self) -> grpc.aio.Channel:
        now = self._clock.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._section.reload_interval
            self._reload_if_changed()
        return self._channel

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self._section.paths)
            if stamp == self._stamp:
                return
            channel = self._section.channel(self._target, self._setting)
        except (OSError, ConfigError) as exc:
            self._throttle.log(
                log,
                logging.WARNING,
                "%s: new TLS client files could not be used (keeping the previous): %s",
                self._setting,
                exc,
            )
            return
        old, self._channel, self._stamp = self._channel, channel, stamp
        self.reloads += 1
        log.info("%s: TLS client certificate reloaded", self._setting)
        task = asyncio.get_running_loop().create_task(old.close(grace=self.CLOSE_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self._channel.close()
        for task in list(self._closing):
            await task
