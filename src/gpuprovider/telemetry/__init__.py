"""Watch and repair: GPU telemetry from NVML, XIDs from the kernel log, a short
history per GPU, repair rules and alerts. Libraries only: the daemon's telemetry loop
(`daemon/telemetry.py`) and `service/repair.py` wire them to the store."""
