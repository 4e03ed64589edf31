"""Rentals: an environment a tenant logs in to over SSH, on a disk that outlives its
stops, starts and the daemon's restarts. The API's refusals run anywhere; the rest runs
a real container (podman as root, the rental image made from Debian's busybox-static and
dropbear) and logs in with OpenSSH's own client, the host key checked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from gpuprovider.domain.rentals import parse_ssh_key
from gpuprovider.rentals import broadcast, disks, image, keys
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

RENTAL_IMAGE = "localhost/gpp-rental:test"


def ssh_keypair(folder: Path, name: str) -> tuple[Path, str]:
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True, capture_output=True)  # fmt: skip
    return key, (folder / f"{name}.pub").read_text().strip()


def can_rent() -> str:
    """Why rentals cannot run for real here ("" when they can)."""
    if os.geteuid() != 0:
        return "rentals run containers as pool users: the tests run as root"
    for tool in ("podman", "runc", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make test installs it)"
    return image.missing() or keys.unavailable() or disks.unavailable()


def unmount_disks(provider: Provider) -> None:
    """The disks a test's rentals left mounted (a deleted rental leaves none)."""
    for folder in provider.home.rentals.glob("r-*/disk") if provider.home.rentals.exists() else []:
        disks.unmount(folder)


def rental_home(folder: Path, pool: bool) -> tuple[Provider, int]:
    """A provider for rentals, broadcasting DBC's rental status to 127.0.0.1 on the
    UDP port it returns."""
    port = free_port()
    home = make_home(folder, port, container_engine="podman" if pool else "none",
                     task_users="pool" if pool else "none",
                     gateway_port=free_port() if pool else None)  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    text = home.config.read_text().replace('container_runtime = ""', 'container_runtime = "runc"')
    for default, wanted in (
        ("max_disk_gib = 100.0", "max_disk_gib = 2.0"),
        ("broadcast = false", "broadcast = true"),
        ('broadcast_address = "255.255.255.255"', 'broadcast_address = "127.0.0.1"'),
        ("broadcast_port = 55555", f"broadcast_port = {udp_port}"),
    ):
        assert default in text
        text = text.replace(default, wanted)
    home.config.write_text(text)
    return Provider(home, port), udp_port


@pytest.fixture(scope="module")
def tenant_keys(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (openssh-client)")
    folder = tmp_path_factory.mktemp("keys")
    return {name: ssh_keypair(folder, name) for name in ("alice", "bob")}


# -- refusals: no container needed ----------------------------------------------------


def test_an_ssh_key_is_checked_and_its_comment_dropped(tenant_keys):
    line = tenant_keys["alice"][1]
    assert parse_ssh_key(line) == " ".join(line.split()[:2])
    for bad in ["not a key", "ssh-ed25519 !!!", "ssh-dss AAAAB3NzaC1kc3M=",
                "ssh-rsa " + line.split()[1]]:  # fmt: skip
        with pytest.raises(ValueError):
            parse_ssh_key(bad)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Provider:
    why = disks.unavailable() or keys.unavailable()
    if why:
        pytest.skip(why)
    provider, _ = rental_home(tmp_path_factory.mktemp("rent-plain"), pool=False)
    provider.start()
    yield provider
    provider.stop()
    kill_task_processes(provider.home)
    unmount_disks(provider)


def body(name: str, key: str, **extra) -> dict:
    return {"name": name, "image": RENTAL_IMAGE, "ssh_keys": [key], **extra}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"ssh_keys": ["ssh-ed25519 AAAAnotakey"]}, "ssh_keys"),
        ({"ssh_keys": []}, "ssh_keys"),
        ({"disk_gib": 3}, "disk_gib"),
        ({"ports": [{"name": "web", "port": 80}]}, "ports[0].port"),
        ({"ports": [{"name": "ssh"}]}, "ports"),
        ({"image": "--privileged"}, "image"),
        ({"name": "Not_A_Label"}, "name"),
        ({"whole_node": True, "gpu": 1}, "gpu"),
    ],
)
def test_bad_requests_are_refused_naming_the_field_and_store_nothing(
    plain, tenant_keys, extra, field
):
    response = plain.api.post("/rentals", json=body("bad", tenant_keys["alice"][1]) | extra)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]
    assert "bad" not in [r["name"] for r in plain.api.get("/rentals").json()]
    ids = {r["id"] for r in plain.api.get("/rentals").json()}
    folders = (
        {f.name for f in plain.home.rentals.glob("r-*")} if plain.home.rentals.exists() else set()
    )
    assert folders <= ids  # nothing left behind by the refusal


def test_another_tenant_neither_sees_nor_touches_a_rental(plain, tenant_keys):
    alice, bob = plain.tenant("rent-alice"), plain.tenant("rent-bob")
    made = alice.post("/rentals", json=body("alices", tenant_keys["alice"][1]))
    assert made.status_code == 201, made.text
    rental = made.json()
    assert rental["ssh"]["user"] == "alices" and rental["host_key"].startswith("ssh-ed25519 ")
    for ref in ("alices", rental["id"]):
        assert bob.get(f"/rentals/{ref}").status_code == 404
        for action in ("stop", "start"):
            assert bob.post(f"/rentals/{ref}/{action}").status_code == 404
        assert bob.delete(f"/rentals/{ref}").status_code == 404
        assert bob.post(f"/rentals/{ref}/evict", json={}).status_code in (403, 404)
    assert bob.get("/rentals").json() == []
    # its port is its own: a second rental asking for it is refused
    taken = rental["ssh"]["port"]
    again = bob.post("/rentals", json=body("bobs", tenant_keys["bob"][1],
                                           ports=[{"name": "web", "port": taken}]))  # fmt: skip
    assert again.status_code == 409 and "ports[0].port" in again.json()["error"]
    # with no container engine its environment cannot start: stopped, saying why
    ended = wait_for(lambda: (r := alice.get("/rentals/alices").json())["state"] == "stopped"
                     and r, 30, "the rental stopped")  # fmt: skip
    assert "ended" in ended["reason"] or "stopped" in ended["reason"]
    assert alice.delete("/rentals/alices").json()["state"] == "deleted"
    assert not (plain.home.rentals / rental["id"]).exists()


def test_a_whole_node_held_by_work_that_cannot_give_way_waits_saying_why(plain, tenant_keys):
    held = plain.submit(command=["/usr/bin/python3", "-c", "import time; time.sleep(600)"],
                        resources={"gpu": 1})  # fmt: skip
    plain.wait_state(held["id"], "running", timeout=30)
    made = plain.api.post("/rentals", json=body("whole", tenant_keys["bob"][1], whole_node=True))
    assert made.status_code == 201, made.text

    def waiting() -> dict | None:
        rental = plain.api.get("/rentals/whole").json()
        return rental if "queued" in rental["reason"] else None

    rental = wait_for(waiting, 30, "the rental to say why it waits")
    assert rental["state"] == "provisioning" and "GPU" in rental["reason"], rental
    assert plain.task(held["id"])["state"] == "running"  # not preemptible: never stopped
    assert plain.api.post("/rentals/whole/stop").json()["state"] == "stopped"
    plain.api.post(f"/tasks/{held['id']}/cancel")
    assert plain.api.delete("/rentals/whole").json()["state"] == "deleted"


# -- for real: podman, dropbear, OpenSSH's client ---------------------------------------


@pytest.fixture(scope="module")
def rental_image(tmp_path_factory) -> str:
    why = can_rent()
    if why:
        pytest.skip(why)
    probe = tmp_path_factory.mktemp("disk-probe")
    try:  # a loop device to mount a disk on (a container may have none)
        disks.create(probe / "probe.img", 0.01)
        disks.mount(probe / "probe.img", probe / "mnt")
        disks.unmount(probe / "mnt")
    except OSError as exc:
        pytest.skip(f"a rental's disk cannot be mounted here: {exc}")
    try:
        return image.build("podman", RENTAL_IMAGE)
    except image.ImageError as exc:
        pytest.skip(f"the rental image cannot be made here: {exc}")


@pytest.fixture(scope="module")
def pooled(rental_image, tmp_path_factory) -> Provider:
    provider, udp_port = rental_home(tmp_path_factory.mktemp("rent-pool"), pool=True)
    provider.status_port = udp_port
    provider.start()
    yield provider
    provider.cancel_all()
    provider.stop()
    kill_task_processes(provider.home)
    unmount_disks(provider)


def ssh(rental: dict, key: Path, command: str, folder: Path, timeout: float = 30,
        user: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    known = folder / f"known-{rental['name']}"
    known.write_text(rental["ssh"]["known_hosts"] + "\n")
    argv = ["ssh", "-F", "none", "-i", str(key), "-p", str(rental["ssh"]["port"]),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            f"{user or rental['ssh']['user']}@{rental['ssh']['host']}", command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def wait_rental(p: Provider, name: str, state: str, timeout: float = 60) -> dict:
    def reached() -> dict | None:
        rental = p.api.get(f"/rentals/{name}").json()
        assert rental["state"] not in {"stopped", "expired"} or state in {"stopped", "expired"}, (
            rental
        )
        return rental if rental["state"] == state else None

    return wait_for(reached, timeout, f"rental {name} {state}")


def login(rental: dict, key: Path, command: str, folder: Path) -> str:
    """`command`'s output over SSH, once the rental's SSH server answers."""

    def answered() -> tuple[str] | None:
        done = ssh(rental, key, command, folder)
        return (done.stdout,) if done.returncode == 0 else None  # "" is an answer too

    return wait_for(answered, 60, f"an SSH login to {rental['name']}")[0]


@pytest.mark.slow
def test_a_tenant_logs_in_and_its_disk_outlives_stop_start_and_a_daemon_kill(
    pooled, tenant_keys, tmp_path
):
    p = pooled
    alice_key, alice_pub = tenant_keys["alice"]
    made = p.api.post("/rentals", json=body("box", alice_pub, disk_gib=0.1,
                                             ports=[{"name": "web"}]))  # fmt: skip
    assert made.status_code == 201, made.text
    rental = wait_rental(p, "box", "running")
    assert rental["ready_s"] is not None and rental["ready_s"] >= 0
    out = login(rental, alice_key, "id -un; id -u; echo kept > /data/note; "
                "grep CapEff /proc/self/status; touch /etc/x 2>&1; df -k /data | tail -1; "
                "echo port=$GPUPROVIDER_PORT_WEB", tmp_path)  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "box" and int(lines[1]) >= 900  # a pool user, never root
    assert "CapEff:\t0000000000000000" in out and "Read-only file system" in out
    assert int(lines[4].split()[1]) < 200 * 1024  # the disk is its own 0.1 GiB filesystem
    assert lines[5] == f"port={rental['ports']['web']}"  # its TCP port, stable
    # the wrong key, a password, another user: refused
    bob_key = tenant_keys["bob"][0]
    assert ssh(rental, bob_key, "true", tmp_path).returncode != 0
    assert ssh(rental, alice_key, "true", tmp_path, user="root").returncode != 0
    # stop keeps the disk; start again: the same port, host key and file
    assert p.api.post("/rentals/box/stop").json()["state"] in ("stopping", "stopped")
    wait_rental(p, "box", "stopped")
    assert ssh(rental, alice_key, "true", tmp_path).returncode != 0
    assert p.api.post("/rentals/box/start").json()["state"] == "provisioning"
    again = wait_rental(p, "box", "running")
    assert again["ssh"] == rental["ssh"] and again["starts"] == 2
    assert login(again, alice_key, "cat /data/note", tmp_path).strip() == "kept"
    # the daemon killed with -9 and started again: the rental runs on, reachable
    assert p.stop(signal.SIGKILL) is not None
    p.start()
    assert wait_rental(p, "box", "running")["task_id"] == again["task_id"]
    assert login(again, alice_key, "cat /data/note", tmp_path).strip() == "kept"
    # delete stops nothing by itself: stop, then delete wipes the disk
    assert p.api.delete("/rentals/box").status_code == 409
    p.api.post("/rentals/box/stop")
    wait_rental(p, "box", "stopped")
    gone = p.api.delete("/rentals/box").json()
    assert gone["state"] == "deleted" and gone["ssh"] is None
    assert not (p.home.rentals / rental["id"]).exists()
    events = [e["state"] for e in gone["events"]][::-1]
    assert events[:3] == ["provisioning", "running", "stopping"]


@pytest.mark.slow
def test_owner_work_gives_way_to_a_whole_node_rental_and_the_owner_evicts_it(
    pooled, tenant_keys, tmp_path
):
    p = pooled
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.bind(("127.0.0.1", p.status_port))
    status.settimeout(30)
    owner_work = p.submit(command=["/usr/bin/python3", "-c", "import time; time.sleep(600)"],
                          resources={"gpu": 2}, preemptible=True, priority=-10)  # fmt: skip
    p.wait_state(owner_work["id"], "running", timeout=30)
    alice = p.tenant("whole-alice")
    made = alice.post("/rentals", json=body("node", tenant_keys["alice"][1], whole_node=True,
                                            disk_gib=0.05))  # fmt: skip
    assert made.status_code == 201, made.text
    rental = wait_rental(p, "node", "running")
    assert rental["whole_node"] and rental["gpu"] == "3"  # the node's 2 H100 and its 4090
    assert p.task(owner_work["id"])["state"] in ("preempted", "queued")  # it gave way
    assert rental["ready_s"] is not None  # request -> running, the eviction included
    # the node is renting: a DBC broadcast, a note in the node's journal, a metric
    assert broadcast.read(status.recv(4096)) == {"node_id": rental["node_id"], "status": "renting"}
    notes = p.api.get("/events", params={"kind": "node", "limit": 1000}).json()
    assert any("renting: rental node running" in e["reason"] for e in notes["events"]), notes
    metrics = httpx.get(p.url + "/metrics", headers={"Authorization": f"Bearer {p.token}"}).text
    assert 'gpuprovider_rentals{state="running"} 1.0' in metrics
    assert "gpuprovider_node_rented{" in metrics and "} 1.0" in metrics.split("node_rented{")[-1]
    out = login(rental, tenant_keys["alice"][0], "echo $CUDA_VISIBLE_DEVICES", tmp_path)
    assert out.strip() == "0,1,2"  # every (simulated) GPU is the rental's
    # a tenant cannot evict; the owner can, saying why, and the disk is kept
    assert alice.post("/rentals/node/evict", json={}).status_code == 403
    evicted = p.api.post("/rentals/node/evict", json={"reason": "maintenance at 3"}).json()
    assert evicted["state"] in ("evicting", "evicted") and "maintenance at 3" in evicted["reason"]
    wait_rental(p, "node", "evicted")
    assert broadcast.read(status.recv(4096))["status"] == "empty"
    status.close()
    p.wait_state(owner_work["id"], "running", timeout=30)  # the owner's work runs again
    p.api.post(f"/tasks/{owner_work['id']}/cancel")
    assert alice.delete("/rentals/node").json()["state"] == "deleted"


@pytest.mark.slow
def test_a_tenant_cannot_reach_the_host_through_its_disk_or_network(pooled, tenant_keys, tmp_path):
    p = pooled
    key, pub = tenant_keys["bob"]
    made = p.api.post("/rentals", json=body("esc", pub, disk_gib=0.05, duration_s=600))
    assert made.status_code == 201, made.text
    rental = wait_rental(p, "esc", "running")
    api_port = p.home.config.read_text().split("\nport = ")[1].split()[0]
    script = (
        "ln -s / /data/root; ln -s /etc/shadow /data/shadow; ln /etc/passwd /data/pw 2>&1; "
        f"ls /data/root/; nc -z -w 2 127.0.0.1 {api_port} && echo API-REACHED; echo done"
    )
    out = login(rental, key, script, tmp_path)
    assert "API-REACHED" not in out and "done" in out
    # nor through the host's address on the container network (the API binds 127.0.0.1)
    routes = login(rental, key, "cat /proc/net/route", tmp_path).splitlines()[1:]
    gateway = next(r.split()[2] for r in routes if r.split()[1] == "00000000")
    host = ".".join(str(b) for b in bytes.fromhex(gateway)[::-1])
    assert host.count(".") == 3 and not host.startswith("127.")
    probe = f"nc -z -w 2 {host} {api_port} && echo API-REACHED; echo probed"
    assert "API-REACHED" not in login(rental, key, probe, tmp_path)
    assert "tasks" not in out and "store.db" not in out  # its own root, not the host's
    shadow = os.stat("/etc/shadow")
    p.api.post("/rentals/esc/stop")
    wait_rental(p, "esc", "stopped")
    p.api.post("/rentals/esc/start")
    wait_rental(p, "esc", "running")  # the disk was handed over again: links not followed
    assert (os.stat("/etc/shadow").st_uid, os.stat("/etc/shadow").st_mode) == (
        shadow.st_uid, shadow.st_mode)  # fmt: skip
    assert os.stat("/").st_uid == 0
    p.api.post("/rentals/esc/stop")
    wait_rental(p, "esc", "stopped")
    p.api.delete("/rentals/esc")


@pytest.mark.slow
def test_a_rental_expires_when_its_time_runs_out_and_keeps_its_disk(pooled, tenant_keys):
    p = pooled
    made = p.api.post("/rentals", json=body("brief", tenant_keys["alice"][1], disk_gib=0.05,
                                             duration_s=4))  # fmt: skip
    assert made.status_code == 201, made.text
    expired = wait_rental(p, "brief", "expired", timeout=60)
    assert "time ran out" in expired["reason"]
    assert (p.home.rentals / expired["id"] / "disk.img").exists()
    again = p.api.post("/rentals/brief/start")
    assert again.status_code == 409 and "no time left" in again.json()["error"]
    assert p.api.delete("/rentals/brief").json()["state"] == "deleted"


@pytest.mark.slow
def test_the_cli_rents_prints_the_ssh_command_and_stops(pooled, tenant_keys, tmp_path):
    p = pooled
    key, _ = tenant_keys["alice"]
    made = p.cli("rent", "create", "clibox", "--image", RENTAL_IMAGE, "--key", f"{key}.pub",
                 "--disk", "0.05", "--port", "web")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "clibox" in made.stdout
    wait_rental(p, "clibox", "running")
    printed = p.cli("rent", "ssh", "clibox")
    assert printed.returncode == 0, printed.stderr
    command = printed.stdout.split()
    assert command[:2] == ["ssh", "-p"] and command[-1].startswith("clibox@")
    argv = [*command[:-1], "-i", str(key), "-o", "StrictHostKeyChecking=yes", "-o",
            "BatchMode=yes", command[-1], "echo", "in"]  # fmt: skip
    done = wait_for(lambda: (d := subprocess.run(argv, capture_output=True, text=True,
                                                 timeout=30)).returncode == 0 and d,
                    30, "a login with the printed command")  # fmt: skip
    assert done.stdout.strip() == "in"
    listed = p.cli("rent", "list")
    assert "clibox" in listed.stdout and "running" in listed.stdout
    bad = p.cli("rent", "create", "x", "--key", f"{key}.pub", "--disk", "5000")
    assert bad.returncode == 2 and "disk_gib" in bad.stderr
    assert p.cli("rent", "stop", "clibox").returncode == 0
    wait_rental(p, "clibox", "stopped")
    assert p.cli("rent", "delete", "clibox").returncode == 0


@pytest.mark.slow
def test_an_http_port_is_served_by_the_gateway_with_the_tenants_tokens(
    pooled, tenant_keys, tmp_path
):
    p = pooled
    key, pub = tenant_keys["alice"]
    alice, bob = p.tenant("http-alice"), p.tenant("http-bob")
    made = alice.post("/rentals", json=body("site", pub, disk_gib=0.05,
                                            ports=[{"name": "www", "http": True}]))  # fmt: skip
    assert made.status_code == 201, made.text
    rental = wait_rental(p, "site", "running")
    assert rental["routes"] == ["site-www"]
    login(rental, key, "true", tmp_path)
    script = "echo hello > /data/index.html; httpd -p $GPUPROVIDER_PORT_WWW -h /data"
    started = ssh(rental, key, f"{script} </dev/null >/dev/null 2>&1; echo $?", tmp_path)
    assert started.stdout.strip() == "0", (started.stdout, started.stderr)
    gateway = p.home.config.read_text().split("[gateway]")[1].split("\nport = ")[1].split()[0]
    url = f"http://127.0.0.1:{gateway}/s/site-www/index.html"
    token = alice.headers["Authorization"]

    def served() -> httpx.Response | None:
        answer = httpx.get(url, headers={"Authorization": token})
        return answer if answer.status_code == 200 else None

    assert wait_for(served, 30, "the gateway to serve the rental").text == "hello\n"
    assert httpx.get(url).status_code == 401
    assert (
        httpx.get(url, headers={"Authorization": bob.headers["Authorization"]}).status_code == 403
    )
    alice.post("/rentals/site/stop")
    wait_rental(p, "site", "stopped")
    alice.delete("/rentals/site")
