"""Tasks kept from each other and from the provider, tried as a hostile tenant would:
each test is an attack that must fail. A real daemon as root, tasks as pool users
(`gpp-task-N`) in cgroups v1, GPUs as stand-in device nodes made with mknod.

Tasks run Debian's /usr/bin/python3: a task user cannot read the test's own Python
where it lives in root's home (which is the point)."""

import json
import os
import signal
import stat
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from gpuprovider.isolation import cgroups, users
from gpuprovider.isolation.devices import NVIDIA_MAJOR
from gpuprovider.testing import Provider, free_port, make_home, running, wait_for

TASK_PY = "/usr/bin/python3"
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root"),
    pytest.mark.skipif(not os.access(TASK_PY, os.X_OK), reason=f"{TASK_PY} is missing"),
    pytest.mark.skipif(cgroups.found().version != "v1", reason="the cgroup v1 controllers"),
]


def script(code: str) -> list[str]:
    return [TASK_PY, "-c", textwrap.dedent(code)]


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    port = free_port()
    home = make_home(tmp_path_factory.mktemp("isolated"), port, task_users="pool")
    home.config.write_text(home.config.read_text().replace("pids_max = 4096", "pids_max = 64"))
    os.environ["GPP_DAEMON_SECRET"] = "hunter2"  # the daemon's environment, not the tasks'
    try:
        with running(home, port) as provider:
            del os.environ["GPP_DAEMON_SECRET"]
            yield provider
    finally:
        os.environ.pop("GPP_DAEMON_SECRET", None)


def output(provider: Provider, task_id: str) -> dict:
    provider.wait_state(task_id, {"succeeded", "failed"})
    return json.loads(provider.logs(task_id).strip().splitlines()[-1])


def sleeper(provider: Provider, **spec) -> dict:
    """A running task that says its pid, its runner's, and then sleeps."""
    task = provider.submit(
        command=script("""
            import json, os, time
            print(json.dumps({"pid": os.getpid(), "runner": os.getppid()}), flush=True)
            time.sleep(300)
        """),
        **spec,
    )
    provider.wait_state(task["id"], "running")
    line = wait_for(lambda: provider.logs(task["id"]).strip(), what="the sleeper's pids")
    return task | json.loads(line)


def test_each_task_has_a_user_of_its_own_and_a_clean_environment(isolated):
    other = sleeper(isolated)
    task = isolated.submit(
        command=script("""
            import json, os, pwd
            home = os.environ["HOME"]
            with open(os.path.join(home, "by-its-path"), "w") as handle:  # its own, by path
                handle.write("mine")
            print(json.dumps({"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name,
                              "groups": os.getgroups(), "env": dict(os.environ),
                              "cwd": os.getcwd(), "home": sorted(os.listdir(home))}))
        """),
        env={"MODE": "fast"},
        resources={"cpu": 2},
    )
    seen = output(isolated, task["id"])
    assert seen["uid"] != 0 and seen["user"].startswith("gpp-task-") and seen["groups"] == []
    assert seen["uid"] != psutil.Process(other["pid"]).uids().real  # no two live tasks share one
    env = seen["env"]
    assert "GPP_DAEMON_SECRET" not in env and env["MODE"] == "fast"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["GPUPROVIDER_TASK_ID"] == task["id"] and env["USER"] == seen["user"]
    assert seen["cwd"] == env["HOME"] == str(isolated.home.tasks / task["id"] / "work")
    assert seen["home"] == ["by-its-path"]
    isolated.api.post(f"/tasks/{other['id']}/cancel")
    # its user is lent again only once it is done with
    wait_for(lambda: not users.held_by(str(isolated.home.tasks)), what="users back")


def test_a_task_reads_nothing_of_the_provider_nor_of_other_tasks(isolated):
    other = sleeper(isolated)
    home = isolated.home
    targets = {
        "admin token": home.token,
        "node key": home.node_key,
        "store": home.store,
        "config": home.config,
        "daemon lock": home.lock,
        "other task's log": home.tasks / other["id"] / "output.log",
        "other task's environment": f"/proc/{other['pid']}/environ",
        "runner server's socket folder": home.tasks / ".runner",
    }
    task = isolated.submit(
        command=script(f"""
            import json, os
            found = {{}}
            for what, path in {json.dumps({k: str(v) for k, v in targets.items()})}.items():
                try:
                    (os.listdir if os.path.isdir(path) else lambda p: open(p).read(1))(path)
                    found[what] = "read"
                except OSError as exc:
                    found[what] = type(exc).__name__
            for what, name, text in (
                # recorded succeeded while it runs on, its GPU handed to another
                ("exit record", "../exit-1.json", '{{"exit_code": 0}}'),
                ("own log", "../output.log", "a line its runner never copied"),
            ):
                try:
                    open(name, "a").write(text)
                    found[what] = "written"
                except OSError as exc:
                    found[what] = type(exc).__name__
            print(json.dumps(found))
        """)
    )
    found = output(isolated, task["id"])
    # Refused, or not even there: the home is covered in its mount namespace, and its
    # /proc shows only its own processes.
    assert set(found) == {*targets, "exit record", "own log"}
    assert set(found.values()) <= {"PermissionError", "FileNotFoundError"}, found
    assert "never copied" not in (isolated.home.tasks / task["id"] / "output.log").read_text()
    isolated.api.post(f"/tasks/{other['id']}/cancel")


def test_a_task_shares_no_scratch_space_processes_nor_ipc_with_others(isolated):
    """World-writable folders, /proc and SysV IPC are each task's own: nothing left for
    (or read from) another tenant, not even a command line."""
    other = sleeper(isolated, env={"GPP_MARK": "other"})
    planted = Path("/tmp/gpp-planted-by-a-task")
    task = isolated.submit(
        command=script(f"""
            import json, os, sysconfig
            seen = {{}}
            for folder in ("/tmp", "/var/tmp", "/dev/shm"):
                with open(folder + "/gpp-planted-by-a-task", "w") as handle:
                    handle.write("for the next tenant")
                seen[folder] = sorted(os.listdir(folder))
            seen["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            seen["me"] = os.getpid()
            try:
                open("/proc/{other["pid"]}/cmdline").read()
                seen["other cmdline"] = "read"
            except OSError as exc:
                seen["other cmdline"] = type(exc).__name__
            seen["sysv"] = len(open("/proc/sysvipc/shm").read().splitlines())
            print(json.dumps(seen))
        """)
    )
    seen = output(isolated, task["id"])
    assert not planted.exists() and not Path("/var/tmp", planted.name).exists()
    assert not Path("/dev/shm", planted.name).exists()
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        # nothing of the host's nor of other tasks: only the way to its own folder, where
        # the provider's home is in there (as the tests' is)
        home = isolated.home.root.parts
        on_the_way = {home[2]} if folder == "/" + home[1] else set()
        assert set(seen[folder]) == {planted.name, *on_the_way}
    assert seen["me"] in seen["pids"] and other["pid"] not in seen["pids"]
    assert isolated.proc.pid not in seen["pids"]
    assert seen["other cmdline"] == "FileNotFoundError"
    assert seen["sysv"] == 1  # the header line: no segment of anyone else's
    isolated.api.post(f"/tasks/{other['id']}/cancel")


def test_a_task_cannot_signal_other_tasks_its_runner_or_the_daemon(isolated):
    other = sleeper(isolated)
    victims = {
        "daemon": isolated.proc.pid,
        "other task": other["pid"],
        "other task's runner": other["runner"],
    }
    task = isolated.submit(
        command=script(f"""
            import json, os, signal
            result = {{}}
            for what, pid in {json.dumps(victims)}.items():
                try:
                    os.kill(pid, signal.SIGKILL)
                    result[what] = "killed"
                except OSError as exc:
                    result[what] = type(exc).__name__
            try:  # its own runner: then it would run on with no deadline nor record
                os.kill(os.getppid(), signal.SIGKILL)
                result["own runner"] = "killed"
            except OSError as exc:
                result["own runner"] = type(exc).__name__
            print(json.dumps(result))
        """)
    )
    result = output(isolated, task["id"])
    assert result == {what: "PermissionError" for what in [*victims, "own runner"]}
    assert psutil.pid_exists(other["pid"]) and isolated.proc.poll() is None
    isolated.api.post(f"/tasks/{other['id']}/cancel")


ESCAPE = """
    import json, os, sys, time
    # leave the process group and the session, twice: what a runner's group kill misses
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(300)
        os._exit(0)
    time.sleep(0.5)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(300)
"""


def escaped_pids(task_pid: int, user_uid: int) -> set[int]:
    return {p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"].real == user_uid}


def test_setsid_and_double_forks_leave_nothing_behind_a_cancel_or_a_deadline(isolated):
    for how in ("cancel", "deadline"):
        extra = {"max_duration_s": 2} if how == "deadline" else {}
        task = isolated.submit(command=script(ESCAPE), **extra)
        isolated.wait_state(task["id"], "running")
        line = wait_for(lambda t=task: isolated.logs(t["id"]).strip(), what="the task's pid")
        uid = psutil.Process(json.loads(line)["pid"]).uids().real
        assert len(escaped_pids(0, uid)) >= 2  # the task and its escaped grandchild
        if how == "cancel":
            isolated.api.post(f"/tasks/{task['id']}/cancel")
            isolated.wait_state(task["id"], "cancelled")
        else:
            done = isolated.wait_state(task["id"], "failed")
            assert "max duration" in done["reason"]
        wait_for(lambda u=uid: not escaped_pids(0, u), what=f"nothing of the task left ({how})")


def test_a_killed_runner_leaves_nothing_running_nor_booked(isolated):
    task = isolated.submit(command=script(ESCAPE), resources={"gpu": 1})
    isolated.wait_state(task["id"], "running")
    line = wait_for(lambda: isolated.logs(task["id"]).strip(), what="the task's pid")
    uid = psutil.Process(json.loads(line)["pid"]).uids().real
    runner = isolated.task(task["id"])["pid"]
    os.kill(runner, signal.SIGKILL)  # as the machine's OOM killer might
    done = isolated.wait_state(task["id"], "failed")
    assert "lost" in done["reason"]
    wait_for(lambda: not escaped_pids(0, uid), what="the orphans killed with the cgroup")
    gpus = isolated.api.get("/gpus").json()
    assert not any(task["id"] in g["tasks"] for g in gpus)  # nothing stays booked


def test_each_task_gets_its_reservation_as_kernel_limits(isolated):
    task = sleeper(isolated, resources={"cpu": 1.5, "memory": "256MiB"})
    record = json.loads((isolated.home.tasks / task["id"] / "isolation-1.json").read_text())
    folders = record["cgroups"]

    def read(controller: str, name: str) -> int:
        return int(Path(folders[controller], name).read_text())

    assert read("cpu", "cpu.shares") == 1536  # 1.5 CPUs: 1.5 x 1024, a weight against others
    # the reservation, plus the documented margins ([isolation] 10 % and 64 MiB), in pages
    limit = (256 << 20) * 110 // 100 + (64 << 20)
    assert read("memory", "memory.limit_in_bytes") == limit // 4096 * 4096
    assert read("pids", "pids.max") == 64
    assert task["pid"] in map(int, Path(folders["cpu"], "cgroup.procs").read_text().split())
    isolated.api.post(f"/tasks/{task['id']}/cancel")


def test_memory_beyond_the_reservation_is_refused(isolated):
    task = isolated.submit(
        command=script("""
            chunks = []
            for _ in range(400):
                chunks.append(bytearray(1 << 20))  # 400 MiB, one MiB at a time
            print("allocated 400 MiB")
        """),
        resources={"memory": "64MB"},
    )
    done = isolated.wait_state(task["id"], "failed")
    assert "allocated" not in isolated.logs(task["id"])
    assert "out of memory" in done["reason"] and "MiB" in done["reason"]


def test_a_fork_bomb_stops_at_the_process_cap(isolated):
    task = isolated.submit(
        command=script("""
            import os, time
            started = 0
            try:
                for _ in range(500):
                    if os.fork() == 0:
                        time.sleep(30)
                        os._exit(0)
                    started += 1
            except OSError:
                pass
            print(started, flush=True)
            os._exit(0)
        """),
        max_duration_s=60,
    )
    isolated.wait_state(task["id"], {"succeeded", "failed"})
    assert int(isolated.logs(task["id"]).split()[0]) < 64  # [isolation] pids_max = 64


@pytest.fixture
def device_nodes():
    """Stand-ins for /dev/nvidia0 and /dev/nvidia1 (NVIDIA's major, no driver behind)."""
    folder = Path(tempfile.mkdtemp(prefix="gpp-dev-", dir="/run"))  # each task has its own /tmp
    folder.chmod(0o755)
    for minor in (0, 1):
        node = folder / f"nvidia{minor}"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(NVIDIA_MAJOR, minor))
        node.chmod(0o666)  # as the driver's own nodes: anyone may try; the cgroup decides
    yield folder
    for node in folder.iterdir():
        node.unlink()
    folder.rmdir()


def test_a_task_opens_only_its_own_gpu_device_nodes(isolated, device_nodes):
    task = isolated.submit(
        command=script(f"""
            import json, os
            mine = int(os.environ["CUDA_VISIBLE_DEVICES"])
            result = {{}}
            for minor in (0, 1):
                try:
                    os.close(os.open("{device_nodes}/nvidia%d" % minor, os.O_RDWR))
                    result[minor] = "opened"
                except OSError as exc:
                    result[minor] = type(exc).__name__
            print(json.dumps({{"mine": mine, "result": result}}))
        """),
        resources={"gpu": "H100:1"},
    )
    seen = output(isolated, task["id"])
    mine, other = str(seen["mine"]), str(1 - seen["mine"])
    # its own node passes the device cgroup: no driver answers behind a stand-in (ENXIO)
    assert seen["result"][mine] == "OSError"
    assert seen["result"][other] == "PermissionError"  # the other GPU: refused


def test_an_approved_workdir_is_reachable_by_its_path_even_under_tmp(fresh_provider):
    shared = Path(tempfile.mkdtemp(prefix="gpp-approved-", dir="/tmp"))
    shared.chmod(0o755)
    (shared / "in").mkdir(mode=0o777)
    (shared / "in").chmod(0o777)
    home = fresh_provider.home
    config = home.config.read_text().replace('users = "none"', 'users = "pool"')
    home.config.write_text(config.replace("workdir_roots = []", f'workdir_roots = ["{shared}"]'))
    fresh_provider.start()
    try:
        task = fresh_provider.submit(
            command=script(f"""
                import os
                with open("{shared}/in/by-its-path", "w") as handle:
                    handle.write(os.getcwd())
            """),
            workdir=str(shared / "in"),
        )
        assert fresh_provider.wait_state(task["id"], {"succeeded", "failed"})["exit_code"] == 0
        assert (shared / "in" / "by-its-path").read_text() == str(shared / "in")
    finally:
        for path in (shared / "in").iterdir():
            path.unlink()
        (shared / "in").rmdir()
        shared.rmdir()


@pytest.fixture
def dev_stand_ins():
    """Stand-ins for /dev/nvidia0 and /dev/nvidia1 where the machine has no GPU: a task
    confined to a /dev of its own finds nodes by their place in /dev."""
    made = []
    for minor in (0, 1):
        node = Path(f"/dev/nvidia{minor}")
        if not node.exists():
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(NVIDIA_MAJOR, minor))
            node.chmod(0o666)
            made.append(node)
    yield
    for node in made:
        node.unlink()


def test_on_a_dev_of_its_own_a_task_finds_only_its_gpu_nodes(
    fresh_provider, dev_stand_ins, tmp_path
):
    """What cgroup v2 machines get (no devices controller): a mount namespace whose /dev
    holds only the task's nodes, forced here with `devices = "namespace"`."""
    home = fresh_provider.home
    config = home.config.read_text().replace('users = "none"', 'users = "pool"')
    home.config.write_text(config.replace('devices = "auto"', 'devices = "namespace"'))
    fresh_provider.start()
    (Path("/dev/shm") / "gpp-host-only").write_text("the host's")
    try:
        task = fresh_provider.submit(
            command=script("""
                import json, os
                mine = int(os.environ["CUDA_VISIBLE_DEVICES"])
                result = {}
                for node in ("nvidia0", "nvidia1", "mem", "kmsg", "shm/gpp-host-only"):
                    try:
                        os.close(os.open("/dev/" + node, os.O_RDONLY))
                        result[node] = "opened"
                    except OSError as exc:
                        result[node] = type(exc).__name__
                for path in ("/dev/planted", "/dev/shm/mine"):
                    try:
                        open(path, "w").close()
                        result[path] = "written"
                    except OSError as exc:
                        result[path] = type(exc).__name__
                dev = sorted(os.listdir("/dev"))
                print(json.dumps({"mine": mine, "result": result, "dev": dev}))
            """),
            resources={"gpu": "H100:1"},
        )
        seen = output(fresh_provider, task["id"])
    finally:
        (Path("/dev/shm") / "gpp-host-only").unlink()
    mine, other = f"nvidia{seen['mine']}", f"nvidia{1 - seen['mine']}"
    result = seen["result"]
    assert result[mine] == "OSError"  # there, opened: no driver answers behind a stand-in
    assert result[other] == "FileNotFoundError"  # the other GPU is not in its /dev at all
    assert result["mem"] == result["kmsg"] == "FileNotFoundError"
    assert result["shm/gpp-host-only"] == "FileNotFoundError"  # a /dev/shm of its own
    assert result["/dev/planted"] == "OSError"  # read-only /dev
    assert result["/dev/shm/mine"] == "written"
    assert other not in seen["dev"] and mine in seen["dev"] and "null" in seen["dev"]
    assert not Path("/dev/shm/mine").exists()  # nothing it mounted reached the host
    facts = fresh_provider.api.get("/nodes").json()[0]["facts"]["isolation"]
    assert facts["devices"] == "a /dev of its own (mount namespace)"


def test_the_node_says_what_isolation_it_enforces(isolated):
    node = isolated.api.get("/nodes").json()[0]
    assert node["facts"]["isolation"] == {
        "users": "a user per task (pool gpp-task-N)",
        "cgroups": "v1",
        "devices": "cgroup v1 device list",
        "mounts": "its own /tmp, /dev/shm, /proc and IPC (namespaces)",
        "network": "isolated: its ports answer only itself and the provider "
        "(nftables, by socket uid)",
    }
    assert "isolation:" not in isolated.cli("node", "list").stdout


def test_without_isolation_the_node_says_so_loudly(fresh_provider):
    home = fresh_provider.home
    home.config.write_text(home.config.read_text().replace('cgroups = "auto"', 'cgroups = "none"'))
    fresh_provider.start()
    assert "ISOLATION users none: off in config" in fresh_provider.log()
    listed = fresh_provider.cli("node", "list").stdout
    assert "isolation:" in listed and "users none" in listed and "cgroups none" in listed


def test_a_retry_lent_another_user_still_reads_what_its_first_attempt_left(isolated):
    task = isolated.submit(
        command=script("""
            import json, os, pwd, sys
            me = pwd.getpwuid(os.getuid()).pw_name
            os.makedirs("state/deeper", exist_ok=True)
            if os.environ["GPUPROVIDER_ATTEMPT"] == "1":
                with open("state/deeper/checkpoint", "w") as handle:  # 0600 by its umask
                    handle.write(me)
                os.symlink("/etc/shadow", "state/shadow")  # a link: never followed
                print(json.dumps({"user": me}), flush=True)
                sys.exit(1)
            with open("state/deeper/checkpoint") as handle:
                print(json.dumps({"user": me, "first": handle.read()}))
        """),
        retry={"attempts": 2, "backoff_s": 5},
    )
    wait_for(
        lambda: (t := isolated.task(task["id"]))["attempt"] == 1 and t["state"] == "queued",
        30,
        "the first attempt to fail",
    )
    holder = sleeper(isolated)  # takes the user the first attempt gave back
    seen = output(isolated, task["id"])
    assert isolated.task(task["id"])["state"] == "succeeded", isolated.logs(task["id"])
    assert seen["user"] != seen["first"]  # a different user, and it read the checkpoint
    assert os.stat("/etc/shadow").st_uid == 0  # the link's target kept its owner
    isolated.api.post(f"/tasks/{holder['id']}/cancel")
