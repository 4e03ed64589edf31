"""The config of a command that runs the provider or its gateway: checked whole, the
files it names included (the gateway's certificate is read here, not in config.py)."""

from __future__ import annotations

from gpuprovider.cli.client import CliError
from gpuprovider.config import ConfigError, ProviderConfig, load_config
from gpuprovider.gateway.tls import check_gateway_tls
from gpuprovider.home import Home


def runnable_config(home: Home) -> ProviderConfig:
    """The home's config for a command that runs the provider or its gateway: valid, and
    the files it names there (exit 2 naming the key otherwise)."""
    try:
        config = load_config(home.config)
        g = config.gateway
        try:
            check_gateway_tls(g.tls_cert, g.tls_key, g.domain)
        except ValueError as exc:
            where = f"{home.config} is not a valid provider config:\n  [gateway]"
            raise ConfigError(f"{where} {exc}") from None
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    return config
