"""Specs, GPU constraints, the catalogue and the state machine."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from gpuprovider.domain import catalogue
from gpuprovider.domain.resources import parse_gpu_request, parse_memory_mib
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TRANSITIONS, TaskState
from gpuprovider.lifecycle.kernel import IllegalTransition
from gpuprovider.lifecycle.tasks import TASKS


@pytest.mark.parametrize(
    ("text", "count", "share", "models", "min_gb", "max_gb"),
    [
        ("1", 1, 0, None, None, None),
        ("0", 0, 0, None, None, None),
        ("0.25", 0, 250, None, None, None),
        ("H100:80GB:2", 2, 0, {"h100-80gb-sxm", "h100-80gb-pcie", "h100-94gb-nvl"}, 80, None),
        ("A100|H100:1", 1, 0, None, None, None),
        ("24GB..:1", 1, 0, None, 24, None),
        ("..48GB:4", 4, 0, None, None, 48),
        ("h100-80gb-pcie", 1, 0, {"h100-80gb-pcie"}, None, None),
        ("RTX4090:0.5", 0, 500, {"rtx-4090-24gb"}, None, None),
    ],
)
def test_gpu_constraints_parse(text, count, share, models, min_gb, max_gb):
    req = parse_gpu_request(text)
    assert (req.count, req.share_milli, req.min_memory_gb, req.max_memory_gb) == (
        count,
        share,
        min_gb,
        max_gb,
    )
    if models is not None:
        assert req.models == models
    assert parse_gpu_request(req.to_text()) == req  # the canonical text reads back the same


def test_model_alternatives_cover_both_families():
    req = parse_gpu_request("A100|H100:1")
    assert {m for m in req.models if m.startswith("a100")} and {
        m for m in req.models if m.startswith("h100")
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("H900:1", "unknown GPU model 'H900'"),
        ("T4:80GB:1", "no T4 has the GPU memory asked for"),
        ("1.5", "neither a whole number nor a fraction"),
        ("-1", "cannot be negative"),
        ("100", "more than 64 per task"),
        ("48GB..24GB:1", "is empty"),
        ("H100::1", "empty part"),
        ("H100:A100:1", "gives GPU models twice"),
    ],
)
def test_bad_gpu_constraints_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_gpu_request(text)


def test_memory_sizes():
    assert parse_memory_mib("512MiB") == 512
    assert parse_memory_mib("1GiB") == 1024
    assert parse_memory_mib(2048) == 2048
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_mib("lots")


def test_catalogue_maps_nvml_names_and_keeps_unknown_devices():
    assert catalogue.from_device_name("NVIDIA H100 80GB HBM3", 81559) == ("h100-80gb-sxm", 80)
    assert catalogue.from_device_name("Tesla T4", 15360) == ("t4-16gb", 16)
    model, memory = catalogue.from_device_name("NVIDIA Future X9", 49152)
    assert (model, memory) == ("future-x9-48gb", 48)
    for required in (
        "h200",
        "h100",
        "a100",
        "a10",
        "a10g",
        "l4",
        "l40",
        "l40s",
        "a40",
        "rtx-a6000",
        "rtx-6000-ada",
        "rtx-5090",
        "rtx-4090",
        "rtx-3090",
        "t4",
        "v100",
    ):
        assert catalogue.resolve(required)


def _spec(**fields):
    return TaskSpec.model_validate({"command": ["true"], **fields})


def test_spec_defaults_and_shapes():
    spec = _spec(resources={"gpu": 2, "memory": "16GB", "cpu": 1.5}, ports=["http"])
    assert spec.gpu.count == 2 and spec.resources.memory_mib == 15259
    assert spec.ports[0].name == "http" and spec.kind == "job"
    assert TaskSpec.model_validate({"command": "python -c 'print(1)'"}).command == [
        "python",
        "-c",
        "print(1)",
    ]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"resources": {"cpu": -1}}, "cpu"),
        ({"resources": {"cpu": 1e9}}, "cpu"),
        ({"resources": {"memory": "-5GB"}}, "memory"),
        ({"resources": {"gpu": "H900:1"}}, "gpu"),
        ({"name": "has space"}, "name"),
        ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env"),
        ({"env": {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}}, "env"),
        ({"env": {"PORT": "80"}}, "env"),
        ({"env": {"GPUPROVIDER_TASK_ID": "t-forged"}}, "env"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"workdir": "relative/dir"}, "workdir"),
        ({"max_duration_s": 0}, "max_duration_s"),
        ({"retry": {"attempts": 0}}, "retry"),
        ({"kind": "daemon"}, "kind"),
        ({"colour": "blue"}, "colour"),
        ({"command": []}, "command"),
        ({"ports": ["a", "a"]}, "port names repeat"),
    ],
)
def test_bad_specs_name_the_field(fields, where):
    with pytest.raises(ValidationError) as caught:
        _spec(**fields)
    assert where in str(caught.value)


def test_ordinary_names_that_start_like_reserved_ones_are_fine():
    """PORTAL_URL was refused because it starts with PORT."""
    env = {"PORTAL_URL": "https://x", "PORTS": "80", "CUDA_HOME": "/usr/local/cuda"}
    assert _spec(env=env).env == env


def test_spec_needs_command_or_image():
    with pytest.raises(ValidationError, match="give a command"):
        TaskSpec.model_validate({})


def test_retry_backoff_grows_and_is_capped():
    retry = _spec(
        retry={"attempts": 5, "backoff_s": 1, "backoff_factor": 3, "max_backoff_s": 5}
    ).retry
    assert [retry.delay_s(n) for n in (1, 2, 3)] == [1, 3, 5]


def test_state_machine_table():
    S = TaskState

    def check(source, target):
        return TASKS.check(SimpleNamespace(state=source, id="t-1"), target, "because")

    check(S.QUEUED, S.SCHEDULED)
    check(S.RUNNING, S.PREEMPTED)
    check(S.FAILED, S.QUEUED)  # a retry
    with pytest.raises(IllegalTransition, match=r"task t-1 cannot go from succeeded to running"):
        check(S.SUCCEEDED, S.RUNNING)
    with pytest.raises(IllegalTransition):
        check(S.QUEUED, S.RUNNING)  # never skips scheduling
    # every state at rest but the ends can be cancelled
    for state in TaskState:
        if state not in TERMINAL and state != S.CANCELLING:
            assert S.CANCELLING in TRANSITIONS[state], state
    assert all(not TRANSITIONS[s] for s in (S.SUCCEEDED, S.CANCELLED, S.EXPIRED))
