"""Property-based requests against the daemon's own OpenAPI schema (schemathesis):
whatever a client sends, the daemon answers with no server error, in the shape its
schema declares, and logs no crash."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ST = str(Path(sys.executable).parent / "st")


@pytest.mark.slow
@pytest.mark.timeout(420)  # about 150 s for 49 operations on two busy cores
def test_no_request_makes_the_daemon_fail(provider):
    assert shutil.which(ST), "schemathesis is part of the test extra"
    done = subprocess.run(
        [
            ST,
            "run",
            f"{provider.url}/api/v1/openapi.json",
            "-H",
            f"Authorization: Bearer {provider.token}",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "25",
            "--exclude-path-regex",
            "logs|stream",  # follow streams until a task ends, or for ever
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Traceback" not in provider.log()
