"""A Ray cluster on this machine for a trial (`gpuprovider up --backend ray`)."""

from __future__ import annotations

import os

from gpuprovider.backends.ray.common import node_labels


class LocalRayCluster:
    """A Ray cluster on this machine for a trial (`gpuprovider up --backend ray`): a head
    and one Ray node per `nodes` entry, every process on 127.0.0.1. Built with Ray's own
    multi-node-on-one-machine tool; stopped with the daemon."""

    def __init__(self, nodes: list[tuple[str, list[tuple[str, int]]]]):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on 127.0.0.1
        from ray.cluster_utils import Cluster

        head_labels = {} if nodes else node_labels("ray-head", [], {})
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                "labels": head_labels,
                "_system_config": {
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        for name, sims in nodes:
            self.cluster.add_node(
                num_cpus=2, node_ip_address="127.0.0.1", labels=node_labels(name, sims, {})
            )
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def shutdown(self) -> None:
        import ray

        ray.shutdown()  # the daemon's driver first: Ray refuses to stop a node it is on
        self.cluster.shutdown()
