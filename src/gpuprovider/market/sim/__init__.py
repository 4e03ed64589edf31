"""A deterministic market simulator on a virtual clock: the provider's own pricing,
strategies and scheduler run inside it against public traces (see
docs/market-strategy.md)."""
