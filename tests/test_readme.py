"""The README, run as written (#28): every fenced block is marked in the README itself
(`<!-- readme-test: run -->`, `skip: REASON`, `file PATH` or `config`), and the run
blocks are executed in order, line by line, by bash on 80 columns, against a real
daemon and, for the market, a real hub, from a home in a fresh `$HOME` (so `~` in a
command is that home) and a folder holding a copy of `examples/`.

What a command shows is checked where the README says it (`# prints: TEXT`, with `…`
standing for anything); `# exits N` is the exit code it must end with (0 otherwise).
The README's placeholders are filled with what the run made: the ports it listens on,
`GPU-…` (a GPU of the node), `gpu7` (the node), `ord-…` (the latest order), `gpp_…`
(the latest token made), `Bearer …` (the admin token). A commented `provider.toml`
snippet in a run block is put into the provider's config, which is then restarted, as
the README tells a person to."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gpuprovider.config import load_config
from gpuprovider.home import Home
from gpuprovider.testing import SLACK, Provider, free_port, kill_task_processes, make_home, wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!-- readme-test: (run|skip|file|config)(?::? (.*?))? -->")
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 120 * SLACK
# what `gpuprovider init` declares on a machine with no NVIDIA GPU
TWO_H100 = """
[[inventory.simulated_gpus]]
model = "h100-80gb-sxm"
count = 2
"""

# Lines of run blocks the test does not run, and why (printed as warnings).
NOT_RUN = {
    r"gpuprovider events --follow": "follows the feed for ever",
    r"gpuprovider gateway nginx-config --domain gpus\.example\.com": (
        "needs a wildcard certificate: tests/test_gateway.py renders it with one"
    ),
    r"python3 -m websockets": "interactive: tests/test_gateway.py tunnels WebSockets",
    r"gpuprovider task run --upload (git:|\\?\s*'https)": "fetches from the internet",
    r"gpuprovider task run --gpu 0\.25 -- python3 small_model\.py": "no small_model.py",
    r"gpuprovider key backup": "asks for a passphrase on the terminal",
}


@dataclass
class Block:
    line: int  # of the opening fence, counted from 1
    heading: str
    lang: str
    text: str
    mark: str
    arg: str

    @property
    def name(self) -> str:
        words = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"L{self.line}-{words[:40]}"


def read_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
            found = MARK.fullmatch(before)
            mark, arg = (found.group(1), found.group(2) or "") if found else ("", "")
            body = "\n".join(lines[i + 1 : end])
            blocks.append(Block(i + 1, heading, line[3:].strip(), body, mark, arg))
            i = end
        i += 1
    return blocks


BLOCKS = read_blocks(README.read_text())


def commands(text: str) -> list[tuple[str, str]]:
    """(command, its comment) for each command of a block, continuations joined;
    comment-only lines are left out (a provider.toml snippet is read apart)."""
    found, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        command, _, comment = whole.partition("  # ")
        found.append((command.strip(), comment.strip()))
    return found


def config_snippets(text: str) -> list[str]:
    """The TOML a block shows as `#   ` lines after a comment naming provider.toml."""
    snippets, current, inside = [], [], False
    for line in text.splitlines():
        if inside and line.startswith("#   "):
            current.append(line[4:])
            continue
        if current:
            snippets.append("\n".join(current))
            current = []
        inside = line.startswith("#") and "provider.toml" in line
    if current:
        snippets.append("\n".join(current))
    return snippets


@dataclass
class World:
    """What the README's commands run against, made once for the module."""

    root: Path
    api_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    provider: Provider | None = None
    hub: subprocess.Popen | None = None
    last_order: str = ""
    last_token: str = ""

    @property
    def home(self) -> Home:
        return Home(self.root / ".gpuprovider")

    @property
    def cwd(self) -> Path:
        return self.root / "work"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR")}
        return {
            **keep,
            "HOME": str(self.root),
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "COLUMNS": "80",
            "TERM": "dumb",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def fill(self, command: str) -> str:
        node = self.provider.api.get("/nodes").json()[0] if self.provider else {}
        gpus = self.provider.api.get("/gpus").json() if self.provider else []
        for old, new in (
            ("127.0.0.1:8085", f"127.0.0.1:{self.api_port}"),
            ("http://provider:8085", f"http://127.0.0.1:{self.api_port}"),
            (":8086", f":{self.gateway_port}"),
            ("8090", str(self.hub_port)),
            ("GPU-…", gpus[0]["uuid"] if gpus else "GPU-…"),
            ("gpu7", node.get("name", "gpu7")),
            ("ord-…", self.last_order or "ord-…"),
            ("Bearer …", "Bearer $(cat ~/.gpuprovider/admin.token)"),
            ("gpp_…", self.last_token or "gpp_…"),
        ):
            command = command.replace(old, new)
        return command

    def run(self, command: str) -> subprocess.CompletedProcess:
        filled = self.fill(command)
        if filled.startswith("gpuprovider hub serve"):
            return self.start_hub(filled)
        done = subprocess.run(
            ["bash", "-c", filled],
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if orders := re.findall(r"\bord-[0-9a-f]{6,}\b", done.stdout):
            self.last_order = orders[-1]
        if tokens := re.findall(r"\bgpp_[A-Za-z0-9_-]{43}\b", done.stdout):
            self.last_token = tokens[-1]
        return done

    def start_hub(self, command: str) -> subprocess.CompletedProcess:
        log = open(self.root / "hub.log", "ab")  # noqa: SIM115 - owned by the child
        self.hub = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def answers() -> bool:
            assert self.hub.poll() is None, (self.root / "hub.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{self.hub_port}/v1/info").is_success
            return False

        wait_for(answers, 30 * SLACK, "the hub to answer")
        return subprocess.CompletedProcess(command, 0, "", "")

    def configure(self, snippet: str) -> None:
        """Put a README snippet into provider.toml and restart the provider: a table the
        default config has gets the snippet's keys in place, a new one is added whole."""
        key = self.run("gpuprovider hub key").stdout.strip().split()[-1]
        snippet = self.fill(snippet.replace("<gpuprovider hub key>", key))
        text = self.home.config.read_text()
        for table, values in tomllib.loads(snippet).items():
            if table == "market":  # [market.hub]: new; beat each second, as tests do
                text += "\n" + snippet[snippet.index("[market.") :] + "\n"
                text += "heartbeat_s = 1.0\nusage_interval_s = 1.0\n"
                continue
            for name, value in values.items():
                line = f"{name} = {_toml_value(value)}"
                pattern = rf"(?ms)^(\[{re.escape(table)}\][^\[]*?)^{name} = .*?$"
                text, count = re.subn(pattern, rf"\g<1>{line}", text)
                assert count == 1, f"[{table}] {name} is not in the default config"
        # proving a simulated GPU over a few MiB, not the default's hundreds
        text = re.sub(r"(?m)^simulated_memory_mib = .*$", "simulated_memory_mib = 16", text)
        self.home.config.write_text(text)
        load_config(self.home.config)  # what the README showed is a valid config
        self.provider.stop()
        self.provider.start()


def _toml_value(value: object) -> str:
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    made = World(tmp_path_factory.mktemp("readme"))
    shutil.copytree(ROOT / "examples", made.cwd / "examples")
    users = "auto" if os.geteuid() == 0 else "none"
    make_home(
        made.home.root,
        made.api_port,
        gpus=TWO_H100,
        gateway_port=made.gateway_port,
        task_users=users,
    )
    made.provider = Provider(made.home, made.api_port)
    made.provider.start()
    try:
        yield made
    finally:
        if made.hub is not None and made.hub.poll() is None:
            made.hub.terminate()
            made.hub.wait(20)
        with contextlib.suppress(httpx.HTTPError):
            made.provider.cancel_all()
        made.provider.stop()
        kill_task_processes(made.home)


def test_every_block_is_marked():
    """A block the test does not know is a block that can drift unseen."""
    unmarked = [b.line for b in BLOCKS if not b.mark]
    assert not unmarked, f"README blocks with no <!-- readme-test: ... --> mark: {unmarked}"
    for block in BLOCKS:
        if block.mark == "skip":
            assert block.arg, f"README line {block.line}: a skip says why"
        if block.mark == "file":
            shown = (ROOT / block.arg).read_text().rstrip("\n")
            assert block.text == shown, f"README line {block.line} is not {block.arg} as it is"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_the_readme_runs_as_written(world, block):
    if block.mark == "skip":
        pytest.skip(f"README line {block.line}: {block.arg}")
    if block.mark == "file":
        return  # test_every_block_is_marked compares it
    if block.mark == "config":
        path = world.root / f"block-{block.line}.{block.lang or 'toml'}"
        path.write_text(block.text)
        if block.lang == "toml":
            load_config(path)
        else:  # a task spec: the provider must take it (dry run: nothing is stored)
            done = world.run(f"gpuprovider task submit --dry-run -f {path}")
            assert done.returncode in (0, 3), done.stdout + done.stderr
        return
    snippets = config_snippets(block.text)
    for command, comment in commands(block.text):
        if reason := next((why for r, why in NOT_RUN.items() if re.match(r, command)), None):
            warnings.warn(f"README line {block.line}: not run: {command}: {reason}", stacklevel=1)
            continue
        if snippets and command.startswith(("gpuprovider market", "gpuprovider price")):
            world.configure(snippets.pop(0))  # "in provider.toml, then `gpuprovider up`"
        if command.startswith("gpuprovider market status"):
            wait_for(
                lambda c=command: "admitted" in world.run(c).stdout,
                120 * SLACK,
                "the hub to admit the provider, as a person waits to see `admitted`",
            )
        if command == "gpuprovider up":  # the test's daemon is up: its log says what `up` says
            done = subprocess.CompletedProcess(command, 0, world.provider.log(), "")
        elif command.startswith("curl"):  # a service just asked for: retry, as a person would
            done = wait_for(
                lambda c=command: (
                    (d := world.run(c))
                    and not re.search("try again shortly|no service", d.stdout)
                    and d
                ),
                60 * SLACK,
                "the service to have a ready replica",
            )
        else:
            done = world.run(command)
        shown = done.stdout + done.stderr
        wanted = int(m.group(1)) if (m := re.search(r"\bexits (\d+)", comment)) else 0
        assert done.returncode == wanted, f"README line {block.line}: {command}\n{shown}"
        if command != "gpuprovider up" and "--json" not in command:  # listings only
            assert all(len(line) <= 80 for line in done.stdout.splitlines()), shown
        if m := re.search(r"\bprints: (.*)$", comment):
            pieces = [re.escape(p.strip()) for p in world.fill(m.group(1)).split("…")]
            assert re.search(".*".join(pieces), shown, re.S), (
                f"README line {block.line}: {command} should print {m.group(1)!r}:\n{shown}"
            )
