"""gpuprovider: turn GPU servers into a compute provider."""

__version__ = "0.1.0"
