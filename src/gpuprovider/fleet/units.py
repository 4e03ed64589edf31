"""What is written on a host: the node's config (read by `node join --config`) and the
systemd units, for a node and for the provider itself (`gpuprovider install-service`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuprovider.fleet.inventory import LABEL, NAME, NODE_UNIT, Host


class NodeConfig(BaseModel):
    """node.toml: what `gpuprovider node join --config` joins with."""

    model_config = ConfigDict(extra="forbid")
    head: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    simulate_gpus: list[str] = Field(default_factory=list)
    num_cpus: int | None = Field(None, ge=1)
    node_ip: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME, value):
            raise ValueError(f"{value!r}: letters, digits, '.', '_' or '-' (<= 63)")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not re.fullmatch(LABEL, key) or not re.fullmatch(LABEL, text):
                raise ValueError(f"label {key}={text!r}: letters, digits, '.', '_', '-'")
        return value

    @classmethod
    def read(cls, path: Path) -> NodeConfig:
        """ValueError naming the file and the field."""
        try:
            return cls(**tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"]))
            raise ValueError(f"{path}: {field}: {error['msg']}") from None

    def toml(self) -> str:
        # JSON strings are valid TOML basic strings (every value here is checked ASCII)
        lines = [
            "# written by `gpuprovider fleet add`; read by `gpuprovider node join --config`",
            f"head = {json.dumps(self.head)}",
            f"name = {json.dumps(self.name)}",
            f"simulate_gpus = {json.dumps(self.simulate_gpus)}",
        ]
        if self.num_cpus is not None:
            lines.append(f"num_cpus = {self.num_cpus}")
        if self.node_ip is not None:
            lines.append(f"node_ip = {json.dumps(self.node_ip)}")
        lines.append("[labels]")
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in self.labels.items()]
        return "\n".join(lines) + "\n"


def node_config(host: Host, head: str) -> NodeConfig:
    return NodeConfig(
        head=head,
        name=host.name,
        labels=host.labels,
        simulate_gpus=host.simulate_gpus,
        num_cpus=host.num_cpus,
        node_ip=host.node_ip,
    )


def node_exec_start(host: Host) -> list[str]:
    """The command the node's unit runs (and the tests' supervisor, where no systemd
    runs): `node join` in the foreground, so systemd watches Ray itself."""
    return [f"{host.venv}/bin/gpuprovider", "node", "join", "--config", host.config, "--block"]


def node_unit(host: Host) -> str:
    start = " ".join(node_exec_start(host))  # every word is a checked path or a fixed word
    return f"""\
# written by `gpuprovider fleet add`; `gpuprovider fleet remove {host.name}` removes it
[Unit]
Description=gpuprovider node {host.name} (joins the provider's Ray cluster)
Documentation=https://github.com/gpuprovider/gpuprovider#many-servers
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
# root: the node's agent starts each task as its own pool user, in its own cgroup
User=root
ExecStart={start}
ExecStop={host.venv}/bin/ray stop
Restart=on-failure
RestartSec=5
TimeoutStopSec=60
# Ray's workers and the tasks' runners are this unit's processes: stopping it stops them
KillMode=control-group
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


PROVIDER_UNIT = "gpuprovider.service"
HUB_UNIT = "gpuprovider-hub.service"

# Hardening that leaves isolation working (docs/security.md says why each other one is
# left out: pool users, setuid helpers, /dev/nvidia*, useradd, cgroups, namespaces and
# each task's private /tmp all need what they would take away).
PROVIDER_HARDENING = """\
ProtectKernelModules=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
LockPersonality=yes
"""


def provider_unit(executable: str, home: str, user: str, hub: bool = False) -> str:
    """The unit of `gpuprovider up` (or `gpuprovider hub serve`), run as `user` with its
    home in `home`."""
    command = f"{executable} hub serve" if hub else f"{executable} up"
    what = "the reference hub" if hub else "the provider daemon"
    env = "GPUPROVIDER_HUB_HOME" if hub else "GPUPROVIDER_HOME"
    isolation = (
        "# root: isolation (pool users, cgroups, device nodes) needs it; see the README\n"
        if user == "root"
        else "# not root: every task runs as this user, without isolation (see the README)\n"
    )
    return f"""\
# written by `gpuprovider install-service`
[Unit]
Description=gpuprovider: {what}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
{isolation}User={user}
Environment={env}={home}
ExecStart={command}
Restart=on-failure
RestartSec=5
# SIGTERM: the daemon stops its loops and leaves running tasks running (re-adopted at
# the next start); its tasks are not this unit's to kill
KillMode=process
TimeoutStopSec=60
LimitNOFILE=65536
{PROVIDER_HARDENING}
[Install]
WantedBy=multi-user.target
"""


def verify(unit_text: str, name: str) -> tuple[bool, str]:
    """`systemd-analyze verify` of a unit (True, "" when clean); (True, why) when the
    tool is absent (nothing to say either way)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return True, "systemd-analyze is not installed: the unit was not verified"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        path.write_text(unit_text)
        done = subprocess.run(
            [tool, "verify", str(path)], capture_output=True, text=True, timeout=60
        )
    output = "\n".join(
        line for line in (done.stdout + done.stderr).splitlines() if not _noise(line)
    ).strip()
    return done.returncode == 0 and not output, output


def _noise(line: str) -> bool:
    # said of the machine verify runs on, not of the unit being verified
    return "System has not been booted with systemd" in line or not line.strip()


UNIT_NAMES = (NODE_UNIT, PROVIDER_UNIT, HUB_UNIT)
