"""Code in, results out: uploads, a task's files, volumes; every hostile input refused."""

import gzip
import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gpuprovider.backends.workfiles import (
    BadArchive,
    NotInWorkdir,
    check_archive,
    list_files,
    read_file,
)
from gpuprovider.cli import pack, sources
from gpuprovider.cli.client import Client, CliError
from gpuprovider.cli.task import send_folder, send_source
from gpuprovider.isolation import namespace
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

PY = "/usr/bin/python3"
MiB = 1 << 20


# -- archives, without a daemon ---------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


HOSTILE = {
    "../escape.txt": [_file("../escape.txt")],
    "/etc/cron.d/evil": [_file("/etc/cron.d/evil")],
    "a/../../b": [_file("a/../../b")],
    "out-link": [_special("out-link", tarfile.SYMTYPE, "/etc/passwd")],
    "up-link": [_special("dir/up-link", tarfile.SYMTYPE, "../../etc")],
    "null": [_special("null", tarfile.CHRTYPE)],
    "fifo": [_special("fifo", tarfile.FIFOTYPE)],
    "hard": [_file("a"), _special("hard", tarfile.LNKTYPE, "/etc/shadow")],
}


@pytest.mark.parametrize("entry", sorted(HOSTILE))
def test_a_hostile_archive_entry_is_refused_by_name(tmp_path, entry):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(_tar(HOSTILE[entry]))
    with pytest.raises(BadArchive) as refused:
        check_archive(path, 1 << 30, 1000)
    assert entry.split("/")[-1] in str(refused.value)


def test_a_compression_bomb_stops_at_its_size_before_inflating(tmp_path):
    # a real bomb: 64 MiB of zeros is a few hundred KiB compressed
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 * MiB
        tar.addfile(info, io.BytesIO(bytes(64 * MiB)))
    assert bomb.stat().st_size < 1 * MiB
    with pytest.raises(BadArchive, match=r"zeros.*more than 16 MiB"):
        check_archive(bomb, 16 * MiB, 1000)
    # 10 GB of zeros claimed by a header: refused at the header, nothing inflated
    header = tarfile.TarInfo("ten-gb")
    header.size = 10 * 10**9
    claimed = tmp_path / "claimed.tar.gz"
    claimed.write_bytes(gzip.compress(header.tobuf(tarfile.PAX_FORMAT) + bytes(4096)))
    with pytest.raises(BadArchive, match="ten-gb"):
        check_archive(claimed, 1 << 30, 1000)


def test_a_links_within_the_folder_and_plain_files_pass(tmp_path):
    path = tmp_path / "ok.tar.gz"
    path.write_bytes(
        _tar([_file("src/main.py", b"print(1)"), _special("main", tarfile.SYMTYPE, "src/main.py")])
    )
    summary = check_archive(path, 1 << 20, 10)
    assert (summary.entries, summary.unpacked_bytes) == (2, 8)
    with pytest.raises(BadArchive, match="more than 1 entries"):
        check_archive(path, 1 << 20, 1)


def test_pack_honours_ignore_files_and_is_the_same_bytes_twice(tmp_path):
    src = tmp_path / "proj"
    (src / "data").mkdir(parents=True)
    (src / "sub").mkdir()
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / "train.py").write_text("print('hi')")
    (src / "data" / "big.bin").write_bytes(b"0" * 100)
    (src / "notes.log").write_text("x")
    (src / "keep.log").write_text("x")
    (src / "sub" / "a.tmp").write_text("x")
    (src / "sub" / ".gitignore").write_text("*.tmp\n")
    (src / ".gitignore").write_text("*.log\n!keep.log\n")
    (src / ".gpuproviderignore").write_text("/data/\n")
    names = [e.rel for e in pack.listing(src)]
    kept = [".gitignore", ".gpuproviderignore", "keep.log", "sub", "sub/.gitignore", "train.py"]
    assert names == kept
    first = pack.pack(pack.listing(src), tmp_path / "1.tar.gz")
    second = pack.pack(pack.listing(src), tmp_path / "2.tar.gz")
    assert first == second == hashlib.sha256((tmp_path / "1.tar.gz").read_bytes()).hexdigest()
    (src / "out").symlink_to("/etc/passwd")
    with pytest.raises(pack.PackError, match="out links to /etc/passwd"):
        pack.listing(src)


def test_files_are_read_beneath_the_work_folder_only(tmp_path):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "result.txt").write_bytes(b"0123456789")
    (work / "passwd").symlink_to("/etc/passwd")
    (work / "escape").symlink_to(tmp_path)
    os.mkfifo(work / "pipe")
    assert read_file(str(work), "out/result.txt", 3, 4) == (10, b"3456")
    assert [f["name"] for f in list_files(str(work), "")] == ["escape", "out", "passwd", "pipe"]
    for bad in ("passwd", "escape/work/out/result.txt", "../work/out/result.txt", "pipe", "nope"):
        with pytest.raises(NotInWorkdir):
            read_file(str(work), bad, 0, 10)
    with pytest.raises(NotInWorkdir):
        list_files(str(work), "escape")


# -- against a daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    port = free_port()
    home = make_home(root / "home", port)
    text = home.config.read_text().replace("upload_quota_mib = 2048", "upload_quota_mib = 4")
    home.config.write_text(text.replace("max_volume_mib = 102400", "max_volume_mib = 64"))
    p = Provider(home, port)
    p.start()
    yield p
    p.cancel_all()
    p.stop()
    kill_task_processes(p.home)


@pytest.fixture(scope="module")
def other(provider):
    made = provider.api.post("/tokens", json={"name": "other", "scopes": ["read", "submit"]})
    return httpx.Client(
        base_url=provider.url + "/api/v1",
        headers={"Authorization": f"Bearer {made.json()['token']}"},
    )


def _project(tmp_path: Path) -> Path:
    src = tmp_path / "proj"
    src.mkdir()
    (src / "main.py").write_text(
        "import os\nos.makedirs('out', exist_ok=True)\n"
        "open('out/result.txt', 'w').write(open('data.txt').read().upper() * 1000)\n"
    )
    (src / "data.txt").write_text("hello ")
    return src


def test_an_upload_runs_and_its_results_come_out(provider, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = _project(tmp_path)
    ran = provider.cli("task", "run", "--name", "up1", "--upload", str(src), "--", PY, "main.py")
    assert ran.returncode == 0, ran.stderr
    task_id = ran.stdout.split()[0]
    done = provider.wait_state(task_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["reason"]
    listed = provider.cli("task", "files", "up1", "out", "--json")
    assert '"result.txt"' in listed.stdout, listed.stderr
    shown = provider.cli("task", "files", "up1", columns=80)
    assert shown.returncode == 0 and "out/" in shown.stdout and "main.py" in shown.stdout
    dest = tmp_path / "result.txt"
    got = provider.cli("task", "download", "up1", "out/result.txt", str(dest))
    assert got.returncode == 0, got.stderr
    assert dest.read_text() == "HELLO " * 1000
    page = provider.api.get(
        f"/tasks/{task_id}/download", params={"path": "out/result.txt", "offset": 6, "limit": 6}
    )
    assert page.content == b"HELLO " and page.headers["X-File-Size"] == "6000"


def test_an_unchanged_folder_is_not_sent_twice(provider, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = _project(tmp_path)
    client = Client(provider.url, provider.token)
    sent: list[str] = []
    real = client.put_file
    monkeypatch.setattr(client, "put_file", lambda *a: sent.append(a[0]) or real(*a))
    first = send_folder(client, src)
    packed: list[int] = []
    real_pack = pack.pack
    monkeypatch.setattr(pack, "pack", lambda *a: packed.append(1) or real_pack(*a))
    assert send_folder(client, src) == first
    assert (len(sent), packed) == (1, [])  # neither sent nor packed again
    (src / "data.txt").write_text("changed ")
    assert send_folder(client, src) != first and len(sent) == 2
    assert provider.api.get(f"/uploads/{first}").status_code == 200


def _put(api: httpx.Client, body: bytes, sha: str | None = None) -> httpx.Response:
    sha = sha or hashlib.sha256(body).hexdigest()
    return api.put(f"/uploads/sha256:{sha}", content=body)


def _partials(provider) -> list[Path]:
    return [p for p in (provider.home.root / "uploads").rglob("*") if p.is_file()]


def test_hostile_uploads_are_refused_naming_the_entry_and_nothing_is_kept(provider):
    kept_before = set(_partials(provider))
    for entry, members in HOSTILE.items():
        refused = _put(provider.api, _tar(members))
        assert refused.status_code == 422, (entry, refused.text)
        assert entry.split("/")[-1] in refused.json()["error"]
    body = _tar([_file("a.py")])
    wrong = _put(provider.api, body, sha="0" * 64)
    assert wrong.status_code == 422 and "hash to sha256:" in wrong.json()["error"]
    over = _put(provider.api, os.urandom(5 * MiB))
    assert over.status_code == 413 and "quota" in over.json()["error"]
    assert set(_partials(provider)) == kept_before
    gone = provider.api.post("/tasks", json={"command": ["true"], "upload": "sha256:" + "1" * 64})
    assert gone.status_code == 422 and gone.json()["error"].startswith("upload:")


def test_an_interrupted_upload_keeps_nothing_and_a_retry_lands(provider):
    body = _tar([_file("model.py", os.urandom(200_000))])
    sha = hashlib.sha256(body).hexdigest()
    with socket.create_connection(("127.0.0.1", provider.port)) as sock:
        sock.sendall(
            (
                f"PUT /api/v1/uploads/sha256:{sha} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {provider.token}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
    wait_for(lambda: not any(".partial-" in p.name for p in _partials(provider)), 10, "cleanup")
    assert provider.api.get(f"/uploads/sha256:{sha}").status_code == 404
    assert _put(provider.api, body).status_code == 201
    assert _put(provider.api, body).status_code == 200  # again: already there, kept once


def test_another_tenants_files_and_paths_out_are_not_found(provider, other):
    code = (
        "import os\nopen('mine.txt','w').write('secret')\n"
        "os.symlink('/etc/passwd', 'passwd')\nos.symlink('/', 'root')\n"
    )
    task = provider.submit(command=[PY, "-c", code])
    provider.wait_state(task["id"], "succeeded")
    ok = provider.api.get(f"/tasks/{task['id']}/download", params={"path": "mine.txt"})
    assert ok.content == b"secret"
    assert other.get(f"/tasks/{task['id']}/files").status_code == 404
    theirs = other.get(f"/tasks/{task['id']}/download", params={"path": "mine.txt"})
    assert theirs.status_code == 404
    for path in ("../exit-1.json", "passwd", "root/etc/passwd", "/etc/passwd", "../../"):
        answer = provider.api.get(f"/tasks/{task['id']}/download", params={"path": path})
        assert answer.status_code == 404, path
    assert provider.api.get(f"/tasks/{task['id']}/files", params={"path": ".."}).status_code == 404
    # another tenant's upload is not the tenant's to run
    body = _tar([_file("a.py")])
    assert _put(provider.api, body).status_code == 201
    ref = "sha256:" + hashlib.sha256(body).hexdigest()
    theirs = other.post("/tasks", json={"command": ["true"], "upload": ref})
    assert theirs.status_code == 422


def test_volume_names_and_mount_paths_are_checked(provider):
    for name in ("a/b", "x" * 300, "../up", ""):
        made = provider.api.post("/volumes", json={"name": name, "size_mib": 10})
        assert made.status_code in (404, 405, 422), name
        assert made.status_code == 422 or name == "", name
    assert provider.api.post("/volumes", json={"name": "v", "size_mib": 65}).status_code == 422
    assert provider.api.post("/volumes", json={"name": "paths", "size_mib": 8}).status_code == 201
    home = str(provider.home.root)
    for path in ("/proc", "/proc/self", "/sys/x", home, f"{home}/store.db", "a/../../b", "/"):
        spec = {"command": ["true"], "volumes": [{"name": "paths", "path": path}]}
        answer = provider.api.post("/tasks", json=spec)
        assert answer.status_code == 422, (path, answer.text)
    spec = {"command": ["true"], "volumes": [{"name": "nope", "path": "data"}]}
    assert provider.api.post("/tasks", json=spec).status_code == 422


def test_a_retried_attempt_sees_what_the_last_one_wrote_in_its_volume(provider):
    made = provider.cli("volume", "create", "ckpt", "--size", "16MB")
    assert made.returncode == 0, made.stderr
    code = (
        "import os, sys\np = 'ckpt/step'\n"
        "if os.path.exists(p):\n    print('resumed at', open(p).read()); sys.exit(0)\n"
        "open(p, 'w').write('41'); sys.exit(1)\n"
    )
    task = provider.submit(
        command=[PY, "-c", code],
        volumes=[{"name": "ckpt", "path": "ckpt"}],
        retry={"attempts": 2, "backoff_s": 0.1},
    )
    done = provider.wait_state(task["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["attempt"] == 2
    assert "resumed at 41" in provider.api.get(f"/tasks/{task['id']}/logs").text
    listed = provider.cli("volume", "list")
    assert "ckpt" in listed.stdout
    assert provider.cli("volume", "delete", "ckpt").returncode == 0
    assert provider.api.get("/volumes").json() == [] or all(
        v["name"] != "ckpt" for v in provider.api.get("/volumes").json()
    )


def test_a_volume_over_its_size_fails_the_next_start_and_cannot_be_deleted_while_mounted(
    provider,
):
    assert provider.api.post("/volumes", json={"name": "small", "size_mib": 1}).status_code == 201
    fill = "open('v/big', 'wb').write(b'0' * (2 << 20))\nimport time; time.sleep(30)"
    task = provider.submit(command=[PY, "-c", fill], volumes=[{"name": "small", "path": "v"}])
    provider.wait_state(task["id"], "running")

    def used() -> int:
        return next(v for v in provider.api.get("/volumes").json() if v["name"] == "small")[
            "used_bytes"
        ]

    wait_for(lambda: used() >= 2 * MiB, 20, "the task to fill its volume")
    busy = provider.api.delete("/volumes/small")
    assert busy.status_code == 409 and "mounted by live task" in busy.json()["error"]
    provider.api.post(f"/tasks/{task['id']}/cancel")
    provider.wait_state(task["id"], "cancelled")
    again = provider.submit(command=["true"], volumes=[{"name": "small", "path": "v"}])
    failed = provider.wait_state(again["id"], {"failed", "succeeded"})
    assert failed["state"] == "failed" and "over its size" in failed["reason"]
    assert provider.api.delete("/volumes/small").status_code == 204


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="tasks run as pool users only as root")
def test_as_pool_users_an_upload_is_the_tasks_and_a_volume_is_bound_at_its_path(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    port = free_port()
    p = Provider(make_home(tmp_path / "home", port, task_users="pool"), port)
    p.start()
    try:
        facts = p.api.get("/nodes").json()[0]["facts"]["isolation"]
        if facts["mounts"].startswith("none"):
            pytest.skip(f"no mount namespace here: {facts['mounts']}")
        src = _project(tmp_path)
        ref = send_folder(Client(p.url, p.token), src)
        assert p.api.post("/volumes", json={"name": "ckpt", "size_mib": 8}).status_code == 201
        assert p.api.post("/volumes", json={"name": "rel", "size_mib": 8}).status_code == 201
        code = (
            "import os, sys, json\n"
            "st = os.stat('main.py')\n"
            "p = '/tmp/ckpt/step'\n"
            "if os.environ['GPUPROVIDER_ATTEMPT'] == '1':\n"
            "    open(p, 'w').write('41')\n"
            "    open('state/seen', 'w').write('yes')\n"
            "    sys.exit(1)\n"
            "print(json.dumps({'owner': st.st_uid == os.getuid(), 'step': open(p).read(),\n"
            "                  'rel': open('state/seen').read()}))\n"
        )
        task = p.submit(
            command=[PY, "-c", code],
            upload=ref,
            volumes=[{"name": "ckpt", "path": "/tmp/ckpt"}, {"name": "rel", "path": "state"}],
            retry={"attempts": 2, "backoff_s": 0.1},
        )
        done = p.wait_state(task["id"], {"succeeded", "failed"}, timeout=40)
        assert done["state"] == "succeeded", (done["reason"], p.logs(task["id"]))
        assert (
            p.logs(task["id"]).strip().splitlines()[-1]
            == '{"owner": true, "step": "41", "rel": "yes"}'
        )
        assert not os.path.exists("/tmp/ckpt")  # bound in the task's own /tmp only
    finally:
        p.cancel_all()
        p.stop()
        kill_task_processes(p.home)


def test_a_mount_path_through_a_link_is_refused_and_nothing_made_where_it_points(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="is not a folder"):
        namespace._make_plain(str(tmp_path / "work" / "sub" / "vol"))
    assert not (tmp_path / "elsewhere").exists()
    namespace._make_plain(str(tmp_path / "work" / "plain" / "vol"))
    assert (tmp_path / "work" / "plain" / "vol").is_dir()


@pytest.mark.slow
def test_a_work_folder_is_kept_for_its_period_after_the_task_ends_then_removed(tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port)
    # 3.6 s: long enough to read the files after the end, short enough to see them go
    home.config.write_text(
        home.config.read_text().replace("keep_work_h = 168.0", "keep_work_h = 0.001")
    )
    p = Provider(home, port)
    p.start()
    try:
        task = p.submit(command=[PY, "-c", "open('result.txt', 'w').write('42')"])
        p.wait_state(task["id"], "succeeded")
        got = p.api.get(f"/tasks/{task['id']}/download", params={"path": "result.txt"})
        assert got.status_code == 200 and got.content == b"42"
        wait_for(
            lambda: p.api.get(f"/tasks/{task['id']}/files").status_code == 404,
            20,
            "the work folder to go after its kept period",
        )
        assert p.api.get(f"/tasks/{task['id']}/logs").text == ""  # the log is not the work folder
        assert (home.tasks / task["id"]).is_dir()
    finally:
        p.stop()
        kill_task_processes(p.home)


def _git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_and_checksummed_archive_sources_are_fetched_here_and_sent(
    provider, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = Client(provider.url, provider.token)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", "-b", "main", cwd=repo)
    (repo / "main.py").write_text("print(open('VERSION').read())")
    (repo / "VERSION").write_text("one")
    _git("add", ".", cwd=repo)
    _git("commit", "-q", "-m", "one", cwd=repo)
    commit = _git("rev-parse", "HEAD", cwd=repo)
    (repo / "VERSION").write_text("two")
    _git("commit", "-q", "-am", "two", cwd=repo)
    ref = send_source(client, f"git:{repo}@{commit}")
    task = provider.submit(command=[PY, "main.py"], upload=ref)
    provider.wait_state(task["id"], "succeeded")
    assert provider.api.get(f"/tasks/{task['id']}/logs").text == "one\n"
    fetched: list[str] = []
    monkeypatch.setattr(sources, "fetch_git", lambda *a: fetched.append(a[0]))
    assert send_source(client, f"git:{repo}@{commit}") == ref and fetched == []  # a commit: kept
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert send_source(client, f"git:{repo}@main") != ref  # a branch: fetched again
    # an http archive with its checksum
    archive = tmp_path / "site" / "code.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(_tar([_file("run.py", b"print('from http')")]))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    handler = partial(SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/code.tar.gz"
        ref = send_source(client, f"{url}#sha256={sha}")
        task = provider.submit(command=[PY, "run.py"], upload=ref)
        provider.wait_state(task["id"], "succeeded")
        assert provider.api.get(f"/tasks/{task['id']}/logs").text == "from http\n"
        for bad, why in ((f"{url}#sha256={'0' * 64}", "hash to"), (url, "checksum")):
            with pytest.raises(CliError, match=why) as refused:
                send_source(client, bad)
            assert refused.value.code == 2
    finally:
        server.shutdown()
