"""`gpuprovider proof verify URL`, `proof key` and `proof self-test`."""

from __future__ import annotations

import json
import secrets
import time

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, console, print_json, table
from gpuprovider.home import Home
from gpuprovider.identity.keys import create_node_key, load_node_key, public_key_hex
from gpuprovider.proof import protocol as P
from gpuprovider.proof.gpu_kernels import pick_backend
from gpuprovider.proof.prover import Prover
from gpuprovider.proof.remote import (
    AttestMode,
    RemoteError,
    RemoteVerifier,
    cpu_params,
    gpu_params,
)
from gpuprovider.proof.verifier import Verdict, new_challenge, new_nonce, pick_openings, verify

proof_app = typer.Typer(
    help="Proof of GPU: show a provider has the GPUs it claims.", no_args_is_help=True
)

EXPECT = typer.Option(
    None, "--expect-seconds", help="Enforce the timing window around this walk time."
)


def _figures(verdict: Verdict) -> str:
    f = verdict.figures
    parts = [f"{k}={v}" for k, v in f.items() if k not in ("false_accept_if_5pct_skipped",)]
    return ", ".join(parts)


def verifier_key(home: Home) -> Ed25519PrivateKey:
    """This home's verifier key, made on first use."""
    if home.verifier_key.exists():
        return load_node_key(home.verifier_key)
    home.root.mkdir(parents=True, exist_ok=True)
    return create_node_key(home.verifier_key)


@proof_app.command("key")
def show_key(ctx: typer.Context) -> None:
    """Print the public key this home's verifier signs verdicts with (providers list it
    in [proof] trusted_verifiers)."""
    print(public_key_hex(verifier_key(globals_of(ctx).home)))


@proof_app.command("verify")
def verify_remote(
    ctx: typer.Context,
    url: str = typer.Argument(..., help="The provider's API URL, e.g. http://host:8085"),
    provider_key: str = typer.Option(
        ...,
        "--provider-key",
        help="The provider node's public key (hex), from its operator or the hub's "
        "registration: `gpuprovider node list --json` shows it as public_key.",
    ),
    gpu: list[str] = typer.Option([], "--gpu", help="GPU UUID to prove (default: all)."),
    expect_s: float | None = EXPECT,
    allow_estimated: bool = typer.Option(
        False,
        "--allow-estimated",
        help="Time a real GPU whose model has no measured calibration against its "
        "published bandwidth (proof/calibration.py) instead of failing it.",
    ),
    attest: AttestMode = typer.Option(
        AttestMode.OFF,
        "--attest",
        help="Ask each GPU for an NVIDIA CC attestation of the proof: try (record it) or "
        "require (fail GPUs without a verified one). Checked offline against NVIDIA's root.",
    ),
    as_json: bool = JSON,
) -> None:
    """Challenge a provider's GPUs at once, print each verdict (signed with this home's
    verifier key and posted to the provider); exit 1 if any fails."""
    g = globals_of(ctx)
    try:
        if len(bytes.fromhex(provider_key)) != 32:
            raise ValueError
    except ValueError:
        raise CliError("--provider-key: an Ed25519 public key is 64 hex digits", 2) from None
    verifier = RemoteVerifier(
        url,
        g.token,
        provider_key,
        verifier_key(g.home),
        allow_estimated=allow_estimated,
        attest=attest,
    )
    try:
        uuids = gpu or verifier.gpus()
        with console.status(f"proving {len(uuids)} GPU(s) at once ..."):
            outcomes = verifier.prove_all(uuids, expect_s)
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    if not outcomes:
        raise CliError(f"{url} lists no GPU to prove")
    if as_json:
        print_json(
            [
                {"gpu_uuid": o.gpu_uuid, "model": o.model, "stored": o.stored} | o.verdict.to_dict()
                for o in outcomes
            ]
        )
    else:
        table(
            "Proof of GPU",
            ["GPU", "MODEL", "VERDICT", "FIGURES"],
            [
                [
                    Id(o.gpu_uuid),
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
        help="Memory the proof fills (a GPU's whole memory: 90 %).",
    ),
    device: str | None = typer.Option(
        None, "--device", help="cuda:N to prove on a GPU (default: numpy on CPU)."
    ),
    as_json: bool = JSON,
) -> None:
    """Prove and verify on this machine, with a progress display (untimed)."""
    key = Ed25519PrivateKey.generate()
    memory = memory_mib * 2**20
    try:
        params = gpu_params(memory) if device else cpu_params(memory)
    except P.ProofError as exc:
        raise CliError(str(exc), 2) from None
    challenge = new_challenge(
        "GPU-self-test-" + secrets.token_hex(4), "self-test", public_key_hex(key), params
    )
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
        fill_s = prover.fill()
        nonce = new_nonce()
        t0 = time.perf_counter()
        commitment = prover.walk(nonce)
        elapsed = time.perf_counter() - t0
        prover.release()
        commitment.signature = key.sign(
            P.commitment_digest(challenge.id, nonce, commitment.roots)
        ).hex()
        progress.update(bar, description="verifying", completed=1.0)
        wanted = pick_openings(params)
        opened = prover.open(wanted)
        verdict = verify(challenge, commitment, wanted, opened, elapsed, None)
    verdict.figures |= {
        "prover": commitment.backend,
        "fill_s": round(fill_s, 3),
        "bytes_exchanged": len(opened) + len(json.dumps(commitment.to_dict())) + 16 * len(wanted),
    }
    if as_json:
        print_json(verdict.to_dict())
    else:
        console.print(("[green]PASS[/] " if verdict.passed else "[red]FAIL[/] ") + verdict.reason)
        console.print(_figures(verdict))
    raise typer.Exit(0 if verdict.passed else 1)
