"""`gpuprovider init` and provider.toml."""

import stat
import subprocess
import sys
import tomllib
import typing

import pytest

from gpuprovider.bootstrap import init_home
from gpuprovider.config import (
    ConfigError,
    PolicyName,
    ProviderConfig,
    RayBackendConfig,
    SimulatedGpu,
    load_config,
    render_default_config,
)
from gpuprovider.home import Home
from gpuprovider.identity.keys import hash_token
from gpuprovider.scheduler import POLICIES
from gpuprovider.store.store import Store
from gpuprovider.testing import GPUPROVIDER


def test_default_config_writes_every_default_and_reads_back():
    text = render_default_config([])
    assert load_config_text(text) == ProviderConfig()
    raw = tomllib.loads(text)
    for section, model in ProviderConfig.model_fields.items():
        if section == "quotas":  # per tenant; the template shows a commented example
            assert "# [quotas.team-a]" in text
            continue
        if section == "pipelines":  # per tenant; the template shows a commented example
            assert "# [pipelines.team-a]" in text
            continue
        if section == "market":  # per market; the template shows a commented example
            assert "# [market.hub]" in text
            continue
        if section == "backend":  # by kind: local's keys set, ray's commented
            assert raw["backend"] == {"kind": "local"}
            for key in set(RayBackendConfig.model_fields) - {"kind"}:
                assert f"# {key} = " in text, f"[backend] {key} missing from the template"
            continue
        for key in model.annotation.model_fields:
            if key in ("simulated_gpus", "expected_gpus", "rules"):  # commented examples
                assert f"# [[{section}.{key}]]" in text
            elif key == "smtp":
                assert f"# [{section}.{key}]" in text
            else:
                assert key in raw[section], f"[{section}] {key} missing from the template"
    declared = [SimulatedGpu(model="h100-80gb-sxm", count=2)]
    assert load_config_text(render_default_config(declared)).inventory.simulated_gpus == declared


def test_a_config_an_older_init_wrote_still_loads():
    """`init` wrote every Ray key under [backend] before kinds had keys of their own."""
    old = (
        '[backend]\nkind = "local"\naddress = ""\nlease_s = 10.0\nlease_grace_s = 2.0\n'
        'node_dir = ""\n'
    )
    assert load_config_text(old).backend.kind == "local"


def test_the_config_knows_every_scheduler_policy():
    assert set(typing.get_args(PolicyName)) == set(POLICIES)


def test_loading_the_config_loads_no_feature():
    """config.py imports no feature package: a Ray agent starts without pricing, TLS,
    alerts or numpy."""
    probe = (
        "import sys, gpuprovider.config, gpuprovider.backends.ray.agent\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy' or m in ("
        "'gpuprovider.market.pricing', 'gpuprovider.gateway.tls', "
        "'gpuprovider.telemetry.alerts', 'gpuprovider.scheduler', 'gpuprovider.market.model')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_isolation_devices_takes_the_former_switch_too():
    assert load_config_text("[isolation]\ndevices = true\n").isolation.devices == "auto"
    assert load_config_text("[isolation]\ndevices = false\n").isolation.devices == "none"


def load_config_text(text):
    return ProviderConfig.model_validate(tomllib.loads(text))


def test_init_creates_home_with_secrets_private(tmp_path):
    home = Home(tmp_path / "h")
    report = init_home(home, simulate=True)
    assert report.admin_token and report.node_id.startswith("n-")
    for secret in (home.token, home.node_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_config(home.config).inventory.simulated_gpus[0].model == "h100-80gb-sxm"
    # the token is stored hashed, never in clear
    with Store(home.store_url("")).read() as r:
        assert r.tokens.by_hash(hash_token(report.admin_token)).scopes == ["admin"]
    assert report.admin_token not in home.store.read_bytes().decode(errors="ignore")
    # everything in the home is its owner's alone, from the moment it is made
    for path in [home.root, *home.root.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_init_again_keeps_key_and_token(tmp_path):
    home = Home(tmp_path / "h")
    first = init_home(home, simulate=True)
    key, token = home.node_key.read_bytes(), home.token.read_text()
    again = init_home(home, simulate=True)
    assert again.admin_token is None and again.created == []
    assert any("node key" in k for k in again.kept) and any("admin token" in k for k in again.kept)
    assert home.node_key.read_bytes() == key and home.token.read_text() == token
    assert again.node_id == first.node_id


def test_init_with_a_lost_store_re_registers_the_existing_token(tmp_path):
    home = Home(tmp_path / "h")
    init_home(home, simulate=True)
    token = home.token.read_text()
    home.store.unlink()
    init_home(home, simulate=True)
    assert home.token.read_text() == token
    with Store(home.store_url("")).read() as r:
        assert r.tokens.by_hash(hash_token(token)) is not None


def test_cli_init_says_what_exists(tmp_path):
    args = [GPUPROVIDER, "--home", str(tmp_path / "h"), "init", "--simulate-gpus"]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0 and "gpp_" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "gpp_" not in second.stdout
    assert "exists, kept" in second.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\nprot = 1\n", r"\[api\] prot: unknown key"),
        ("[api]\nport = 'x'\n", r"\[api\] port"),
        ("[scheduler]\npolicy = 'fastest'\n", r"\[scheduler\] policy"),
        ("[inventory]\n[[inventory.simulated_gpus]]\nmodel = 'H900'\n", "unknown GPU model"),
        ("[api\n", "not valid TOML"),
        ("[executor]\nport_range = [9000, 8000]\n", "port_range"),
        ("[colour]\n", "colour: unknown key"),
        ("[isolation]\ndevices = 'some'\n", r"\[isolation\] devices"),
        ("[proof]\ntrusted_verifiers = ['abc']\n", "not an Ed25519 public key"),
        # a key of another kind is named, with the section it is in
        (
            "[backend]\nkind = 'local'\naddress = 'h:6379'\n",
            r'\[backend\] address: .* kind = "ray"',
        ),
        ("[backend]\nkind = 'ray'\nadress = 'h:6379'\n", r"\[backend\] adress: unknown key"),
        ("[backend]\nkind = 'slurm'\n", r"\[backend\] kind: 'slurm' is not one of local, ray"),
        (
            "[market.h]\nurl = 'http://h'\nverifier_key = '" + "a" * 64 + "'\ncp_account = '0x'\n",
            r'\[market.h\] cp_account: unknown key here; it is a key of kind = "swan"',
        ),
        ("[market.s]\nkind = 'swan'\nurl = 'http://h'\n", r"\[market.s\] orchestrator: Field"),
    ],
)
def test_config_typos_are_errors_that_name_the_key(tmp_path, text, message):
    path = tmp_path / "provider.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cli_refuses_a_bad_config_with_exit_2(tmp_path):
    home = Home(tmp_path / "h")
    init_home(home, simulate=True)
    home.config.write_text(home.config.read_text().replace("[api]", "[api]\nprot = 1"))
    done = subprocess.run(
        [GPUPROVIDER, "--home", str(home.root), "up"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "[api] prot: unknown key" in done.stderr
