"""The operator API (HTTP, JSON) on its own listener, server.admin_api_addr: never the gateway.

Every /admin/v1 route needs `Authorization: Bearer <admin credential>` (admin_auth.py): 401
without one, 403 without the permission. Reads need `get`; purge and policy edits (dry runs
too) need `update`.

  GET  /admin/v1/whoami                     who the credential is
  POST /admin/v1/explain                    the whole decision for a request never made
  GET  /admin/v1/decisions                  recent decisions (filters: allowed, denied, reason,
                                            tier, subscription, model, user; limit)
  GET  /admin/v1/decisions?follow=true      the same, live, as server-sent events
  GET  /admin/v1/quota?user=U               what U has left (tier= / groups= / subscription=,
                                            model=; without them, U's latest decision says)
  GET  /admin/v1/policy                     the effective policy and where each part came from
  GET  /admin/v1/policy/{part}              a part's document as its source holds it
                                            (part: tiers, subscriptions)
  POST /admin/v1/policy/{part}[?dry_run=true]  a new document: validated, diffed, applied
                                            through its source (a dry run applies nothing)
  POST /admin/v1/purge[?user=U]             drop cached credentials and decisions (all, or U's)
  GET  /admin/v1/usage[?group_by=day,...]   the usage ledger's totals (usage_api.py; filters
                                            user, subscription, tier, model, since, until, month)
  GET  /admin/v1/usage/records              its records (JSON pages or format=csv)
  GET  /                                    the console (console.html)

Bad input gets a 400 naming the problem; a backend that cannot answer, a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from maas_authz.admin_auth import AdminAuthenticator, Verb
from maas_authz.credentials import BadCredentials, bearer_token
from maas_authz.decisions import DecisionFilter, DecisionLog, TooManyReaders
from maas_authz.explain import Explainer, ExplainRequest
from maas_authz.peers import PeerAnswers, Peers, PeersUnknown
from maas_authz.policy_edit import PolicyEditor
from maas_authz.quota import Peeker, caller_view, target_of
from maas_authz.usage_api import UsageApi, UsageRequestError
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.workers.supervisor import sum_counts

log = logging.getLogger(__name__)
_MAX_BODY = 1024 * 1024
_KEEPALIVE_SECONDS = 15.0
_OPERATOR = web.RequestKey("operator", str)
_CREDENTIAL = web.RequestKey("credential", str)  # checked by the guard; passed on to the replicas


@dataclass
class OperatorApi:
    auth: AdminAuthenticator
    explainer: Explainer
    decisions: DecisionLog
    peeker: Peeker | None
    policy: Callable[[], Awaitable[dict[str, Any]]]
    purge: Callable[[str | None], dict[str, int]]
    tier_of_groups: Callable[[tuple[str, ...]], str | None]
    editor: PolicyEditor
    # (subscription namespace/name, model namespace/name) -> its token_limits entry, or None
    token_limits_of: Callable[[str, str], str | None]
    on_request: Callable[[str, str], None] = lambda _route, _outcome: None  # metrics
    peers: Peers | None = None  # every replica (peers.py); None: this one only
    usage: UsageApi | None = None  # the usage ledger (usage: in the config); None: not set

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._console),
            web.get("/admin/v1/whoami", self._guard("get", self._whoami)),
            web.post("/admin/v1/explain", self._guard("get", self._explain)),
            web.get("/admin/v1/decisions", self._guard("get", self._decisions)),
            web.get("/admin/v1/quota", self._guard("get", self._quota)),
            web.get("/admin/v1/policy", self._guard("get", self._policy)),
            web.get("/admin/v1/policy/{part}", self._guard("get", self._policy_document)),
            web.post("/admin/v1/policy/{part}", self._guard("update", self._policy_edit)),
            web.post("/admin/v1/purge", self._guard("update", self._purge)),
            web.get("/admin/v1/usage", self._guard("get", self._usage)),
            web.get("/admin/v1/usage/records", self._guard("get", self._usage_records)),
        ]

    # --- authentication ------------------------------------------------------------------------

    def _guard(
        self, verb: Verb, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            route = request.path
            token = bearer_token(request.headers.get("Authorization"), 16384)
            if isinstance(token, BadCredentials):
                self.on_request(route, "unauthenticated")
                return _error(401, token.code, token.message, challenge=True)
            try:
                verdict = await self.auth.check(token, verb)
            except BackendUnavailable as exc:
                self.on_request(route, "unavailable")
                return _error(
                    503, "auth_backend_unavailable", f"cannot check the credential: {exc}"
                )
            if verdict.status == "unauthenticated":
                self.on_request(route, "unauthenticated")
                return _error(401, "invalid_token", "the credential is not an admin credential",
                              challenge=True)  # fmt: skip
            if verdict.status == "forbidden":
                self.on_request(route, "forbidden")
                return _error(
                    403, "forbidden", f"{verdict.operator} may not {verb} the gateway's admin API"
                )
            request[_OPERATOR] = verdict.operator
            request[_CREDENTIAL] = token
            try:
                response = await handler(request)
            except _BadRequest as exc:
                self.on_request(route, "bad_request")
                return _error(400, "bad_request", str(exc))
            except BackendUnavailable as exc:
                self.on_request(route, "unavailable")
                return _error(503, "backend_unavailable", str(exc))
            self.on_request(route, "ok")
            if verb == "update":
                log.info(
                    "admin %s by %s",
                    route,
                    verdict.operator,
                    extra={"query": request.query_string[:200]},
                )
            return response

        return guarded

    # --- the routes ----------------------------------------------------------------------------

    async def _console(self, _request: web.Request) -> web.StreamResponse:
        page = resources.files("maas_authz").joinpath("console.html").read_text()
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                # the page is self-contained: nothing from elsewhere, no inline-script injection
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _whoami(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"operator": request[_OPERATOR]})

    async def _explain(self, request: web.Request) -> web.StreamResponse:
        data = await _json_body(request)
        try:
            explain_request = ExplainRequest.from_json(data)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        return web.json_response(await self.explainer.explain(explain_request))

    async def _decisions(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            wanted = DecisionFilter.from_query(query)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        limit = _int(query, "limit", 100, 0, 10_000)
        follow = query.get("follow") == "true" or "text/event-stream" in request.headers.get(
            "Accept", ""
        )
        if self.peers is not None and query.get("local") != "true":
            return await self._decisions_of_every_replica(request, limit, follow)
        recent = self.decisions.recent(wanted, limit) if limit else []
        if not follow:
            # in time order (Envoy's worker threads send their batches in their own order)
            ordered = sorted(recent, key=lambda d: d.time)
            return web.json_response({"decisions": [d.as_json() for d in ordered]})
        return await self._stream(request, wanted, recent)

    async def _decisions_of_every_replica(
        self, request: web.Request, limit: int, follow: bool
    ) -> web.StreamResponse:
        """Each replica keeps what Envoy sent it: ask them all (peers.py), merge by time."""
        assert self.peers is not None
        token = _token(request)
        query = {k: v for k, v in request.query.items() if k not in ("follow", "local")}
        listing = await self._fan_out(
            "GET", "/admin/v1/decisions", {**query, "local": "true"}, token
        )
        merged = (
            sorted(
                (d for answer in listing.answers for d in answer.get("decisions", [])),
                key=lambda d: d["time"],
            )[-limit:]
            if limit
            else []
        )
        if not follow:
            return web.json_response(
                {
                    "decisions": merged,
                    "replicas": len(listing.answers),
                    "unreachable": listing.unreachable,
                }
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                     "X-Accel-Buffering": "no"}
        )  # fmt: skip
        await response.prepare(request)
        for decision in merged:
            await response.write(_event(decision))
        for problem in listing.unreachable:
            await response.write(_event({"unreachable": problem}, kind="replica"))
        live = urlencode({**query, "local": "true", "follow": "true", "limit": "0"})
        events = self.peers.stream(f"/admin/v1/decisions?{live}", token)
        try:
            while True:
                try:
                    async with asyncio.timeout(_KEEPALIVE_SECONDS):
                        event = await anext(events)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                except StopAsyncIteration:
                    return response
                if "unreachable" in event:
                    await response.write(_event(event, kind="replica"))
                else:
                    await response.write(_event(event))
        finally:
            await events.aclose()

    async def _fan_out(
        self, method: str, path: str, query: dict[str, str], token: str
    ) -> PeerAnswers:
        assert self.peers is not None
        try:
            return await self.peers.call(method, f"{path}?{urlencode(query)}", token)
        except PeersUnknown as exc:
            raise BackendUnavailable("peers", "dns", str(exc)) from None

    async def _stream(
        self, request: web.Request, wanted: DecisionFilter, recent: list[Any]
    ) -> web.StreamResponse:
        try:
            async with self.decisions.follow(wanted) as reader:
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-store",
                        "X-Accel-Buffering": "no",
                    }
                )
                await response.prepare(request)
                for decision in recent:
                    await response.write(_event(decision.as_json(), decision.seq))
                while True:  # until the client goes away (the write fails) or the server stops
                    try:
                        async with asyncio.timeout(_KEEPALIVE_SECONDS):
                            decision = await reader.next()
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
                        continue
                    if decision is None:  # the server is stopping
                        return response
                    await response.write(_event(decision.as_json(), decision.seq))
        except TooManyReaders as exc:
            return _error(503, "too_many_followers", str(exc))

    async def _quota(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        user = query.get("user")
        if not user:
            raise _BadRequest("user= is required")
        if self.peeker is None:
            raise _BadRequest("ratelimit.target is not set: quotas cannot be read")
        entries: dict[str, str] = {}
        source = "query"
        if query.get("tier"):
            entries["tier"] = query["tier"]
        elif query.get("groups"):
            groups = tuple(g for g in query["groups"].split(",") if g)
            tier = self.tier_of_groups(groups)
            if tier is None:
                raise _BadRequest(f"groups {list(groups)} belong to no tier")
            entries["tier"] = tier
            source = "groups"
        elif not query.get("subscription"):
            latest = self.decisions.latest_for(user)
            if latest is None:
                raise _BadRequest(
                    f"no recent decision about {user!r} says their tier: add tier=, groups= "
                    "or subscription= (with model=)"
                )
            source = f"decision {latest.seq} at {latest.time}"
            if latest.tier:
                entries["tier"] = latest.tier
            else:
                entries["subscription"] = latest.subscription
        if query.get("subscription"):
            entries["subscription"] = query["subscription"]
        model = query.get("model")
        if model:
            target = target_of(model)
            if "/" not in model or not isinstance(target, tuple):
                raise _BadRequest("model= must be 'namespace/name' here")
            entries["model"] = model
        entries["user"] = user
        if "subscription" in entries and "tier" not in entries:
            limits = self.token_limits_of(entries["subscription"], entries.get("model", ""))
            if limits is None:
                raise _BadRequest(
                    "a subscription's limits are per model: give model= (namespace/name) of a "
                    "model the subscription includes"
                )
            entries["token_limits"] = limits
        peek = await self.peeker.peek([entries])
        return web.json_response(
            {
                "user": user,
                **{k: v for k, v in entries.items() if k in ("tier", "subscription", "model")},
                "resolved_from": source,
                "limits": [
                    {**caller_view(x), "shadow": x.get("shadow", False)} for x in peek.limits
                ],
            }
        )

    async def _usage(self, request: web.Request) -> web.StreamResponse:
        usage = self._usage_api()
        try:
            return await usage.summary(request)
        except UsageRequestError as exc:
            raise _BadRequest(str(exc)) from None

    async def _usage_records(self, request: web.Request) -> web.StreamResponse:
        usage = self._usage_api()
        try:
            return await usage.records(request)
        except UsageRequestError as exc:
            raise _BadRequest(str(exc)) from None

    def _usage_api(self) -> UsageApi:
        if self.usage is None:
            raise _BadRequest("usage: is not configured: this gateway keeps no usage ledger")
        return self.usage

    async def _policy(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({**await self.policy(), "editable": self.editor.parts})

    async def _policy_document(self, request: web.Request) -> web.StreamResponse:
        name = self._editable(request)
        return web.json_response(await self.editor.read(name))

    async def _policy_edit(self, request: web.Request) -> web.StreamResponse:
        name = self._editable(request)
        dry_run = request.query.get("dry_run", "false")
        if dry_run not in ("true", "false"):
            raise _BadRequest(f"dry_run must be true or false, got {dry_run!r}")
        raw = await _body(request)
        if request.content_type == "application/json":
            data = _json(raw)
            if not isinstance(data, dict) or not isinstance(data.get("document"), str):
                raise _BadRequest('expected {"document": "<the YAML text>"}')
            text = data["document"]
        else:  # the YAML itself (text/yaml, text/plain, application/yaml)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _BadRequest("the document is not UTF-8 text") from None
        try:
            result = await self.editor.edit(name, text, dry_run=dry_run == "true")
        except ConfigError as exc:
            return _error(422, "invalid_policy", str(exc))
        log.info(
            "policy %s %s by %s",
            name,
            "dry run" if result.dry_run else ("applied" if result.applied else "unchanged"),
            request[_OPERATOR],
            extra={"source": result.source},
        )
        return web.json_response(result.as_json())

    def _editable(self, request: web.Request) -> str:
        name = request.match_info["part"]
        if self.editor.part(name) is None:
            editable = ", ".join(self.editor.parts) or "none here"
            raise _BadRequest(f"{name!r} cannot be edited here (editable: {editable})")
        return name

    async def _purge(self, request: web.Request) -> web.StreamResponse:
        user = request.query.get("user") or None
        if self.peers is None or request.query.get("local") == "true":
            return web.json_response({"purged": self.purge(user)})
        # every replica has its own caches: a revocation is instant only once all have purged
        query = {"local": "true", **({"user": user} if user else {})}
        done = await self._fan_out("POST", "/admin/v1/purge", query, _token(request))
        body: dict[str, Any] = {
            "purged": sum_counts(answer.get("purged", {}) for answer in done.answers),
            "replicas": len(done.answers),
            "unreachable": done.unreachable,
        }
        if not done.unreachable:
            return web.json_response(body)
        # not complete: say so with the status, not only in the body
        body["error"] = {
            "code": "partial_purge",
            "message": f"purged on {len(done.answers)} replica(s); not on "
            + "; ".join(done.unreachable),
        }
        return web.json_response(body, status=502)


class _BadRequest(ValueError):
    pass


def _event(data: dict[str, Any], seq: int | None = None, kind: str = "decision") -> bytes:
    """One server-sent event (an id only for one replica's own decisions: merged streams'
    sequence numbers are per replica)."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _token(request: web.Request) -> str:
    """The caller's credential (already checked by the guard), to pass on to the replicas."""
    return request[_CREDENTIAL]


def _int(query: Any, name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise _BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise _BadRequest(f"the body is over {_MAX_BODY} bytes")
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise _BadRequest(f"the body is over {_MAX_BODY} bytes")
    return raw


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise _BadRequest("the body is not valid JSON") from None


async def _json_body(request: web.Request) -> Any:
    return _json(await _body(request))


def _error(status: int, code: str, message: str, *, challenge: bool = False) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="maas-admin"'} if challenge else {}
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )
