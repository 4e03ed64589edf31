"""Joining a machine to a provider's Ray cluster (`gpuprovider node join`), and the
checks made before: the head answers, runs our Ray version, serves gpuprovider."""

from __future__ import annotations

import json
import logging
import socket

from gpuprovider.backends.ray.common import (
    CLUSTER_KEY,
    NAMESPACE,
    BadRayAddress,
    RayBackendError,
    node_labels,
)


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


def check_head(address: str) -> str:
    """Connect to a Ray head as `node join` does before joining: it must answer, run our
    Ray version and serve gpuprovider. Returns the head's gpuprovider version."""
    try:
        import ray
        from ray.experimental import internal_kv
    except ImportError:
        raise RayBackendError("joining needs Ray: pip install 'gpuprovider[ray]'") from None
    reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=False,
        )
    except Exception as exc:
        text = str(exc)
        if "version" in text.lower():
            raise RayBackendError(
                f"the head at {address} runs another Ray version ({text.splitlines()[0]}); "
                f"install the head's Ray version here (this one is {ray.__version__})"
            ) from None
        raise RayBackendError(
            f"cannot reach a Ray head at {address}: {text.splitlines()[0] if text else exc!r}; "
            "check the address (host:port of `ray start --head`) and the firewall"
        ) from None
    try:
        marker = internal_kv._internal_kv_get(CLUSTER_KEY, namespace=NAMESPACE)
    finally:
        ray.shutdown()
    if not marker:
        raise RayBackendError(
            f"the Ray cluster at {address} is not a gpuprovider cluster: no provider runs "
            'on it; start one there with [backend] kind = "ray" (`gpuprovider up`)'
        )
    return json.loads(marker)["gpuprovider"]


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
