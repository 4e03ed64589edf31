"""The node key's backup: a passphrase opens it, nothing else does, and a restore never
overwrites another node's key."""

import json
import os
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.identity.backup import BackupError, Identity, backup, open_backup, restore
from gpuprovider.identity.keys import create_node_key, load_node_key
from gpuprovider.testing import GPUPROVIDER

CHEAP = {"n": 1 << 10, "r": 8, "p": 1}  # the file carries its cost: tests need not pay it
WORDS = "correct horse battery staple"


def test_a_backup_opens_with_its_passphrase_only():
    key = Ed25519PrivateKey.generate()
    data = backup(key, WORDS, CHEAP)
    assert Identity.of(open_backup(data, WORDS)) == Identity.of(key)
    with pytest.raises(BackupError, match="wrong passphrase"):
        open_backup(data, WORDS + "!")
    assert key.private_bytes_raw().hex() not in data.decode()
    with pytest.raises(BackupError, match="at least 12"):
        backup(key, "short", CHEAP)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(node_id="n-000000000000"),  # claims another node
        lambda b: b["kdf"].update(n=1 << 11),  # a different cost
        lambda b: b.update(ciphertext=b["ciphertext"][:-8] + "AAAAAAA="),  # flipped bytes
    ],
)
def test_a_changed_backup_is_refused(change):
    body = json.loads(backup(Ed25519PrivateKey.generate(), WORDS, CHEAP))
    change(body)
    with pytest.raises(BackupError):
        open_backup(json.dumps(body).encode(), WORDS)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\xff garbage", "not a node key backup"),
        (b"[" * 100_000, "larger than"),
        (b'{"format": "gpuprovider-node-key-backup", "version": 9}', "version 9"),
        (b'{"format": "something else"}', "not a gpuprovider node key backup"),
    ],
)
def test_what_is_not_a_backup_is_said_so(data, message):
    with pytest.raises(BackupError, match=message):
        open_backup(data, WORDS)


def test_a_backup_asking_for_a_huge_cost_is_refused_not_obeyed():
    body = json.loads(backup(Ed25519PrivateKey.generate(), WORDS, CHEAP))
    body["kdf"]["n"] = 1 << 30  # 1 TiB of memory to try one passphrase
    with pytest.raises(BackupError, match="beyond what is allowed"):
        open_backup(json.dumps(body).encode(), WORDS)


def test_restore_never_overwrites_another_nodes_key(tmp_path):
    mine, other = tmp_path / "mine.key", tmp_path / "other.key"
    key, present = create_node_key(mine), create_node_key(other)
    data = backup(key, WORDS, CHEAP)
    before = other.read_bytes()
    with pytest.raises(BackupError, match="another node's key"):
        restore(data, WORDS, other)
    assert other.read_bytes() == before  # nothing changed
    assert restore(data, WORDS, mine) == (Identity.of(key), None)  # already it: nothing to do
    fresh = tmp_path / "fresh" / "node.key"
    fresh.parent.mkdir()
    assert restore(data, WORDS, fresh)[0] == Identity.of(key)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    identity, aside = restore(data, WORDS, other, replace=True)
    assert Identity.of(load_node_key(other)) == identity == Identity.of(key)
    assert Identity.of(load_node_key(aside)) == Identity.of(present)  # kept, never lost


def gpuprovider(home, *args, passphrase=WORDS):
    env = {**os.environ, "GPUPROVIDER_HOME": str(home), "GPUPROVIDER_KEY_PASSPHRASE": passphrase}
    return subprocess.run(
        [GPUPROVIDER, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )


def test_cli_shows_backs_up_and_restores_the_key(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    assert gpuprovider(old, "init").returncode == 0
    shown = json.loads(gpuprovider(old, "key", "show", "--json").stdout)
    assert shown["node_id"].startswith("n-") and len(shown["public_key"]) == 64
    saved = tmp_path / "node-key.backup"
    made = gpuprovider(old, "key", "backup", str(saved))
    assert made.returncode == 0 and shown["node_id"] in made.stdout
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    again = gpuprovider(old, "key", "backup", str(saved))
    assert again.returncode == 2 and "exists" in again.stderr

    # A new machine: its own fresh key is not silently replaced.
    assert gpuprovider(new, "init").returncode == 0
    refused = gpuprovider(new, "key", "restore", str(saved))
    assert refused.returncode == 2 and "another node's key" in refused.stderr
    wrong = gpuprovider(new, "key", "restore", str(saved), "--replace", passphrase="not it at all")
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr
    done = gpuprovider(new, "key", "restore", str(saved), "--replace")
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(gpuprovider(new, "key", "show", "--json").stdout)["node_id"] == shown["node_id"]
    )
    assert "old key at" in done.stdout
    junk = tmp_path / "junk"
    junk.write_text("hello")
    bad = gpuprovider(new, "key", "restore", str(junk))
    assert bad.returncode == 2 and "not a node key backup" in bad.stderr
