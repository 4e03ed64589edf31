"""Tasks given as an image. The engine's command line is the provider's alone: a spec's
image is a reference by the distribution grammar and its arguments come after `--`.
Tested three ways: the argv itself, a stand-in `docker` that records how it was called,
and podman from Debian's packages running a container for real (as root, runc)."""

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from gpuprovider.backends.container import ContainerLaunch, ContainerLimits, container_argv
from gpuprovider.testing import (
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    running,
    wait_for,
)

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1] in ("info", "rm"):
    sys.exit(0)
print(json.dumps({{"argv": sys.argv[1:], "port": os.environ.get("PORT")}}))
"""
LIMITS = ContainerLimits(user="999:995", memory_bytes=2**26, cpu_milli=2000, cpu_quota=False,
                         pids_max=64)  # fmt: skip


def test_argv_holds_only_the_providers_options_before_the_image():
    container = ContainerLaunch(
        "docker", "gpuprovider-t-1-1", "img:1", ["--privileged", "-v", "/:/host"], ["HF_TOKEN"],
        ["GPU-a", "GPU-b"], "/app",
    )  # fmt: skip
    argv = container_argv(container, {"http": 20001}, ["HF_TOKEN", "PORT"], LIMITS)
    split = argv.index("--")
    options, after = argv[:split], argv[split + 1 :]
    assert after == ["img:1", "--privileged", "-v", "/:/host"]  # the container's arguments
    for flag in ("--privileged", "-v", "--volume", "--pid", "--network", "--ipc", "--userns"):
        assert flag not in options
    pairs = dict(itertools.pairwise(options))
    assert pairs["--cap-drop"] == "ALL" and pairs["--security-opt"] == "no-new-privileges"
    assert pairs["--user"] == "999:995" and pairs["--pids-limit"] == "64"
    assert pairs["--memory"] == f"{2**26}b" and pairs["--cpu-shares"] == "2048"
    assert "--read-only" in options and pairs["--gpus"] == '"device=GPU-a,GPU-b"'
    assert options[options.index("HF_TOKEN") - 1] == "-e"  # values never on the command line
    assert pairs["-p"] == "20001:20001" and pairs["-w"] == "/app"
    podman = ContainerLaunch("/usr/bin/podman", "n", "img", [], [], ["GPU-a"], None, "runc")
    podman_argv = container_argv(podman, {}, [], LIMITS)
    assert "nvidia.com/gpu=GPU-a" in podman_argv and "--gpus" not in podman_argv
    assert podman_argv[podman_argv.index("--runtime") + 1] == "runc"


@pytest.mark.parametrize(
    "image",
    ["--privileged", "busybox --volume=/:/host", "-v", "Busybox", "a b", "img;id", "img:", ""],
)
def test_an_image_that_is_not_a_reference_is_refused(provider, image):
    response = provider.api.post("/tasks", json={"image": image})
    assert response.status_code == 422 and "image" in response.json()["error"]


def test_image_task_runs_through_the_engine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    provider = Provider(make_home(tmp_path / "home", port, container_engine="auto"), port)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old_path}"
    try:
        provider.start()
    finally:
        os.environ["PATH"] = old_path
    try:
        task = provider.submit(
            image="registry.example/app:1",
            command=["serve"],
            kind="service",
            ports=["http"],
            resources={"gpu": 1},
            env={"MODE": "fast"},
        )
        wait = provider.wait_state(task["id"], {"running", "queued", "failed"})
        assert wait["state"] != "failed", wait
        line = wait_for(lambda: provider.logs(task["id"]).splitlines()[:1], what="the engine call")
        call = json.loads(line[0])
        argv = call["argv"]
        assert argv[:4] == ["run", "--rm", "--init", "--name"]
        assert argv[-3:] == ["--", "registry.example/app:1", "serve"]
        assert argv[argv.index("MODE") - 1 : argv.index("MODE") + 1] == ["-e", "MODE"]
        assert f"{call['port']}:{call['port']}" in argv
        assert "--gpus" not in argv  # simulated GPUs are not handed to an engine
        provider.api.post(f"/tasks/{task['id']}/cancel")
    finally:
        provider.stop()
        kill_task_processes(provider.home)


# -- podman, for real ------------------------------------------------------------------

IMAGE = "localhost/gpp-busybox:test"
RUNC = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def podman_runs() -> str:
    """Why podman cannot run a container here ("" when it can): importing a busybox
    image made from Debian's busybox-static, and running it."""
    if not (shutil.which("podman") and shutil.which("runc") and os.path.exists("/bin/busybox")):
        return "podman, runc or busybox-static is not installed (make test installs them)"
    if os.geteuid() != 0:
        return "these tests run podman as root"
    return ""


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory) -> str:
    why = podman_runs()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "id", "ls", "cat", "echo", "sleep", "env", "touch", "grep"):
        (root / "bin" / tool).symlink_to("busybox")
    archive = root.parent / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    done = subprocess.run(["podman", "import", str(archive), IMAGE], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {done.stderr.strip()[-300:]}")
    probe = subprocess.run(["podman", "run", "--rm", *RUNC, IMAGE, "/bin/sh", "-c", "true"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
    return IMAGE


@pytest.fixture(scope="module")
def podman_provider(busybox_image, tmp_path_factory):
    port = free_port()
    home = make_home(tmp_path_factory.mktemp("podman"), port, container_engine="podman",
                     task_users="pool")  # fmt: skip
    text = home.config.read_text().replace('container_runtime = ""', 'container_runtime = "runc"')
    home.config.write_text(text)
    with running(home, port) as provider:
        yield provider


@pytest.mark.slow
def test_a_container_runs_as_the_tasks_user_unprivileged_and_confined(podman_provider):
    p = podman_provider
    task = p.submit(
        image=IMAGE,
        command=["/bin/sh", "-c", "id -u; ls /host 2>&1; touch /etc/x 2>&1; cat /proc/1/cmdline; "
                 "echo; cat /proc/self/status | grep CapEff; echo MODE=$MODE"],
        env={"MODE": "fast"},
        resources={"memory": "64MB"},
    )  # fmt: skip
    done = p.wait_state(task["id"], {"succeeded", "failed"}, timeout=60)
    out = p.logs(task["id"])
    assert done["state"] == "succeeded", out
    lines = out.splitlines()
    assert int(lines[0]) >= 900  # a pool user's uid, not root
    assert "No such file or directory" in lines[1]  # no host mount
    assert "Read-only file system" in lines[2]
    assert "/bin/sh" not in lines[3] or "init" in lines[3]  # its own pid namespace
    assert "CapEff:\t0000000000000000" in out and "MODE=fast" in out


@pytest.mark.slow
def test_options_in_a_containers_arguments_stay_arguments(podman_provider):
    p = podman_provider
    script = 'echo "args: $*"; grep CapEff /proc/self/status; ls /host 2>&1; true'
    task = p.submit(image=IMAGE, command=["/bin/sh", "-c", script, "sh", "--privileged",
                                          "--volume=/:/host"])  # fmt: skip
    p.wait_state(task["id"], "succeeded", timeout=60)
    out = p.logs(task["id"])
    assert "args: --privileged --volume=/:/host" in out  # arguments, never engine options
    assert "CapEff:\t0000000000000000" in out and "No such file or directory" in out


@pytest.mark.slow
def test_a_cancelled_container_is_removed(podman_provider):
    p = podman_provider
    task = p.submit(image=IMAGE, command=["/bin/sleep", "300"], kind="service")
    p.wait_state(task["id"], "running", timeout=60)
    name = f"gpuprovider-{task['id']}-1"
    wait_for(lambda: name in subprocess.run(["podman", "ps", "--format", "{{.Names}}"],
                                            capture_output=True, text=True).stdout,
             30, "the container")  # fmt: skip
    p.api.post(f"/tasks/{task['id']}/cancel")
    p.wait_state(task["id"], "cancelled", timeout=60)
    wait_for(
        lambda: name not in subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"],
                                           capture_output=True, text=True).stdout,
        30, "the container removed",
    )  # fmt: skip
