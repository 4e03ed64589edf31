"""Proof of GPU: the protocol, each way of cheating it, and verification over HTTP."""

import dataclasses
import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.identity.keys import public_key_hex
from gpuprovider.proof import protocol as P
from gpuprovider.proof.partial import PartialMemoryBackend
from gpuprovider.proof.prover import Commitment, NumpyBackend, Prover, TorchBackend
from gpuprovider.proof.verifier import new_challenge, pick_openings, verify

KEY = Ed25519PrivateKey.generate()
PARAMS = P.params_for_memory(4 << 20, n=64, m=16)


def challenge(**change):
    made = new_challenge("GPU-test-0", public_key_hex(KEY), PARAMS)
    return dataclasses.replace(made, **change)


def prove(ch, backend=None, prover_cls=Prover):
    """(prover, signed commitment, seconds) as a provider would answer `ch`."""
    prover = prover_cls(ch, backend or NumpyBackend())
    t0 = time.perf_counter()
    commitment = prover.commit()
    elapsed = time.perf_counter() - t0
    commitment.signature = KEY.sign(P.commitment_digest(ch.id, commitment.roots)).hex()
    return prover, commitment, elapsed


def check(ch, prover, commitment, elapsed=1.0, expected_s=None, opened=None):
    wanted = pick_openings(ch.params)
    opened = prover.open(wanted) if opened is None else opened(prover, wanted)
    return verify(ch, commitment, wanted, opened, elapsed, expected_s)


def test_defaults_reach_2_to_the_minus_40_for_a_prover_skipping_1_percent():
    k = P.openings_for(40, 0.01)
    assert P.false_accept(k, 0.01) < 2**-40 <= P.false_accept(k - 1, 0.01)
    h100 = P.params_for_memory(81559 * 2**20)
    assert h100.openings == k and h100.covered_bytes >= 0.95 * 81559 * 2**20
    assert h100.openings * h100.opening_bytes < 10e6  # bytes per proof on the wire


def test_numpy_and_torch_provers_commit_bit_identically():
    torch = pytest.importorskip("torch")
    ch = challenge()
    _, by_numpy, _ = prove(ch)
    _, by_torch, _ = prove(ch, TorchBackend(torch, "cpu"))
    assert by_numpy.roots == by_torch.roots


def test_honest_prover_passes_and_the_verifier_is_cheap():
    ch = challenge()
    prover, commitment, elapsed = prove(ch)
    verdict = check(ch, prover, commitment, elapsed)
    assert verdict.passed, verdict.reason
    assert verdict.figures["openings"] == PARAMS.openings


def test_wrong_rows_are_rejected():
    ch = challenge()
    prover, commitment, _ = prove(ch)

    def tampered(p, wanted):
        raw = bytearray(p.open(wanted))
        raw[5] ^= 0x01  # one bit of the first opened row
        return bytes(raw)

    verdict = check(ch, prover, commitment, opened=tampered)
    assert not verdict.passed and "does not match the commitment" in verdict.reason


class SkipsHalf(Prover):
    """Runs the first half of the chain, then commits made-up states (cheap)."""

    def step(self, state, js):
        if len(self.states) > self.challenge.params.steps // 2:
            return np.random.default_rng().integers(-128, 128, state.shape, dtype=np.int8)
        return super().step(state, js)


class SkipsOnePercent(Prover):
    """Leaves 1 % of each state's rows uncomputed (zeros) — the case the defaults target."""

    def step(self, state, js):
        out = super().step(state, js)
        out[: max(1, out.shape[0] // 100)] = 0
        return out


@pytest.mark.parametrize("cheat", [SkipsHalf, SkipsOnePercent])
def test_skipping_work_is_caught_by_the_openings(cheat):
    ch = challenge()
    prover, commitment, _ = prove(ch, prover_cls=cheat)
    verdict = check(ch, prover, commitment)
    assert not verdict.passed and "opened results are wrong" in verdict.reason


class CountsGenerations(NumpyBackend):
    def __init__(self):
        super().__init__()
        self.generated = 0

    def make(self, k0, keys, n):
        self.generated += len(keys)
        return super().make(k0, keys, n)


def test_keeping_part_of_the_matrices_is_right_but_costs_regeneration():
    # right answers, so the openings accept it; the extra work is what the timing window
    # catches (timed against an honest prover in bench/proof.py, never in a test)
    ch = challenge()
    honest, partial = CountsGenerations(), PartialMemoryBackend(keep=0.25)
    prove(ch, honest)
    prover, commitment, _ = prove(ch, partial)
    assert check(ch, prover, commitment).passed
    matrices, uses = PARAMS.matrices, PARAMS.steps * PARAMS.per_step / PARAMS.matrices
    assert honest.generated == matrices + 1  # each matrix once, plus the first state
    # a quarter generated once, three quarters regenerated on each of their ~`uses` uses
    assert partial.generated > 0.8 * (0.25 + 0.75 * uses) * matrices


@pytest.mark.parametrize(
    "change",
    [{"seed": "ab" * 32}, {"gpu_uuid": "GPU-test-1"}],
    ids=["another-seed", "another-gpu"],
)
def test_work_for_another_seed_or_gpu_is_rejected(change):
    ch = challenge()
    other = dataclasses.replace(ch, **change)  # same id: only the work differs
    prover, commitment, _ = prove(other)
    verdict = check(ch, prover, commitment)
    assert not verdict.passed and "wrong seed or GPU" in verdict.reason


def test_replayed_proof_is_rejected():
    earlier = challenge()
    prover, commitment, _ = prove(earlier)
    now = challenge()  # a fresh challenge: new id and seed
    verdict = check(now, prover, commitment)
    assert not verdict.passed and "another challenge" in verdict.reason
    relabelled = dataclasses.replace(commitment, challenge_id=now.id)
    verdict = check(now, prover, relabelled)
    assert not verdict.passed and "not signed" in verdict.reason


def test_answers_outside_the_timing_window_are_rejected():
    ch = challenge()
    prover, commitment, _ = prove(ch)
    slow = check(ch, prover, commitment, elapsed=10.0, expected_s=2.0)
    assert not slow.passed and "5.00x" in slow.reason
    fast = check(ch, prover, commitment, elapsed=0.5, expected_s=2.0)
    assert not fast.passed and "0.25x" in fast.reason
    assert check(ch, prover, commitment, elapsed=2.5, expected_s=2.0).passed


def test_malformed_messages_are_clear_errors():
    ch = challenge()
    with pytest.raises(P.ProofError, match="n must be a multiple of 8"):
        P.Challenge.from_dict({**ch.to_dict(), "params": {**ch.to_dict()["params"], "n": 7}})
    with pytest.raises(P.ProofError, match="seed must be 32 bytes"):
        P.Challenge.from_dict({**ch.to_dict(), "seed": "zz"})
    with pytest.raises(P.ProofError, match="state roots"):
        Commitment.from_dict({"challenge_id": ch.id, "roots": "A" * 44}, ch.params)
    with pytest.raises(P.ProofError, match="malformed commitment"):
        Commitment.from_dict({"challenge_id": ch.id, "roots": "not base64!"}, ch.params)
    prover, commitment, _ = prove(ch)
    short = check(ch, prover, commitment, opened=lambda p, w: p.open(w)[:-1])
    assert not short.passed and "bytes" in short.reason
    with pytest.raises(P.ProofError, match="outside the challenge"):
        prover.open([(ch.params.steps + 1, 0, 0)])


# -- over HTTP, between two providers on 127.0.0.1 -----------------------------------


def verifier_token(provider, scopes=("read", "verify")):
    args = ["token", "create", "validator-" + str(len(scopes)), "--json"]
    for scope in scopes:
        args += ["--scope", scope]
    made = provider.cli(*args)
    assert made.returncode == 0, made.stderr
    return json.loads(made.stdout)["token"]


def test_remote_verification_between_two_providers(provider, fresh_provider):
    token = verifier_token(provider)
    uuid = provider.api.get("/gpus").json()[0]["uuid"]
    done = fresh_provider.cli(
        "--token", token, "proof", "verify", provider.url, "--gpu", uuid, "--json", timeout=120
    )  # the verifier runs from the other provider's home
    assert done.returncode == 0, done.stdout + done.stderr
    (outcome,) = json.loads(done.stdout)
    assert outcome["passed"] and outcome["figures"]["bytes_exchanged"] < 10e6
    assert "simulated" in outcome["figures"]["timing"]
    shown = {g["uuid"]: g for g in provider.api.get("/gpus").json()}[uuid]
    assert shown["proof"]["passed"] is True
    listed = provider.cli("gpu", "list")
    assert "passed" in listed.stdout


def test_proof_api_rejects_bad_input_and_stores_nothing(provider):
    uuid = provider.api.get("/gpus").json()[1]["uuid"]
    info = provider.api.get(f"/gpus/{uuid}/proof").json()
    good = new_challenge(uuid, info["provider_key"], PARAMS).to_dict()
    cases = [
        ({**good, "params": {**good["params"], "m": 3}}, 422, "m must be a power of two"),
        ({**good, "gpu_uuid": "GPU-other"}, 422, "names GPU GPU-other"),
        ({**good, "provider_key": "00" * 32}, 422, "another provider key"),
        ({**good, "params": {**good["params"], "matrices": 10**6}}, 422, "this GPU proves"),
        ({**good, "surprise": 1}, 422, "surprise"),
    ]
    for body, status, text in cases:
        answer = provider.api.post(f"/gpus/{uuid}/proof/challenge", json=body)
        assert answer.status_code == status and text in answer.text, (text, answer.text)
    too_big = provider.api.post(
        f"/gpus/{uuid}/proof/open",
        content=b'{"challenge_id": "x", "openings": [' + b"[1,1,1]," * 300_000 + b"[1,1,1]]}",
        headers={"Content-Type": "application/json"},
    )
    assert too_big.status_code == 413
    unknown = provider.api.post(
        f"/gpus/{uuid}/proof/open", json={"challenge_id": good["id"], "openings": [[1, 0, 0]]}
    )
    assert unknown.status_code == 409 and "no answered challenge" in unknown.text
    fake_pass = provider.api.post(
        f"/gpus/{uuid}/proof/result",
        json={"challenge_id": good["id"], "passed": True, "reason": "trust me"},
    )
    assert fake_pass.status_code == 409
    assert {g["uuid"]: g for g in provider.api.get("/gpus").json()}[uuid]["proof"] is None
    reader = verifier_token(provider, scopes=("read",))
    denied = provider.api.get(f"/gpus/{uuid}/proof", headers={"Authorization": f"Bearer {reader}"})
    assert denied.status_code == 403


def test_required_proof_keeps_work_off_unproven_gpus(fresh_provider):
    p = fresh_provider
    p.home.config.write_text(
        p.home.config.read_text().replace("required = false", "required = true")
    )
    p.start()
    task = p.submit(name="needs-proof", command=["true"], resources={"gpu": "RTX-4090:1"})
    from gpuprovider.testing import wait_for

    waiting = wait_for(
        lambda: "no proof of GPU yet" in (t := p.task(task["id"]))["reason"] and t,
        what="the task to wait for a proof",
    )
    assert waiting["state"] == "queued"
    uuid = next(g["uuid"] for g in p.api.get("/gpus").json() if g["model"] == "rtx-4090-24gb")
    done = p.cli("--token", verifier_token(p), "proof", "verify", p.url, "--gpu", uuid,
                 timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    p.wait_state(task["id"], "succeeded")
