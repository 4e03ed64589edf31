"""[pricing]: what this provider charges, per hour, in currency units (USD on the
reference hub). `market/pricing.py` prices orders with it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class PriceTable(BaseModel):
    """[pricing]: currency units per hour (USD on the reference hub)."""

    model_config = ConfigDict(extra="forbid")
    # per GPU model id (h100-80gb-sxm) or family (h100); an exact id wins
    gpu_hour: dict[str, Annotated[float, Field(ge=0, le=10_000)]] = Field(default_factory=dict)
    cpu_hour: Annotated[float, Field(ge=0, le=1000)] = 0.0  # per core
    memory_gb_hour: Annotated[float, Field(ge=0, le=1000)] = 0.0
    storage_gb_hour: Annotated[float, Field(ge=0, le=1000)] = 0.0
    min_duration_s: Annotated[int, Field(ge=1, le=86400)] = 60
    # an Akash-compatible pricing script (resources JSON on stdin, price per block out)
    script: str = ""
    script_block_s: Annotated[float, Field(gt=0, le=3600)] = 6.0
    script_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    script_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
