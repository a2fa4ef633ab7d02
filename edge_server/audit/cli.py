"""``edge-server audit verify|export|usage DIR...``: the trail's tools, for live and archived folders.

Exit status: 0 when all is well, 1 when a trail does not verify (or a line cannot be read), 2 for
bad usage (an unknown option, a missing folder, no secret to verify with, a bad time).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from edge_server.audit.chain import ChainKeys
from edge_server.audit.export import EventFilter, UnreadableEvent, export_events, usage
from edge_server.audit.verify import verify_paths

__all__ = ["audit_main"]

SECRET_ENV = "EDGE_CLUSTER_SECRET"


class _Usage(Exception):
    """Bad usage: exit 2 with this message."""


def _time(flag: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _Usage(f"{flag}: expected Unix seconds or an ISO 8601 time (2026-12-01T10:00:00Z), "
                     f"got {raw!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _dirs(raw: list[str]) -> list[Path]:
    paths = [Path(p) for p in raw]
    for p in paths:
        if not p.is_dir():
            raise _Usage(f"{p}: not a folder (give audit folders, or one node's folder)")
    return paths


def _filter(args: argparse.Namespace) -> EventFilter:
    since = _time("--since", args.since) if args.since is not None else None
    until = _time("--until", args.until) if args.until is not None else None
    if since is not None and until is not None and until <= since:
        raise _Usage("--until must be later than --since")
    return EventFilter(since, until, tuple(args.tenant or ()), tuple(args.node or ()))


def _secret(args: argparse.Namespace) -> bytes:
    if args.cluster:
        from edge_server.config import ConfigError, load_cluster

        try:
            return load_cluster(args.cluster).secret
        except ConfigError as exc:
            raise _Usage(str(exc)) from None
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise _Usage(f"verify needs the cluster secret: --cluster FILE, or ${SECRET_ENV}")
    return secret.encode()


def _verify(args: argparse.Namespace) -> int:
    keys = ChainKeys(_secret(args))
    try:
        reports = verify_paths(_dirs(args.dirs), keys)
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    for report in reports:
        for warning in report.warnings:
            print(f"{report.node}: warning: {warning}")
        print(report.summary())
    return 0 if all(r.ok for r in reports) else 1


def _export(args: argparse.Namespace) -> int:
    flt, dirs = _filter(args), _dirs(args.dirs)
    out = open(args.output, "wb") if args.output else sys.stdout.buffer  # closed below
    try:
        count = export_events(dirs, out, flt, args.format)
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    print(f"edge-server audit: exported {count} events", file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    table = usage(_dirs(args.dirs), _filter(args))
    if args.format == "json":
        doc = {tenant: {"events": u.events, "tokens": u.tokens, "first_ts": u.first_ts, "last_ts": u.last_ts,
                        "nodes": {n: {"events": e, "tokens": t} for n, (e, t) in sorted(u.nodes.items())}}
               for tenant, u in table.items()}
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if args.format == "csv":
        print("tenant,node,events,tokens")
        for tenant, u in table.items():
            for node, (events, tokens) in sorted(u.nodes.items()):
                print(f"{_csv(tenant)},{_csv(node)},{events},{tokens}")
        return 0
    width = max([len("tenant"), *(len(t) for t in table)])
    print(f"{'tenant':<{width}}  {'node':<12} {'events':>10} {'tokens':>12}")
    for tenant, u in table.items():
        for node, (events, tokens) in sorted(u.nodes.items()):
            print(f"{tenant:<{width}}  {node:<12} {events:>10} {tokens:>12}")
        print(f"{tenant:<{width}}  {'(all)':<12} {u.events:>10} {u.tokens:>12}")
    return 0


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-server audit", description="Check and read audit trails at rest.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check hash chains, signed heads and sequence continuity")
    v.add_argument("dirs", nargs="+", metavar="DIR", help="an audit folder, or one node's folder")
    v.add_argument("--cluster", help=f"cluster file to take the secret from (else ${SECRET_ENV})")
    v.set_defaults(run=_verify)
    for name, run, formats, default, text in (
            ("export", _export, ("jsonl", "csv"), "jsonl", "events, filtered, as JSON lines or CSV"),
            ("usage", _usage, ("text", "json", "csv"), "text", "tokens per tenant per node")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dirs", nargs="+", metavar="DIR", help="an audit folder, or one node's folder")
        p.add_argument("--since", help="events at or after this time (Unix seconds or ISO 8601; UTC if no zone)")
        p.add_argument("--until", help="events before this time")
        p.add_argument("--tenant", action="append", help="only this tenant / key (a glob; repeatable)")
        p.add_argument("--node", action="append", help="only this node (repeatable)")
        p.add_argument("--format", choices=formats, default=default)
        if name == "export":
            p.add_argument("--output", "-o", help="write here instead of standard output")
        p.set_defaults(run=run)
    return parser


def audit_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # exits 2 on bad usage
    try:
        return args.run(args)
    except _Usage as exc:
        print(f"edge-server audit: {exc}", file=sys.stderr)
        return 2
    except UnreadableEvent as exc:
        print(f"edge-server audit: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # piped into head(1)
        return 0
