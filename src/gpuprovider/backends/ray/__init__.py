"""The Ray backend: `driver` (the daemon's side), `agent` (one per node), `join`
(`gpuprovider node join`), `trial` (a local trial cluster). Ray is imported only when
used: it is an optional dependency."""

from gpuprovider.backends.ray.common import (
    BadRayAddress,
    RayBackendError,
    outlive_gcs_outages,
)

# Before Ray is first imported in this process: Ray reads the setting then (set later,
# Ray's log quotes the new value but its GCS client still ends the process at 60 s).
outlive_gcs_outages()

__all__ = ["BadRayAddress", "RayBackendError"]
