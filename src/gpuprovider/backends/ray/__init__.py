"""The Ray backend: `driver` (the daemon's side), `agent` (one per node), `join`
(`gpuprovider node join`), `trial` (a local trial cluster). Ray is imported only when
used: it is an optional dependency."""

from gpuprovider.backends.ray.common import BadRayAddress, RayBackendError

__all__ = ["BadRayAddress", "RayBackendError"]
