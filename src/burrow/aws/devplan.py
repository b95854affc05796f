"""What ``burrow dev`` does to each function, and how it undoes it: decided here, sans-I/O.

``plan`` turns a function's configuration (as Lambda returns it) and the developer's local
resources into a ``Target`` (what to change) or a ``Skip`` (why not). ``desired`` gives the
environment and layers to write once the relay's addresses, the token and the layer are known.
``restore`` computes what to write back from three configurations (the original, what burrow
wrote, what the function has now), so that a change someone else made during the session
survives: only the keys burrow changed and nobody touched since go back.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from burrow.aws.envscan import Note, Reference, rewrite, scan

__all__ = [
    "BURROW_KEYS",
    "ENV_LIMIT",
    "MAX_LAYERS",
    "FunctionInfo",
    "LayerNeed",
    "Resource",
    "Restore",
    "Skip",
    "Target",
    "desired",
    "plan",
    "restore",
]

#: Lambda's limit on a function's environment (all keys and values, as JSON).
ENV_LIMIT: Final = 4096
#: Lambda's limit on layers per function.
MAX_LAYERS: Final = 5
#: What the extension reads; a function that already has one is someone's own burrow set-up.
BURROW_KEYS: Final = (
    "BURROW_RELAY",
    "BURROW_TOKEN",
    "BURROW_CONNECT",
    "BURROW_FINGERPRINT",
    "BURROW_CA",
    "BURROW_INSECURE",
)
#: A token as ``burrow.tokens.mint`` makes them for a few services, to size the environment
#: before the real one exists.
TOKEN_SIZE_ESTIMATE: Final = 420

Mode = Literal["private", "public"]


@dataclass(frozen=True)
class FunctionInfo:
    """The parts of a function's configuration that burrow reads or writes."""

    name: str
    arn: str
    env: dict[str, str]
    layers: tuple[str, ...]
    runtime: str | None = None
    package_type: str = "Zip"
    architectures: tuple[str, ...] = ("x86_64",)
    subnets: tuple[str, ...] = ()
    vpc_id: str | None = None
    revision: str | None = None
    last_update: str | None = None

    @classmethod
    def from_aws(cls, config: Mapping[str, Any]) -> FunctionInfo:
        """From a ``GetFunctionConfiguration`` / ``ListFunctions`` item."""
        variables = (config.get("Environment") or {}).get("Variables") or {}
        vpc = config.get("VpcConfig") or {}
        return cls(
            name=str(config["FunctionName"]),
            arn=str(config.get("FunctionArn") or config["FunctionName"]),
            env={str(k): str(v) for k, v in variables.items()},
            layers=tuple(str(layer["Arn"]) for layer in config.get("Layers") or ()),
            runtime=config.get("Runtime"),
            package_type=str(config.get("PackageType") or "Zip"),
            architectures=tuple(config.get("Architectures") or ("x86_64",)),
            subnets=tuple(vpc.get("SubnetIds") or ()),
            vpc_id=vpc.get("VpcId") or None,
            revision=config.get("RevisionId"),
            last_update=config.get("LastUpdateStatus"),
        )

    @property
    def arch(self) -> str:
        return self.architectures[0] if self.architectures else "x86_64"


@dataclass(frozen=True)
class Resource:
    """A resource on the developer's machine: ``--local NAME=PORT``, and how it is reached."""

    name: str
    port: int
    service: str  # the private service's name on the relay
    public: tuple[str, int] | None = None  # --public: the relay's host and port for it


@dataclass(frozen=True)
class LayerNeed:
    """Which build of the extension a function can run: the Python-runtime layer (small) for
    Python runtimes, the standalone one for every other runtime."""

    kind: Literal["python", "standalone"]
    arch: str
    python: str | None = None  # "3.12" for the Python-runtime layer

    def describe(self) -> str:
        what = f"python{self.python}" if self.kind == "python" else "standalone"
        return f"{what}, {self.arch}"


@dataclass
class Target:
    """A function to change: the references that a resource covers, and its layer."""

    info: FunctionInfo
    references: list[Reference]
    unmatched: list[Reference] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    layer: LayerNeed | None = None

    def ports(self) -> list[int]:
        return sorted({ref.port for ref in self.references})


@dataclass
class Skip:
    info: FunctionInfo
    reason: str
    references: list[Reference] = field(default_factory=list)
    #: No local reference at all: not worth a line of its own in the human output.
    quiet: bool = False


def layer_need(info: FunctionInfo) -> LayerNeed:
    runtime = info.runtime or ""
    if runtime.startswith("python3."):
        return LayerNeed("python", info.arch, runtime[len("python") :])
    return LayerNeed("standalone", info.arch)


def env_size(env: Mapping[str, str]) -> int:
    return len(json.dumps(dict(env), separators=(",", ":"), ensure_ascii=False).encode())


def plan(
    info: FunctionInfo,
    resources: Sequence[Resource],
    mode: Mode,
    *,
    routes: Mapping[str, bool | None] | None = None,
    relay_host: str = "",
    standalone: bool = True,
    layer_given: bool = False,
) -> Target | Skip:
    """Change ``info``, or skip it with a reason a developer can act on.

    ``routes`` says, for each of the function's subnets, whether it has a route out (a NAT):
    None when it could not be told. ``standalone`` says whether a layer for non-Python
    runtimes can be had; ``layer_given`` that the user named one layer for every function.
    """
    found = scan(info.env)
    by_port = {r.port: r for r in resources}
    if not found.references:
        reason = "refers to nothing local"
        if found.notes:
            reason += f" ({'; '.join(f'{n.key}: {n.message}' for n in found.notes)})"
        return Skip(info, reason, quiet=not found.notes)
    matched = [ref for ref in found.references if ref.port in by_port]
    unmatched = [ref for ref in found.references if ref.port not in by_port]
    if not matched:
        ports = ", ".join(str(p) for p in sorted({r.port for r in unmatched}))
        return Skip(
            info,
            f"refers to local port {ports}, which no --local names "
            f"(add --local NAME={sorted({r.port for r in unmatched})[0]})",
            unmatched,
        )
    owned = [key for key in BURROW_KEYS if key in info.env]
    if owned:
        return Skip(info, f"already set up for burrow ({owned[0]} is set); left alone", matched)
    route = _route_problem(info, routes, relay_host)
    if route is not None:
        return Skip(info, route, matched)
    layer: LayerNeed | None = None
    if mode == "private":
        if info.package_type == "Image":
            return Skip(
                info,
                "a container image takes no layers: use --public, or build burrow's "
                "extension into the image",
                matched,
            )
        if len(info.layers) >= MAX_LAYERS:
            return Skip(info, f"already has {MAX_LAYERS} layers, Lambda's limit", matched)
        layer = layer_need(info)
        if layer.kind == "standalone" and not standalone and not layer_given:
            return Skip(
                info,
                f"runtime {info.runtime or 'unknown'} needs burrow's standalone extension, "
                "which this install of burrow cannot build: pass --layer-zip or --layer-arn, "
                "or use --public",
                matched,
            )
    target = Target(info, matched, unmatched, found.notes, layer)
    estimate = desired(
        target,
        resources,
        mode,
        relay=f"{relay_host or 'relay.example'}:7835",
        token="x" * TOKEN_SIZE_ESTIMATE,
        fingerprint="sha256:" + "0" * 64,
    )
    if env_size(estimate[0]) > ENV_LIMIT:
        return Skip(
            info,
            f"its environment would pass Lambda's {ENV_LIMIT}-byte limit with burrow's "
            "variables: use --public",
            matched,
        )
    return target


def _route_problem(
    info: FunctionInfo, routes: Mapping[str, bool | None] | None, relay_host: str
) -> str | None:
    """Why this function cannot reach the relay, or None. A function outside a VPC reaches
    the internet; one inside needs a NAT for each subnet, unless the relay is in the VPC."""
    relay_private = _is_private(relay_host)
    if not info.subnets:
        if relay_private:
            return (
                f"not in a VPC, so it cannot reach the relay's private address {relay_host}; "
                "give --function-relay a public address"
            )
        return None
    if relay_private:
        return None  # a relay inside the VPC: reachable without a NAT
    routes = routes or {}
    lacking = [s for s in info.subnets if routes.get(s) is False]
    unknown = [s for s in info.subnets if routes.get(s) is None]
    where = f"in VPC {info.vpc_id or '?'}"
    if lacking:
        return (
            f"{where}: subnet {', '.join(lacking)} has no route to the internet (a NAT), so "
            "it cannot reach the relay; add a NAT gateway, or run a relay inside the VPC and "
            "pass --function-relay ITS_PRIVATE_IP:PORT"
        )
    if unknown:
        return (
            f"{where}: cannot tell whether subnet {', '.join(unknown)} routes to the internet "
            "(ec2:DescribeRouteTables); skipped rather than left broken"
        )
    return None


def _is_private(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_private and not address.is_loopback


def desired(
    target: Target,
    resources: Sequence[Resource],
    mode: Mode,
    *,
    relay: str = "",
    token: str = "",
    fingerprint: str | None = None,
    insecure: bool = False,
    layer_arn: str | None = None,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """The environment and layers to write: references kept (``host.docker.internal`` made
    ``127.0.0.1``, the extension listening where the function dials) and the extension's
    variables added; or, with ``--public``, references pointed at the relay's public ports."""
    info = target.info
    by_port = {r.port: r for r in resources}
    if mode == "public":

        def to_public(ref: Reference) -> tuple[str, int] | None:
            resource = by_port.get(ref.port)
            if resource is None or resource.public is None:
                return None
            host, port = resource.public
            return (f"[{host}]" if ":" in host and ref.form == "url" else host), port

        return rewrite(info.env, target.references, to_public), info.layers
    ipv6 = _ipv6_ports(target.references)

    def to_listener(ref: Reference) -> tuple[str, int] | None:
        if ref.port in ipv6:
            return ref.host, ref.port
        if ref.host.lower() in ("localhost", "127.0.0.1"):
            return ref.host, ref.port
        return "127.0.0.1", ref.port

    env = rewrite(info.env, target.references, to_listener)
    listeners = []
    for port in target.ports():
        listen = "[::1]" if port in ipv6 else "127.0.0.1"
        listeners.append(f"{by_port[port].service}={listen}:{port}")
    env["BURROW_RELAY"] = relay
    env["BURROW_TOKEN"] = token
    env["BURROW_CONNECT"] = ",".join(listeners)
    if insecure:
        env["BURROW_INSECURE"] = "1"
    elif fingerprint:
        env["BURROW_FINGERPRINT"] = fingerprint
    layers = info.layers + ((layer_arn,) if layer_arn else ())
    return env, layers


def _ipv6_ports(references: Sequence[Reference]) -> set[int]:
    """Ports that the function reaches only as ``[::1]``: the extension listens there."""
    ports: dict[int, bool] = {}
    for ref in references:
        ports[ref.port] = ports.get(ref.port, True) and ref.is_ipv6
    return {port for port, only_v6 in ports.items() if only_v6}


# --- restoring -----------------------------------------------------------------------------


@dataclass
class Restore:
    """What to write back: ``env`` and ``layers``; ``kept`` names what someone else changed
    after burrow (left as they made it); ``needed`` is False when nothing of burrow's remains."""

    env: dict[str, str]
    layers: tuple[str, ...]
    kept: list[str]
    needed: bool


def restore(
    original: tuple[Mapping[str, str], Sequence[str]],
    applied: tuple[Mapping[str, str], Sequence[str]],
    current: tuple[Mapping[str, str], Sequence[str]],
) -> Restore:
    """Three-way: each key burrow changed goes back to its original value (or away) if it
    still has burrow's value; one that someone changed since is kept, and named in ``kept``.
    Keys burrow never touched keep whatever they have now. The same for the layer burrow
    added."""
    (orig_env, orig_layers), (app_env, app_layers), (cur_env, cur_layers) = (
        original,
        applied,
        current,
    )
    env = dict(cur_env)
    kept: list[str] = []
    for key in sorted(set(orig_env) | set(app_env)):
        if orig_env.get(key) == app_env.get(key):
            continue  # burrow did not touch it
        now = cur_env.get(key)
        if now != app_env.get(key):
            if now != orig_env.get(key):
                kept.append(key)  # changed again by someone else: theirs
            continue
        if key in orig_env:
            env[key] = orig_env[key]
        else:
            env.pop(key, None)
    added = [layer for layer in app_layers if layer not in orig_layers]
    if list(cur_layers) == list(app_layers):
        layers = tuple(orig_layers)
    else:
        layers = tuple(layer for layer in cur_layers if layer not in added)
        if [x for x in cur_layers if x not in added] != [x for x in orig_layers]:
            kept.append("Layers")
    needed = env != dict(cur_env) or list(layers) != list(cur_layers)
    return Restore(env, layers, kept, needed)
