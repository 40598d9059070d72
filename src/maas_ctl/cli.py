"""`maas-ctl`: the operator API (maas-authz's server.admin_api_addr) from a shell.

    maas-ctl quota USER [--tier T | --groups G,.. | --subscription S] [--model M]
    maas-ctl explain (--user U [--groups G,..] | --credential-file F) (--model M | --path P)
                     [--subscription S] [--tokens N]
    maas-ctl decisions [--denied | --allowed] [--reason R] [--tier T] [--subscription S]
                       [--model M] [--user U] [--limit N] [--follow]
    maas-ctl policy show | policy get PART | policy apply PART FILE [--dry-run]
    maas-ctl purge [--user U]
    maas-ctl usage [--user U] [--subscription S] [--tier T] [--model M] [--month YYYY-MM |
                   --since T --until T] [--tz ZONE] [--group-by day,model,...] [--csv | --records]
    maas-ctl whoami

Every command takes --json (the API's answer as is). The admin API's address comes from --url
or MAAS_ADMIN_URL (default http://127.0.0.1:8090), the admin credential from --token-file or
MAAS_ADMIN_TOKEN (a file keeps it out of the process list and the shell history).

Exit status: 0 done (explain: the request would be allowed); 1 explain: it would be refused;
2 usage or a bad request (the API said 400 or 422); 3 not authenticated or not permitted
(401, 403); 4 the operator API or a backend behind it is unreachable or failing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from maas_common.quota_headers import reset_text

DEFAULT_URL = "http://127.0.0.1:8090"
OK, REFUSED, BAD_REQUEST, NOT_ALLOWED, UNAVAILABLE = 0, 1, 2, 3, 4


class Failure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Client:
    url: str
    token: str
    timeout: float

    def call(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str = ""
    ) -> Any:
        return json.loads(self._read(self._request(method, path, body, content_type)) or b"null")

    def text(self, path: str) -> str:
        """A GET whose answer is text (CSV)."""
        return self._read(self._request("GET", path, None, "")).decode()

    def _read(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as error:
            raise _failure(error) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Failure(UNAVAILABLE, f"cannot reach {self.url}: {reason}") from None

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """Server-sent events' data, as they come (until the server ends the stream)."""
        request = self._request("GET", path, None, "")
        request.add_header("Accept", "text/event-stream")
        try:
            # no read timeout: a quiet stream sends a keep-alive comment every 15 s
            with urllib.request.urlopen(request, timeout=max(self.timeout, 60)) as response:  # noqa: S310
                for raw in response:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except urllib.error.HTTPError as error:
            raise _failure(error) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Failure(UNAVAILABLE, f"cannot reach {self.url}: {reason}") from None

    def _request(
        self, method: str, path: str, body: bytes | None, content_type: str
    ) -> urllib.request.Request:
        url = self.url.rstrip("/") + path  # an http(s) URL: main() checked the scheme
        request = urllib.request.Request(url, data=body, method=method)  # noqa: S310
        request.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        return request


def _failure(error: urllib.error.HTTPError) -> Failure:
    try:
        message = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {error.code}"
    if error.code in (401, 403):
        return Failure(NOT_ALLOWED, f"{error.code}: {message}")
    if error.code in (400, 404, 405, 413, 422):
        return Failure(BAD_REQUEST, f"{error.code}: {message}")
    return Failure(UNAVAILABLE, f"{error.code}: {message}")


def _query(**params: str | int | None) -> str:
    present = {k: str(v) for k, v in params.items() if v not in (None, "")}
    return "?" + urllib.parse.urlencode(present) if present else ""


# --- output ---------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[object]], header: Sequence[str], out: TextIO) -> None:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _limits(limits: Sequence[dict[str, Any]], out: TextIO) -> None:
    rows = []
    for x in limits:
        left = str(x["remaining"])
        if "remaining_after_estimate" in x:
            left += f" ({x['remaining_after_estimate']} after the estimate)"
        would = x.get("would_allow")
        verdict = "allows" if would is True else ("REFUSES" if would is False else "")
        full_in = reset_text(round(x["reset_seconds"] * 1000))
        rows.append([x["name"], x["unit"], x["limit"], left, full_in,
                     verdict + (" (shadow)" if x.get("shadow") else "")])  # fmt: skip
    _table(rows, ["LIMIT", "UNIT", "OF", "REMAINING", "FULL IN", ""], out)


def _decision_line(d: dict[str, Any]) -> str:
    scope = d.get("tier") or d.get("subscription") or "-"
    verdict = "allowed" if d["allowed"] else "DENIED "
    limit = f" limit={d['limit']}" if d.get("limit") else ""
    return (
        f"{d['time'][11:23]} {d['status']} {verdict} {d['reason']}{limit} "
        f"user={d.get('user') or '-'} scope={scope} model={d.get('model') or '-'} {d['path']}"
    )


# --- commands -------------------------------------------------------------------------------------


def cmd_whoami(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.call("GET", "/admin/v1/whoami")
    out.write(json.dumps(answer) + "\n" if args.json else f"{answer['operator']}\n")
    return OK


def cmd_quota(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    query = _query(
        user=args.user,
        tier=args.tier,
        groups=args.groups,
        subscription=args.subscription,
        model=args.model,
    )
    answer = client.call("GET", f"/admin/v1/quota{query}")
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
        return OK
    scope = (
        f"tier {answer['tier']}" if answer.get("tier") else f"subscription {answer['subscription']}"
    )
    model = f", model {answer['model']}" if answer.get("model") else ""
    out.write(f"{answer['user']}: {scope}{model} (from {answer['resolved_from']})\n")
    _limits(answer["limits"], out)
    return OK


def cmd_explain(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {}
    if args.credential_file:
        body["token"] = _read_secret(args.credential_file)
    else:
        body["user"] = args.user
        body["groups"] = [g for g in (args.groups or "").split(",") if g]
    if args.path:
        body["path"] = args.path
    else:
        body["model"] = args.model
    if args.subscription:
        body["subscription"] = args.subscription
    if args.tokens is not None:
        body["tokens"] = args.tokens
    answer = client.call(
        "POST",
        "/admin/v1/explain",
        body=json.dumps(body).encode(),
        content_type="application/json",
    )
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        verdict = {True: "ALLOWED", False: "DENIED", None: "UNKNOWN"}[answer["allowed"]]
        limit = f" ({answer['limit']})" if answer.get("limit") else ""
        out.write(f"{verdict}: {answer['status']} {answer['reason']}{limit}\n")
        for phase in answer["phases"]:
            out.write(f"  {phase['phase']:<13} {phase['result']:<8} {phase.get('detail', '')}\n")
        if answer.get("limits"):
            _limits(answer["limits"], out)
    if answer["allowed"] is None:
        return UNAVAILABLE
    return OK if answer["allowed"] else REFUSED


def cmd_decisions(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    allowed = "true" if args.allowed else ("false" if args.denied else None)
    query = _query(
        allowed=allowed,
        reason=args.reason,
        tier=args.tier,
        subscription=args.subscription,
        model=args.model,
        user=args.user,
        limit=args.limit,
        follow="true" if args.follow else None,
    )
    if args.follow:
        for decision in client.events(f"/admin/v1/decisions{query}"):
            if "unreachable" in decision:  # a replica did not answer: the view is partial
                print(f"maas-ctl: replica unreachable: {decision['unreachable']}", file=sys.stderr)
                continue
            out.write((json.dumps(decision) if args.json else _decision_line(decision)) + "\n")
            out.flush()
        return OK
    answer = client.call("GET", f"/admin/v1/decisions{query}")
    for problem in answer.get("unreachable", []):
        print(f"maas-ctl: replica unreachable: {problem}", file=sys.stderr)
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        for decision in answer["decisions"]:
            out.write(_decision_line(decision) + "\n")
    return OK


def cmd_policy(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "show":
        answer = client.call("GET", "/admin/v1/policy")
        if args.json:
            out.write(json.dumps(answer, indent=2) + "\n")
            return OK
        out.write(f"authorization mode: {answer['authorization']['mode']}\n")
        out.write(f"tiers ({answer['tiers']['source']}):\n")
        by_tier = answer["limits"]["by_tier"]
        for tier in answer["tiers"]["tiers"]:
            limits = ", ".join(
                f"{x['name']} {x['limit']} {x['unit']}/{x['window_seconds']:g}s"
                for x in by_tier.get(tier["name"], [])
            )
            out.write(f"  {tier['name']} (level {tier['level']}): {', '.join(tier['groups'])}\n")
            out.write(f"    limits: {limits or '-'}\n")
        subscriptions = answer.get("subscriptions", {}).get("subscriptions", [])
        if subscriptions:
            out.write(f"subscriptions ({answer['subscriptions']['source']}):\n")
            for sub in subscriptions:
                models = "; ".join(f"{m} {lim}" for m, lim in sub["models"].items())
                out.write(f"  {sub['name']} (priority {sub['priority']}): {models}\n")
        out.write(f"editable: {', '.join(answer.get('editable', [])) or 'nothing'}\n")
        return OK
    if args.action == "get":
        answer = client.call("GET", f"/admin/v1/policy/{urllib.parse.quote(args.part)}")
        out.write(json.dumps(answer, indent=2) + "\n" if args.json else answer["document"])
        return OK
    text = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    dry_run = "true" if args.dry_run else "false"
    answer = client.call(
        "POST",
        f"/admin/v1/policy/{urllib.parse.quote(args.part)}?dry_run={dry_run}",
        body=text,
        content_type="text/yaml",
    )
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        out.write(answer["diff"] if answer["changed"] else "no change\n")
        if answer["dry_run"]:
            out.write(f"dry run: nothing applied to {answer['source']}\n")
        elif answer["applied"]:
            out.write(f"applied to {answer['source']}\n")
    return OK


def cmd_purge(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.call("POST", f"/admin/v1/purge{_query(user=args.user)}", body=b"")
    # (a purge that some replica missed is an HTTP 502: Failure, exit 4, says so)
    if args.json:
        out.write(json.dumps(answer) + "\n")
    else:
        counts = ", ".join(f"{n} {what}" for what, n in answer["purged"].items())
        out.write(f"purged {counts}\n")
    return OK


_TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
_FILTERS = ("user", "subscription", "tier", "model", "key_id", "organization_id", "cost_center")


def cmd_usage(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    params: dict[str, str | int | None] = {name: getattr(args, name) for name in _FILTERS}
    params.update(month=args.month, since=args.since, until=args.until, tz=args.tz)
    if args.records:
        if args.csv:
            out.write(client.text(f"/admin/v1/usage/records{_query(**params, format='csv')}"))
            return OK
        answer = client.call("GET", f"/admin/v1/usage/records{_query(**params, limit=1000)}")
        if args.json:
            out.write(json.dumps(answer, indent=2) + "\n")
            return OK
        columns = ["request_id", "user", "model", "total_tokens", "cost", "status"]
        _table([[r[c] for c in columns] for r in answer["records"]], [c.upper() for c in columns],
               out)  # fmt: skip
        if answer["next"]:
            out.write("(more: use --csv for every record)\n")
        return OK
    params["group_by"] = args.group_by
    if args.csv:
        out.write(client.text(f"/admin/v1/usage{_query(**params, format='csv')}"))
        return OK
    answer = client.call("GET", f"/admin/v1/usage{_query(**params)}")
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
        return OK
    groups = answer.get("group_by", [])
    if groups:
        rows = [[g[k] for k in (*groups, *_TOTALS)] for g in answer["groups"]]
        _table(rows, [k.upper() for k in (*groups, *_TOTALS)], out)
    out.write(
        "total: "
        + ", ".join(f"{answer[k]} {k.replace('_', ' ')}" for k in _TOTALS[:4])
        + f", cost {answer['cost']}\n"
    )
    return OK


# --- the command line -----------------------------------------------------------------------------


def _read_secret(path: str) -> str:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return text.strip()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="maas-ctl",
        description="The MaaS gateway's operator API from a shell (see maas-ctl --help).",
        epilog="Exit status: 0 done/allowed, 1 explain refused, 2 bad request, "
        "3 not authenticated or permitted, 4 unreachable or failing.",
    )
    top.add_argument(
        "--url",
        default=os.environ.get("MAAS_ADMIN_URL", DEFAULT_URL),
        help=f"the operator API (env MAAS_ADMIN_URL, default {DEFAULT_URL})",
    )
    top.add_argument("--token-file", help="a file holding the admin credential "
                     "(else env MAAS_ADMIN_TOKEN)")  # fmt: skip
    top.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    top.add_argument("--json", action="store_true", help="print the API's JSON answer")
    commands = top.add_subparsers(dest="command", required=True)

    commands.add_parser("whoami", help="who the admin credential is").set_defaults(run=cmd_whoami)

    quota = commands.add_parser("quota", help="what a user has left, consuming nothing")
    quota.add_argument("user")
    scope = quota.add_mutually_exclusive_group()
    scope.add_argument("--tier")
    scope.add_argument("--groups", help="comma-separated: the tier they map to")
    scope.add_argument("--subscription", help="namespace/name (needs --model)")
    quota.add_argument("--model", help="namespace/name")
    quota.set_defaults(run=cmd_quota)

    explain = commands.add_parser("explain", help="the whole decision for a request never made")
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a synthetic user (with --groups)")
    who.add_argument("--credential-file", help="the caller's credential, from a file ('-': stdin)")
    explain.add_argument("--groups", help="comma-separated, with --user")
    what = explain.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="namespace/name, or a name as a body names it")
    what.add_argument("--path", help="the request path")
    explain.add_argument("--subscription", help="the X-MaaS-Subscription the client sends")
    explain.add_argument("--tokens", type=int, help="an estimate of the request's tokens")
    explain.set_defaults(run=cmd_explain)

    decisions = commands.add_parser("decisions", help="recent decisions, or --follow them live")
    verdict = decisions.add_mutually_exclusive_group()
    verdict.add_argument("--denied", action="store_true")
    verdict.add_argument("--allowed", action="store_true")
    for name in ("reason", "tier", "subscription", "model", "user"):
        decisions.add_argument(f"--{name}")
    decisions.add_argument("--limit", type=int, help="at most this many recent ones (default 100)")
    decisions.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    decisions.set_defaults(run=cmd_decisions)

    policy = commands.add_parser("policy", help="the effective policy; edit a part of it")
    actions = policy.add_subparsers(dest="action", required=True)
    actions.add_parser("show", help="tiers, limits, subscriptions and where each came from")
    get = actions.add_parser("get", help="a part's document, as its source holds it")
    get.add_argument("part", help="tiers or subscriptions")
    apply = actions.add_parser("apply", help="a new document for a part: validated, then applied")
    apply.add_argument("part", help="tiers or subscriptions")
    apply.add_argument("file", help="the YAML document ('-': stdin)")
    apply.add_argument("--dry-run", action="store_true", help="show the diff, apply nothing")
    policy.set_defaults(run=cmd_policy)

    purge = commands.add_parser("purge", help="drop cached credentials and decisions")
    purge.add_argument("--user", help="only this user's (default: all)")
    purge.set_defaults(run=cmd_purge)

    _usage_parser(commands)
    return top


def _usage_parser(commands: Any) -> None:  # Any: argparse's private _SubParsersAction
    usage = commands.add_parser("usage", help="the usage ledger: totals, by day, records, CSV")
    for name in _FILTERS:
        usage.add_argument(f"--{name.replace('_', '-')}", dest=name)
    when = usage.add_mutually_exclusive_group()
    when.add_argument("--month", help="YYYY-MM (in --tz)")
    when.add_argument("--since", help="2026-12-01, 2026-12-01T00:00:00Z or epoch ms")
    usage.add_argument("--until", help="as --since; exclusive")
    usage.add_argument("--tz", help="the time zone of dates, months and days (default: server's)")
    usage.add_argument("--group-by", help="comma-separated: day, user, model, tier, subscription, "
                       "organization_id, cost_center, key_id")  # fmt: skip
    usage.add_argument("--csv", action="store_true", help="CSV (of the groups, or --records)")
    usage.add_argument("--records", action="store_true", help="the records themselves")
    usage.set_defaults(run=cmd_usage)


def _usage_error(message: str) -> NoReturn:
    print(f"maas-ctl: {message}", file=sys.stderr)
    raise SystemExit(BAD_REQUEST)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)  # argparse exits 2 on a usage error, as we do
    out = out or sys.stdout
    if args.token_file:
        try:
            token = _read_secret(args.token_file)
        except OSError as exc:
            _usage_error(f"cannot read --token-file: {exc.strerror or exc}")
    else:
        token = os.environ.get("MAAS_ADMIN_TOKEN", "")
    if not token:
        _usage_error("no admin credential: set MAAS_ADMIN_TOKEN or pass --token-file")
    if not args.url.startswith(("http://", "https://")):
        _usage_error(f"--url must be an http:// or https:// URL, got {args.url!r}")
    if args.command == "explain" and args.groups and not args.user:
        _usage_error("--groups goes with --user")
    client = Client(args.url, token, args.timeout)
    try:
        status: int = args.run(client, args, out)
    except Failure as failure:
        print(f"maas-ctl: {failure}", file=sys.stderr)
        return failure.status
    except KeyboardInterrupt:
        return OK
    except BrokenPipeError:  # e.g. `maas-ctl decisions -f | head`
        return OK
    return status
