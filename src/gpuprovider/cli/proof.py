"""`gpuprovider proof verify URL` and `gpuprovider proof self-test`."""

from __future__ import annotations

import json
import secrets
import time

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import console, print_json, table
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.proof import protocol as P
from gpuprovider.proof.prover import Prover, pick_backend
from gpuprovider.proof.remote import RemoteError, RemoteVerifier, params_for
from gpuprovider.proof.verifier import Verdict, new_challenge, pick_openings, verify

proof_app = typer.Typer(
    help="Proof of GPU: show a provider has the GPUs it claims.", no_args_is_help=True
)

EXPECT = typer.Option(
    None, "--expect-seconds", help="Enforce the timing window around this prover time."
)


def _figures(verdict: Verdict) -> str:
    f = verdict.figures
    parts = [f"{k}={v}" for k, v in f.items() if k not in ("false_accept_if_1pct_skipped",)]
    return ", ".join(parts)


@proof_app.command("verify")
def verify_remote(
    ctx: typer.Context,
    url: str = typer.Argument(..., help="The provider's API URL, e.g. http://host:8085"),
    gpu: list[str] = typer.Option([], "--gpu", help="GPU UUID to prove (default: all)."),
    expect_s: float | None = EXPECT,
    as_json: bool = JSON,
) -> None:
    """Challenge a provider's GPUs and print each verdict; exit 1 if any fails."""
    token = globals_of(ctx).token
    verifier = RemoteVerifier(url, token)
    try:
        uuids = gpu or verifier.gpus()
        outcomes = []
        for uuid in uuids:
            with console.status(f"proving {uuid} ..."):
                outcomes.append(verifier.prove(uuid, expect_s))
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        print_json(
            [{"gpu_uuid": o.gpu_uuid, "model": o.model, **o.verdict.to_dict()} for o in outcomes]
        )
    else:
        table(
            "Proof of GPU",
            ["GPU", "MODEL", "VERDICT", "FIGURES"],
            [
                [
                    o.gpu_uuid,
                    o.model + (" [simulated]" if o.simulated else ""),
                    "PASS" if o.verdict.passed else f"FAIL: {o.verdict.reason}",
                    _figures(o.verdict),
                ]
                for o in outcomes
            ],
        )
    raise typer.Exit(0 if all(o.verdict.passed for o in outcomes) else 1)


@proof_app.command("self-test")
def self_test(
    memory_mib: int = typer.Option(
        64,
        "--memory-mib",
        min=1,
        max=1 << 20,
        help="Memory the proof fills (a GPU's whole memory: 95 %).",
    ),
    device: str | None = typer.Option(
        None, "--device", help="cuda:N to prove on a GPU (default: numpy on CPU)."
    ),
    as_json: bool = JSON,
) -> None:
    """Prove and verify on this machine, with a progress display."""
    key = Ed25519PrivateKey.generate()
    params = params_for(memory_mib * 2**20)
    challenge = new_challenge("GPU-self-test-" + secrets.token_hex(4), public_key_hex(key), params)
    try:
        prover = Prover(challenge, pick_backend(device))
    except ImportError:
        raise CliError("--device cuda needs PyTorch: pip install 'gpuprovider[gpu]'", 2) from None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("proof", total=1.0)
        prover.on_progress = lambda what, done: progress.update(
            bar, description=what, completed=done
        )
        t0 = time.perf_counter()
        commitment = prover.commit()
        elapsed = time.perf_counter() - t0
        commitment.signature = key.sign(P.commitment_digest(challenge.id, commitment.roots)).hex()
        progress.update(bar, description="verifying", completed=1.0)
        wanted = pick_openings(params)
        opened = prover.open(wanted)
        verdict = verify(challenge, commitment, wanted, opened, elapsed, None)
    verdict.figures |= {
        "prover": commitment.backend,
        "bytes_exchanged": len(opened) + len(json.dumps(commitment.to_dict())) + 16 * len(wanted),
    }
    if as_json:
        print_json(verdict.to_dict())
    else:
        console.print(("[green]PASS[/] " if verdict.passed else "[red]FAIL[/] ") + verdict.reason)
        console.print(_figures(verdict))
    raise typer.Exit(0 if verdict.passed else 1)
