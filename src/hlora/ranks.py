"""Each client's LoRA rank, per module: rank policies (``--rank-policy``) and per-layer ranks (``--layer-ranks``).

A rank spec is ``N``, ``LOW-HIGH`` or ``N,M,...`` (:func:`hlora.config.parse_ranks`). A policy turns a spec
into one rank per client:

* ``uniform``: LOW-HIGH drawn uniformly, seeded (``--ranks``: numpy stream ``[seed, 1]``, as always);
* ``list``: N,M,... assigned cyclically (client k gets the (k mod len)-th);
* ``data``: the rank grows with the client's number of examples n_k, linearly in log n:
  ``r_k = LOW + round((HIGH - LOW) * (1 - log(n_max / n_k) / span))``, ``span = max(log(n_max / n_min), log 2)``.
  The largest client gets HIGH; the smallest LOW when the sizes span at least a factor of 2. Sizes that differ
  by less (an IID split) all stay near HIGH rather than being spread over LOW..HIGH by a few examples;
* ``file``: ``--rank-file``, a CSV of ``client,rank`` rows (an optional header), one row per client.

Without ``--rank-policy`` the spec's form chooses: LOW-HIGH is ``uniform``, N,M,... ``list`` (and ``N`` is
the same under both): exactly the ranks of runs made before the option existed.

``--layer-ranks "query:2-4,value:8"`` gives the modules whose name matches a pattern (as ``--target-modules``
does: the name, or its last dotted parts) their own spec, assigned per client under ``--rank-policy``
``uniform``, ``list`` or ``data`` when given, otherwise by the spec's own form (a ``file`` policy sets the
clients' ``--ranks`` only). Pattern j draws from stream ``[seed, 1, j + 1]``. The modules no pattern names
keep the client's ``--ranks`` rank.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from hlora.config import ConfigError, RunConfig, draw_ranks, parse_ranks

RANK_POLICIES = ("uniform", "list", "data", "file")


def policy_of(cfg: RunConfig) -> str:
    """The rank policy in force: ``--rank-policy``, or ``file`` with a ``--rank-file``, or the spec's form."""
    if cfg.rank_policy:
        return cfg.rank_policy
    if cfg.rank_file:
        return "file"
    return "uniform" if parse_ranks(cfg.ranks)[0] == "range" else "list"


def layer_policy(cfg: RunConfig, spec: str) -> str:
    """The policy of a ``--layer-ranks`` spec: ``--rank-policy`` uniform, list or data, else the spec's form."""
    if cfg.rank_policy in ("uniform", "list", "data"):
        return cfg.rank_policy
    return "uniform" if parse_ranks(spec)[0] == "range" else "list"


def check_spec(spec: str, policy: str, option: str) -> None:
    """Refuse a spec the policy cannot assign (one line)."""
    kind, values = parse_ranks(spec)
    if policy in ("uniform", "data") and kind == "list" and len(values) > 1:
        raise ConfigError(f"--rank-policy {policy} takes LOW-HIGH (or N); {option} {spec} is a list "
                          f"(assigned cyclically by --rank-policy list)")
    if policy == "list" and kind == "range":
        raise ConfigError(f"--rank-policy list takes N,M,...; {option} {spec} is a range (drawn by "
                          f"--rank-policy uniform)")


def parse_layer_ranks(value: object) -> dict[str, str]:
    """``"query:2-4,value:8"`` or a mapping {pattern: spec} -> {pattern: spec as text}, each spec checked."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str):
        pairs = []
        for item in _split_items(value):
            pattern, sep, spec = item.partition(":")
            if not sep:
                raise ConfigError(f"--layer-ranks takes PATTERN:SPEC,... (e.g. query:2-4,value:8); got {item!r}")
            pairs.append((pattern, spec))
    else:
        raise ConfigError(f"layer_ranks takes a mapping (pattern: ranks) or PATTERN:SPEC,...; got {value!r}")
    out: dict[str, str] = {}
    for pattern, spec in pairs:
        pattern, spec = pattern.strip(), spec.strip()
        if not pattern or not spec:
            raise ConfigError(f"--layer-ranks: each item is PATTERN:SPEC (e.g. value:8); got {pattern}:{spec}")
        if pattern in out:
            raise ConfigError(f"--layer-ranks names {pattern!r} twice")
        try:
            parse_ranks(spec)
        except ConfigError as e:
            raise ConfigError(f"--layer-ranks {pattern}: {e}") from None
        out[pattern] = spec
    return out


def _split_items(text: str) -> list[str]:
    """``"query:2,4,8,value:8"``: a comma starts a new item only where the next part has a colon."""
    items: list[str] = []
    for part in text.split(","):
        if ":" in part or not items:
            items.append(part)
        else:
            items[-1] += "," + part
    return [i for i in items if i.strip()]


def read_rank_file(path: str | Path, clients: int) -> list[int]:
    """``client,rank`` rows (an optional header row) -> the rank of clients 0..clients-1; one line per mistake."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--rank-file {p}: no such file")
    ranks: dict[int, int] = {}
    with p.open(newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            row = [c.strip() for c in row]
            if not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise ConfigError(f"{p}:{line}: expected two columns client,rank; got {','.join(row)!r}")
            if line == 1 and not row[0].lstrip("-").isdigit():  # a header
                continue
            try:
                client = int(row[0])
            except ValueError:
                raise ConfigError(f"{p}:{line}: the client id must be an integer, got {row[0]!r}") from None
            try:
                rank = int(row[1])
            except ValueError:
                raise ConfigError(f"{p}:{line}: the rank must be an integer, got {row[1]!r}") from None
            if not 0 <= client < clients:
                raise ConfigError(f"{p}:{line}: client {client} is not one of 0..{clients - 1} (--clients {clients})")
            if client in ranks:
                raise ConfigError(f"{p}:{line}: client {client} is given twice")
            if rank < 1:
                raise ConfigError(f"{p}:{line}: client {client}'s rank must be at least 1, got {rank}")
            ranks[client] = rank
    missing = [k for k in range(clients) if k not in ranks]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(f"--rank-file {p}: no rank for client {shown} (--clients {clients})")
    return [ranks[k] for k in range(clients)]


def data_ranks(low: int, high: int, sizes: list[int]) -> list[int]:
    """LOW..HIGH linear in log n_k: the largest client HIGH, a client with ``span`` less log-data LOW."""
    sizes = [max(int(n), 1) for n in sizes]
    n_max, n_min = max(sizes), min(sizes)
    span = max(math.log(n_max / n_min), math.log(2))
    return [low + math.floor((high - low) * (1 - math.log(n_max / n) / span) + 0.5) for n in sizes]


def assign(spec: str, policy: str, sizes: list[int], seed: int, stream: int) -> list[int]:
    """One rank per client for one spec (``stream`` 0: ``--ranks``; j + 1: the j-th ``--layer-ranks`` pattern)."""
    kind, values = parse_ranks(spec)
    clients = len(sizes)
    if kind == "range" and policy == "data":
        return data_ranks(values[0], values[1], sizes)
    if stream == 0 or kind == "list":
        return draw_ranks(spec, clients, seed)
    rng = np.random.default_rng([seed, 1, stream])
    return rng.integers(values[0], values[1] + 1, size=clients).tolist()


def client_ranks(cfg: RunConfig, sizes: list[int] | None = None) -> tuple[list[int], list[dict[str, int]]]:
    """Each client's ``--ranks`` rank, and (with ``--layer-ranks``) its rank for each pattern ({} otherwise).

    ``sizes``: the clients' numbers of examples (the ``data`` policy); None before the data is partitioned
    (equal sizes: every ``data`` client at HIGH, for the checks made before anything loads).
    """
    policy = policy_of(cfg)
    sizes = [1] * cfg.clients if sizes is None else list(sizes)
    if policy == "file":
        ranks = read_rank_file(cfg.rank_file, cfg.clients)
    else:
        ranks = assign(cfg.ranks, policy, sizes, cfg.seed, 0)
    patterns = cfg.layer_ranks or {}
    per_pattern = {
        pat: assign(spec, layer_policy(cfg, spec), sizes, cfg.seed, j + 1)
        for j, (pat, spec) in enumerate(patterns.items())
    }
    layers = [{pat: per_pattern[pat][k] for pat in patterns} for k in range(cfg.clients)] if patterns else []
    return ranks, layers


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern as ``--target-modules`` does: the name or its last dotted parts."""
    return name == pattern or name.endswith("." + pattern)


def check_patterns(modules: list[str], patterns: list[str]) -> None:
    """Every pattern names an adapted module, and no module is named by two patterns."""
    for pat in patterns:
        if not any(matches(m, pat) for m in modules):
            some = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise ConfigError(f"--layer-ranks {pat}: no adapted layer matches; they are: {', '.join(some)}")
    for m in modules:
        hit = [p for p in patterns if matches(m, p)]
        if len(hit) > 1:
            raise ConfigError(f"--layer-ranks: {m} matches both {hit[0]!r} and {hit[1]!r}")


def module_ranks(modules: list[str], rank: int, layer: dict[str, int]) -> dict[str, int]:
    """One client's rank per module: its pattern's rank, or its ``--ranks`` rank where no pattern matches."""
    out = {}
    for m in modules:
        hit = [p for p in layer if matches(m, p)]
        out[m] = layer[hit[0]] if hit else rank
    return out
