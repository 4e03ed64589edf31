"""Joining a machine to a provider's Ray cluster (`gpuprovider node join`), and the
checks made before: the head answers, runs our Ray version, serves gpuprovider."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from gpuprovider.backends.ray.common import (
    CLUSTER_KEY,
    GCS_RECONNECT_ENV,
    GCS_RECONNECT_S,
    NAMESPACE,
    BadRayAddress,
    RayBackendError,
    node_labels,
    outlive_gcs_outages,
)

log = logging.getLogger(__name__)


def reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast with a clear message when nothing listens at host:port (Ray itself would
    retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BadRayAddress(f"Ray address {address!r}: write host:port, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayBackendError(
            f"nothing answers at {address} ({exc.strerror or exc}); check the Ray head's "
            "address, that `ray start --head` runs there, and the firewall"
        ) from None


def speaks_grpc(address: str, timeout_s: float = 5.0) -> None:
    """Fail with a clear message when what listens at host:port does not speak gRPC, as
    a Ray head's GCS does (Ray itself would wait forever on, say, a web server)."""
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RayBackendError(
            f"{address} answers but is not a Ray head (no gRPC within {timeout_s:g}s); "
            "check the port: the head's GCS port (6379 unless `ray start --port` said)"
        ) from None
    finally:
        channel.close()


CONNECT_TIMEOUT_S = 60.0
# A Ray driver that cannot reach its node's sockets aborts its whole process (a C++
# check), so one is first tried in a process of its own.
PROBE = (
    "import logging, sys, ray; "
    "ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR); "
    "ray.shutdown()"
)


def probe_driver(address: str, timeout_s: float) -> None:
    """RayBackendError unless a Ray driver can start here against `address` ("": a head
    on this machine) within `timeout_s`."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, address or "auto"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise RayBackendError(
            f"a Ray driver did not start against {address or 'auto'} within {timeout_s:g}s; "
            "check that every port of the head is open to this machine"
        ) from None
    if done.returncode == 0:
        return
    lines = [x for x in done.stderr.splitlines() if x.strip() and not x.startswith(" ")]
    why = next(
        (x for x in lines if "Error" in x or "Check failed" in x), lines[-1] if lines else ""
    )
    if "version" in why.lower():
        raise RayBackendError(
            f"the head at {address} runs another Ray version ({why.strip()[:300]}); "
            f"install the head's Ray version here"
        )
    raise RayBackendError(
        f"a Ray driver cannot start here against {address or 'auto'} (exit "
        f"{done.returncode}: {why.strip()[:300]}); a driver must run on a node of the "
        "cluster and reach that node's Ray sockets (in a pod beside the Ray head, share "
        "/tmp/ray with the head's container, as deploy/kuberay/raycluster.yaml does)"
    )


def ray_init(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """Ray, connected as a driver to the head at `address` ("": RAY_ADDRESS or a head on
    this machine) within `timeout_s`, or RayBackendError saying what to fix."""
    try:
        import ray
    except ImportError:
        raise RayBackendError(
            "[backend] kind = \"ray\" needs Ray: pip install 'gpuprovider[ray]'"
        ) from None
    if address:
        reachable(address)
        speaks_grpc(address)
    if not outlive_gcs_outages():
        log.warning(
            "Ray was imported before gpuprovider's Ray backend: this process ends if Ray's "
            "GCS is away for %s s (set %s=%d before starting it)",
            os.environ.get(GCS_RECONNECT_ENV, "60"),
            GCS_RECONNECT_ENV,
            GCS_RECONNECT_S,
        )
    probe_driver(address, timeout_s)
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(
                address=address or "auto",
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=False,
            )
            outcome["error"] = None
        except BaseException as exc:  # reported to the caller below
            outcome["error"] = exc

    # ray.init cannot be interrupted: it runs aside, and is waited for this long at most
    thread = threading.Thread(target=connect, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise RayBackendError(
            f"the Ray head at {address or 'auto'} did not accept a driver within "
            f"{timeout_s:g}s; check that its Ray version is {ray.__version__} and that "
            "every port of the head is open to this machine"
        )
    if (exc := outcome["error"]) is not None:
        text = str(exc)
        if "version" in text.lower():
            raise RayBackendError(
                f"the head at {address} runs another Ray version ({text.splitlines()[0]}); "
                f"install the head's Ray version here (this one is {ray.__version__})"
            )
        raise RayBackendError(
            f"cannot connect to the Ray head at {address or 'auto'}: "
            f"{text.splitlines()[0] if text else repr(exc)}; check [backend] address "
            "(host:port of `ray start --head`), that the head runs, and the firewall"
        )
    return ray


def check_head(address: str, now: float | None = None) -> str:
    """Connect to a Ray head as `node join` does before joining: it must answer, run our
    Ray version and serve gpuprovider, whose provider must be running (its marker in
    Ray's KV renewed lately, not marked stopped). Returns the head's gpuprovider
    version."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        raise RayBackendError("joining needs Ray: pip install 'gpuprovider[ray]'") from None
    ray = ray_init(address)
    try:
        marker = internal_kv._internal_kv_get(CLUSTER_KEY, namespace=NAMESPACE)
    finally:
        ray.shutdown()
    if not marker:
        raise RayBackendError(
            f"the Ray cluster at {address} is not a gpuprovider cluster: no provider runs "
            'on it; start one there with [backend] kind = "ray" (`gpuprovider up`)'
        )
    return provider_running(address, marker, time.time() if now is None else now)


def provider_running(address: str, marker: bytes, now: float) -> str:
    """The provider's version from its marker in Ray's KV, or RayBackendError when it
    does not run: marked stopped, or not renewed for three of its periods (a kill -9, a
    provider cut off from the GCS; a node joining now would get no work)."""
    try:
        said = json.loads(marker)
        version = str(said["gpuprovider"])
    except (ValueError, KeyError, TypeError):
        raise RayBackendError(f"the Ray cluster at {address} has an unreadable marker") from None
    alive_at, renew_s = said.get("alive_at"), said.get("renew_s")
    if not isinstance(alive_at, (int, float)) or not isinstance(renew_s, (int, float)):
        raise RayBackendError(
            f"the provider of the Ray cluster at {address} runs gpuprovider {version}, which "
            "does not say whether it is running; upgrade it to this version before joining"
        )
    when = datetime.fromtimestamp(alive_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(said.get("stopped_at"), (int, float)):
        raise RayBackendError(
            f"the provider of the Ray cluster at {address} is not running: it stopped at "
            f"{when}; start it (`gpuprovider up` on its machine), then join"
        )
    if now - alive_at > 3 * renew_s:
        raise RayBackendError(
            f"the provider of the Ray cluster at {address} is not running: last heard from "
            f"at {when}, {now - alive_at:.0f} s ago (killed, or cut off from Ray's GCS); "
            "start it (`gpuprovider up` on its machine), then join"
        )
    return version


def join_command(
    address: str,
    name: str,
    simulated: list[tuple[str, int]],
    labels: dict[str, str],
    num_cpus: int | None,
    node_ip: str | None,
) -> list[str]:
    """The `ray start` that makes this machine a gpuprovider node of the cluster."""
    made = node_labels(name, simulated, labels)
    argv = [
        "ray",
        "start",
        "--address",
        address,
        "--labels",
        ",".join(f"{k}={v}" for k, v in made.items()),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if node_ip:
        argv += ["--node-ip-address", node_ip]
    return argv
