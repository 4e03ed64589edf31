"""The fleet's inventory: the hosts `gpuprovider fleet` installs nodes on, from a
`fleet.yaml` or from `[user@]host[:port]` on the command line.

Every value that reaches a remote command is checked here against a strict pattern
(names, labels, paths, users, addresses), and remote commands are built with
`shlex.join`: nothing from an inventory is ever passed through a shell unquoted. A bad
inventory is refused whole, naming the line and the field, before any connection."""

from __future__ import annotations

import ipaddress
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuprovider.config import SimulatedGpu

NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
LABEL = NAME  # Ray node labels: the same characters as `node join --label`
USER = r"[a-z_][a-z0-9_-]{0,31}"
# A host name (RFC 1123 labels) or an IP address; never starts with '-', so never an
# option to ssh or anything else.
HOSTNAME = (
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
PATH = r"/[A-Za-z0-9._/+-]*"  # absolute, and only characters no shell gives a meaning
PYTHON = r"(/[A-Za-z0-9._/+-]*|python3(\.[0-9]+)?)"


class InventoryError(ValueError):
    """A malformed inventory or host: the message names the line (or argument) and field."""


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.fullmatch(HOSTNAME, value) or len(value) > 253:
        raise ValueError(
            f"{value!r} is not a host name or IP address (letters, digits, '-' and '.', "
            "not starting with '-')"
        )
    return value


def _user(value: str) -> str:
    if not re.fullmatch(USER, value):
        raise ValueError(f"{value!r} is not a user name (lower-case letters, digits, _ -)")
    return value


def _path(value: str) -> str:
    if not re.fullmatch(PATH, value) or "/../" in value + "/":
        raise ValueError(f"{value!r}: write an absolute path of letters, digits and . _ / + - only")
    return value.rstrip("/") or "/"


class Jump(BaseModel):
    """A jump host (ssh -J): the connection to the host goes through it."""

    model_config = ConfigDict(extra="forbid")
    host: str
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _address(value)

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return _user(value)


class HostFields(BaseModel):
    """What a host entry may say; `defaults:` in fleet.yaml says it for every host."""

    model_config = ConfigDict(extra="forbid")
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None  # a private key file; default: the ssh agent and ~/.ssh
    jump: str | Jump | None = None  # [user@]host[:port], or {host, user, port}
    labels: dict[str, str] = Field(default_factory=dict)
    simulate_gpus: list[str] = Field(default_factory=list)  # MODEL:COUNT for test hosts
    python: str = "python3"  # the host's Python, the node's venv is made with it
    system_site_packages: bool = False  # the venv sees the host's packages (see docs)
    prefix: str = "/opt/gpuprovider"  # the venv, wheels and node.toml
    unit_dir: str = "/etc/systemd/system"
    num_cpus: int | None = Field(None, ge=1)
    node_ip: str | None = None  # the host's address as the Ray head sees it

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return _user(value)

    @field_validator("jump", mode="before")
    @classmethod
    def _jump(cls, value: Any) -> Any:
        if isinstance(value, str):
            user, host, port = split_target(value)
            return Jump(host=host, user=user or "root", port=port or 22)
        return value

    @field_validator("key", "prefix", "unit_dir")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("~/"):  # a key in the operator's home
            value = str(Path(value).expanduser())
        return _path(value)

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if not re.fullmatch(PYTHON, value):
            raise ValueError(f"{value!r}: write python3, python3.N or an absolute path")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            for part in (key, text):
                if not isinstance(part, str) or not re.fullmatch(LABEL, part):
                    raise ValueError(
                        f"label {key}={text!r}: keys and values are letters, digits, "
                        "'.', '_' or '-' (<= 63), starting and ending with a letter or digit"
                    )
        return value

    @field_validator("simulate_gpus")
    @classmethod
    def _gpus(cls, value: list[str]) -> list[str]:
        made = [SimulatedGpu.parse(text) for text in value]
        return [f"{gpu.model}:{gpu.count}" for gpu in made]

    @field_validator("node_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else str(ipaddress.ip_address(value))


class HostEntry(HostFields):
    host: str
    name: str | None = None  # the node's name in the provider; default: the host

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _address(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(NAME, value):
            raise ValueError(f"{value!r}: letters, digits, '.', '_' or '-' (<= 63)")
        return value


class InventoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head: str | None = None  # the Ray head's host:port; default: [backend] address
    defaults: dict[str, Any] = Field(default_factory=dict)
    hosts: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("head")
    @classmethod
    def _head(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r}: write host:port, e.g. 10.0.0.5:6379")
            _address(host.strip("[]"))
        return value


@dataclass(frozen=True)
class Host:
    """One host of the fleet, checked."""

    name: str
    address: str
    user: str
    port: int
    key: str | None
    jump: Jump | None
    labels: dict[str, str]
    simulate_gpus: list[str]
    python: str
    system_site_packages: bool
    prefix: str
    unit_dir: str
    num_cpus: int | None
    node_ip: str | None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def venv(self) -> str:
        return f"{self.prefix}/venv"

    @property
    def config(self) -> str:
        return f"{self.prefix}/node.toml"

    @property
    def wheels(self) -> str:
        return f"{self.prefix}/wheels"

    @property
    def unit(self) -> str:
        return f"{self.unit_dir}/{NODE_UNIT}"


NODE_UNIT = "gpuprovider-node.service"


@dataclass(frozen=True)
class Inventory:
    hosts: list[Host]
    head: str | None = None


def split_target(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (an IPv6 address in brackets) -> (user, host, port); a
    ValueError naming what is wrong. A text starting with '-' is an option, never a host."""
    if text.startswith("-"):
        raise ValueError(f"{text!r} looks like an option, not a host")
    user, at, rest = text.rpartition("@")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise ValueError(f"{text!r}: write [ADDRESS]:PORT")
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, number = rest.partition(":")
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(number)
    else:
        host = rest
    if at and not re.fullmatch(USER, user):
        raise ValueError(f"{text!r}: {user!r} is not a user name")
    return (user if at else None), _address(host), port


def _host(entry: HostEntry) -> Host:
    jump = entry.jump if isinstance(entry.jump, Jump) else None
    return Host(
        name=entry.name or entry.host,
        address=entry.host,
        user=entry.user,
        port=entry.port,
        key=entry.key,
        jump=jump,
        labels=dict(entry.labels),
        simulate_gpus=list(entry.simulate_gpus),
        python=entry.python,
        system_site_packages=entry.system_site_packages,
        prefix=entry.prefix,
        unit_dir=entry.unit_dir,
        num_cpus=entry.num_cpus,
        node_ip=entry.node_ip,
    )


def check_key_file(path: str, where: str) -> None:
    """A private key readable by others is refused, as ssh refuses it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise InventoryError(f"{where}: key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InventoryError(
            f"{where}: key {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {path}"
        )


def from_targets(targets: list[str], defaults: dict[str, Any] | None = None) -> Inventory:
    """Hosts named on the command line (`fleet add gpu-07 root@10.0.0.8:2222`)."""
    hosts = []
    for target in targets:
        try:
            user, host, port = split_target(target)
            fields = dict(defaults or {})
            fields.update(host=host)
            if user:
                fields["user"] = user
            if port:
                fields["port"] = port
            entry = HostEntry(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"]))
            raise InventoryError(f"host {target!r}: {field}: {error['msg']}") from None
        except ValueError as exc:
            raise InventoryError(f"host {target!r}: {exc}") from None
        if entry.key:
            check_key_file(entry.key, f"host {target!r}")
        hosts.append(_host(entry))
    _unique(hosts, lambda i: f"host {targets[i]!r}")
    return Inventory(hosts)


def _unique(hosts: list[Host], where: Any) -> None:
    seen: dict[str, int] = {}
    for index, host in enumerate(hosts):
        if host.name in seen:
            raise InventoryError(
                f"{where(index)}: name {host.name!r} is used twice (also by "
                f"{where(seen[host.name])}); give each host its own name"
            )
        seen[host.name] = index


class _Lines:
    """Where each value of a YAML document is, to name the line of a bad one."""

    def __init__(self, node: yaml.Node) -> None:
        self.root = node

    def line(self, loc: tuple[Any, ...]) -> int:
        node, line = self.root, self.root.start_mark.line
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if found is None:
                    break
                line, node = found[0].start_mark.line, found[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    break
                node = node.value[part]
                line = node.start_mark.line
            else:
                break
        return line + 1


def _no_duplicate_keys(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                raise InventoryError(
                    f"{path}:{key.start_mark.line + 1}: key {key.value!r} appears twice"
                )
            seen.add(key.value)
            _no_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, path)


def load(path: Path) -> Inventory:
    """A fleet.yaml, checked whole: InventoryError naming `file:line: field: why`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InventoryError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if node is None or not isinstance(data, dict):
        raise InventoryError(f"{path}: write a mapping with `hosts:` (a list of hosts)")
    _no_duplicate_keys(node, str(path))
    lines = _Lines(node)

    def refuse(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> InventoryError:
        error = exc.errors()[0]
        loc = prefix + tuple(error["loc"])
        field = ".".join(map(str, loc))
        why = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            why = "unknown key (check its spelling: see the README's fleet.yaml)"
        return InventoryError(f"{path}:{lines.line(loc)}: {field}: {why}")

    try:
        top = InventoryFile(**data)
    except ValidationError as exc:
        raise refuse(exc) from None
    try:
        HostFields(**top.defaults)
    except ValidationError as exc:
        raise refuse(exc, ("defaults",)) from None
    hosts = []
    for index, raw in enumerate(top.hosts):
        try:
            entry = HostEntry(**{**top.defaults, **raw})
        except ValidationError as exc:
            raise refuse(exc, ("hosts", index)) from None
        if entry.key:
            key_loc = ("hosts", index, "key") if "key" in raw else ("defaults", "key")
            check_key_file(entry.key, f"{path}:{lines.line(key_loc)}")
        hosts.append(_host(entry))
    _unique(hosts, lambda i: f"{path}:{lines.line(('hosts', i))}")
    return Inventory(hosts, top.head)
