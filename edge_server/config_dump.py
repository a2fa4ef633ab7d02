"""Writing a cluster file: :func:`dump_cluster` is the exact inverse of :func:`edge_server.config.parse_cluster`.

Kept apart from the parser so that each module has one job; everything that writes a cluster file (the
workbench, the benchmarks, the tests) builds a :class:`~edge_server.config.ClusterConfig` and calls this.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from edge_server.config import ClusterConfig, ConfigError

__all__ = ["dump_cluster", "write_cluster"]


def dump_cluster(config: ClusterConfig) -> str:
    """The cluster file of ``config``: the exact inverse of :func:`parse_cluster`.

    ``parse_cluster(tomllib.loads(dump_cluster(c)), source=c.source) == c`` for every valid config (a
    property test holds it to that), so everything that writes a cluster file -- the workbench, the
    benchmarks, the tests -- builds a :class:`ClusterConfig` and calls this instead of formatting TOML
    of its own.  A field equal to its dataclass default is left out (the parser takes the same
    default), which keeps files short and readable; the tables are written from the dataclass fields,
    so a new setting is written as soon as it exists.  ``audit_dir`` is written as held: a relative
    one is read back relative to the file's folder.  The secret is written too (on reading,
    ``$EDGE_CLUSTER_SECRET`` still wins over it).
    """
    try:
        secret = config.secret.decode()
    except UnicodeDecodeError:
        raise ConfigError(config.source, "cluster.secret", "a UTF-8 secret (a TOML string)", "<hidden>") from None
    out = ["[cluster]", f"secret = {_toml_value(secret)}",
           f"gossip_interval_ms = {_toml_value(float(config.gossip_interval_ms))}",
           f"mode = {_toml_value(config.mode)}", f"audit_dir = {_toml_value(os.fspath(config.audit_dir))}"]
    out += _toml_fields(config, ("max_keys", "key_idle_ttl_s", "peer_timeout_ms"))
    for region in config.regions:
        out += ["", "[[regions]]", f"name = {_toml_value(region.name)}"]
        for node in region.nodes:
            out += ["", "[[regions.nodes]]", f"id = {_toml_value(node.id)}", f"host = {_toml_value(node.host)}",
                    f"port = {_toml_value(node.port)}"]
    for rule in config.limits:
        out += ["", "[[limits]]", f"pattern = {_toml_value(rule.pattern)}", f"rate = {_toml_value(float(rule.rate))}",
                f"burst = {_toml_value(float(rule.burst))}"]
    if config.api_keys:
        out += ["", "[api_keys]"] + [f"{_toml_value(k)} = {_toml_value(t)}" for k, t in config.api_keys.items()]
    for table, value in (("skill", config.skill), ("server", config.server), ("router", config.router),
                         ("audit", config.audit), ("strict", config.strict)):
        lines = _toml_fields(value, tuple(f.name for f in fields(value)))
        if lines:
            out += ["", f"[{table}]", *lines]
    return "\n".join(out) + "\n"


def write_cluster(path: str | os.PathLike[str], config: ClusterConfig) -> Path:
    """Write :func:`dump_cluster` of ``config`` to ``path`` (parent folders created); the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dump_cluster(config), encoding="utf-8")
    return p


def _toml_fields(obj: Any, names: tuple[str, ...]) -> list[str]:
    """``name = value`` lines for the fields of dataclass ``obj`` that differ from their default."""
    lines = []
    by_name = {f.name: f for f in fields(obj)}
    for name in names:
        f = by_name[name]
        value = getattr(obj, name)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        if default is not MISSING and value == default:
            continue
        if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # the parser reads every number as a float where it wants one
        lines.append(f"{name} = {_toml_value(value)}")
    return lines


def _toml_value(value: Any) -> str:
    """One TOML value: string, bool, integer, float (inf and nan too), array or inline table."""
    if isinstance(value, str):
        # JSON's escapes are all valid TOML; TOML also forbids a raw DEL (ensure_ascii would split
        # characters outside the BMP into surrogate escapes, which TOML refuses).
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, os.PathLike):
        return _toml_value(os.fspath(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}: {value!r}")
