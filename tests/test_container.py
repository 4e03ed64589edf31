"""Tasks given as an image. No container engine runs on the CI machines, so the engine
here is a stand-in `docker` on PATH that records how it was called and runs nothing:
what is tested is gpuprovider's side (probe, argv, environment), not an engine."""

import json
import os
import stat
import sys

from gpuprovider.backends.container import ContainerLaunch, container_argv
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1] == "info":
    sys.exit(0)
print(json.dumps({{"argv": sys.argv[1:], "port": os.environ.get("PORT")}}))
"""


def test_argv_maps_real_gpus_ports_and_env_names_only():
    container = ContainerLaunch(
        "docker", "gpuprovider-t-1-1", "img:1", ["serve", "--fast"], ["HF_TOKEN"], [2, 3], True,
        "/app",
    )  # fmt: skip
    argv = container_argv(container, {"http": 20001}, ["HF_TOKEN", "PORT"])
    assert argv == [
        "docker",
        "run",
        "--rm",
        "--init",
        "--name",
        "gpuprovider-t-1-1",
        "-e",
        "HF_TOKEN",
        "-e",
        "PORT",
        "--gpus",
        "device=2,3",
        "-p",
        "20001:20001",
        "-w",
        "/app",
        "img:1",
        "serve",
        "--fast",
    ]
    simulated = ContainerLaunch("podman", "n", "img", [], [], [0], False, None)
    assert "--gpus" not in container_argv(simulated, {}, [])


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
        assert argv[-2:] == ["registry.example/app:1", "serve"]
        assert argv[argv.index("MODE") - 1 : argv.index("MODE") + 1] == ["-e", "MODE"]
        assert f"{call['port']}:{call['port']}" in argv
        assert "--gpus" not in argv  # simulated GPUs are not handed to an engine
        provider.api.post(f"/tasks/{task['id']}/cancel")
    finally:
        provider.stop()
        kill_task_processes(provider.home)
