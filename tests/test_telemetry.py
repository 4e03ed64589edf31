"""Telemetry as libraries, no daemon: the kernel log reader on real XID lines, the
stand-in NVML read through the same code as the driver, the rule engine, the circuit
breaker, alerts and the config that names them."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuprovider.config import ConfigError, ProviderConfig, load_config
from gpuprovider.telemetry.alerts import Alert, Alerter, Smtp
from gpuprovider.telemetry.gpus import GpuSample, poll_gpus
from gpuprovider.telemetry.history import History
from gpuprovider.telemetry.kernel_log import KernelLog, parse_line, pci_key
from gpuprovider.telemetry.rules import (
    DEFAULT_RULES,
    CircuitBreaker,
    RuleEngine,
    parse_duration,
    rules_in_force,
)
from gpuprovider.telemetry.standin import ENV
from gpuprovider.testing import StandinGpus, free_port, wait_for

# Lines as drivers print them (r535-r570), through dmesg, the journal and /dev/kmsg.
REAL_LINES = [
    ("NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.", 79, "0000:3b:00"),
    (
        "[ 1234.567890] NVRM: Xid (PCI:0000:b3:00): 48, pid=2519, name=python3, An uncorrectable "
        "double bit error (DBE) has been detected on GPU in the framebuffer at partition 0.",
        48,
        "0000:b3:00",
    ),
    (
        "Nov 30 01:02:03 gpu7 kernel: NVRM: Xid (PCI:0000:18:00): 13, pid='<unknown>', "
        "name=<unknown>, Graphics Exception: ESR 0x505648=0x102000e",
        13,
        "0000:18:00",
    ),
    ("NVRM: Xid (PCI:0001:c1:00.0): 94, pid=77, Contained ECC error.", 94, "0001:c1:00"),
]


@pytest.mark.parametrize(("line", "code", "pci"), REAL_LINES)
def test_real_xid_lines_are_read(line, code, pci):
    xid = parse_line(line)
    assert (xid.code, xid.pci_bus_id) == (code, pci)


def test_pci_addresses_of_nvml_and_the_kernel_meet():
    assert pci_key("00000000:3B:00.0") == pci_key("0000:3b:00") == "0000:3b:00"
    assert pci_key("not a bus") == ""


def test_kernel_log_reads_only_new_lines_skips_and_counts_malformed(tmp_path):
    path = tmp_path / "kern.log"
    path.write_text(REAL_LINES[0][0] + "\n")  # before the reader opened: not acted on
    log = KernelLog(str(path))
    assert log.read() == []
    with path.open("a") as f:
        f.write("usb 1-1: new device\n")  # not about an XID: ignored, not malformed
        f.write("NVRM: Xid (PCI:zz): garbage\n")  # names an XID, unreadable: counted
        f.write(REAL_LINES[1][0] + "\n")
        f.write("NVRM: Xid (PCI:0000:3b:00): 4")  # no end of line yet
    assert [x.code for x in log.read()] == [48]
    assert log.malformed == 1
    with path.open("a") as f:
        f.write("8, pid=1, the rest\n")
    assert [x.code for x in log.read()] == [48]  # the line, once whole
    path.write_text(REAL_LINES[3][0] + "\n")  # truncated and written anew
    assert [x.code for x in log.read()] == [94]


def test_kernel_log_that_cannot_be_opened_says_why_and_keeps_trying(tmp_path):
    log = KernelLog(str(tmp_path / "missing"))
    assert log.read() == [] and "cannot read" in log.error


def test_kmsg_records_are_read_from_the_device_when_readable():
    if not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        pytest.skip("/dev/kmsg is not readable and writable here (root is needed)")
    log = KernelLog("/dev/kmsg")
    assert log.read() == []  # opened at the end: nothing older is acted on
    # a benign XID (13) on an address no GPU has: written as the kernel would keep it
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write("NVRM: Xid (PCI:0000:fe:00): 13, pid=1, name=gpuprovider-test, a test line\n")
    found = wait_for(lambda: log.read(), 5, "the line through /dev/kmsg")
    assert [(x.code, x.pci_bus_id) for x in found] == [(13, "0000:fe:00")]
    assert log.error == ""
    log.close()


def test_the_standin_nvml_is_read_through_the_driver_path(tmp_path, monkeypatch):
    gpus = StandinGpus(tmp_path / "nvml.json", 2)
    monkeypatch.setenv(ENV, str(gpus.path))
    gpus.set(0, utilization=75, ecc={"uncorrected_volatile": 3}, clock_reasons=0x40)
    gpus.gpus[1].pop("pcie_replays")  # "not supported" on this one
    gpus.write()
    poll = poll_gpus()
    first, second = poll.samples
    assert first.utilization_ratio == 0.75 and first.ecc["uncorrected_volatile"] == 3
    assert first.clock_event_reasons == 0x40 and first.pci_bus_id == "00000000:10:00.0"
    assert first.nvlink_errors == {"crc_flit": 0, "crc_data": 0, "replay": 0, "recovery": 0}
    assert second.pcie_replays is None  # unknown, never a made-up 0
    known = {s.uuid: s.index for s in poll.samples}
    gpus.set(1, lost=True)  # fell off the bus: NVML fails on it
    lost = {s.uuid: s for s in poll_gpus(known).samples}
    assert not lost["GPU-standin-0001"].present and lost["GPU-standin-0000"].present
    del gpus.gpus[1]  # vanished from the list entirely
    gpus.write()
    gone = {s.uuid: s for s in poll_gpus(known).samples}
    assert not gone["GPU-standin-0001"].present


def test_no_driver_is_no_samples_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "absent.json"))
    poll = poll_gpus()
    assert poll.samples == [] and poll.error.startswith("NVML unavailable")


def _sample(uuid="GPU-a", **fields):
    return GpuSample(uuid=uuid, index=0, **fields)


def _rules(*names):
    return [r for r in DEFAULT_RULES if r.name in names]


def test_ecc_rule_holds_on_a_rise_within_its_window_and_not_on_a_steady_count():
    engine = RuleEngine(_rules("ecc-uncorrected"))
    steady = {"uncorrected_volatile": 5}
    assert engine.observe_gpus("n", 0, [_sample(ecc=steady)]) == []
    assert engine.observe_gpus("n", 10, [_sample(ecc=steady)]) == []  # old errors: no news
    found = engine.observe_gpus("n", 20, [_sample(ecc={"uncorrected_volatile": 6})])
    assert [(f.rule.name, f.new) for f in found] == [("ecc-uncorrected", True)]
    again = engine.observe_gpus("n", 30, [_sample(ecc={"uncorrected_volatile": 6})])
    assert [f.new for f in again] == [False]  # still holding: alerts may resend
    assert engine.observe_gpus("n", 700, [_sample(ecc={"uncorrected_volatile": 6})]) == []


def test_a_counter_reset_by_the_driver_is_not_a_rise():
    engine = RuleEngine(_rules("ecc-uncorrected"))
    engine.observe_gpus("n", 0, [_sample(ecc={"uncorrected_volatile": 9})])
    assert engine.observe_gpus("n", 10, [_sample(ecc={"uncorrected_volatile": 0})]) == []


def test_temperature_must_hold_for_the_window():
    engine = RuleEngine(_rules("gpu-hot"))
    assert engine.observe_gpus("n", 0, [_sample(temperature_c=95)]) == []
    assert engine.observe_gpus("n", 200, [_sample(temperature_c=95)]) == []
    assert engine.observe_gpus("n", 250, [_sample(temperature_c=80)]) == []  # cooled: restart
    assert engine.observe_gpus("n", 400, [_sample(temperature_c=95)]) == []
    assert len(engine.observe_gpus("n", 700, [_sample(temperature_c=95)])) == 1


def test_benign_xids_match_no_shipped_rule():
    engine = RuleEngine(DEFAULT_RULES)
    xids = [(parse_line(REAL_LINES[2][0]), "GPU-a"), (parse_line(REAL_LINES[3][0]), "GPU-a")]
    assert engine.observe_xids("n", 0, xids) == []
    found = engine.observe_xids("n", 1, [(parse_line(REAL_LINES[1][0]), "GPU-a")])
    assert [f.rule.name for f in found] == ["xid-reset-gpu"]


def test_circuit_breaker_allows_a_quarter_of_the_fleet_per_window():
    breaker = CircuitBreaker(25, 600)
    assert breaker.limit(2) == 1 and breaker.limit(16) == 4
    assert [breaker.allow(0, 16, 1) for _ in range(5)] == [True] * 4 + [False]
    assert breaker.is_open(1, 16) and breaker.allow(601, 16, 1)


def test_history_keeps_a_day_per_gpu_at_one_point_a_minute():
    history = History(points=1440)
    for minute in range(3000):
        history.add(minute * 60.0, _sample(utilization_ratio=0.5, memory_used_bytes=10))
    points = history.of("GPU-a")
    assert len(points) == 1440 and points[-1]["utilization_ratio"] == 0.5


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ({"signal": "ecc_mystery", "actions": ["warn"]}, "signal"),
        ({"signal": "xid", "xids": [48], "actions": ["explode"]}, "actions"),
        ({"signal": "xid", "xids": [13], "actions": ["cordon_gpu"]}, "benign"),
        ({"signal": "xid", "actions": ["alert"]}, "needs the XIDs"),
        ({"signal": "gpu_lost", "window": "soon", "actions": ["alert"]}, "not a duration"),
        ({"signal": "temperature", "xids": [48], "actions": ["alert"]}, "signal xid only"),
        ({"signal": "gpu_lost", "actions": ["remove_node"]}, "node_unreachable only"),
    ],
)
def test_a_wrong_rule_is_a_config_error_naming_it(tmp_path, rule, says):
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"name": "mine", **rule}.items()]
    path = tmp_path / "provider.toml"
    path.write_text("[[repair.rules]]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "[repair] rules[0]" in str(caught.value) and says in str(caught.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[alerts]\nwebhooks = ["not a url"]\n', "[alerts] webhooks[0]"),
        ('[alerts]\nresend_interval = "often"\n', "not a duration"),
        ('[repair]\nbreaker_window = "10 minutes"\n', "[repair] breaker_window"),
        ('[alerts.smtp]\nhost = "127.0.0.1"\nsender = "me"\nto = ["a@b"]\n', "sender"),
    ],
)
def test_wrong_alert_and_repair_settings_are_config_errors(tmp_path, text, says):
    path = tmp_path / "provider.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"\S") as caught:
        load_config(path)
    assert says in str(caught.value)


def test_a_configured_rule_replaces_the_shipped_one_of_its_name():
    config = ProviderConfig.model_validate(
        {
            "repair": {
                "rules": [
                    {
                        "name": "gpu-hot",
                        "signal": "temperature",
                        "enabled": False,
                        "actions": ["warn"],
                    },
                    {
                        "name": "nvlink",
                        "signal": "nvlink_errors",
                        "threshold": 10,
                        "window": "1h",
                        "actions": ["alert"],
                    },
                ]
            }
        }
    )
    names = [r.name for r in rules_in_force(config.repair)]
    assert "gpu-hot" not in names and "nvlink" in names and "ecc-uncorrected" in names
    assert parse_duration("1h30m") == 5400 and parse_duration(90) == 90


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append(json.loads(body))
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.got, server.status = [], 200
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_alerts_reach_a_webhook_once_per_resend_interval(webhook):
    url = f"http://127.0.0.1:{webhook.server_port}/hook"
    alerter = Alerter([url], resend_interval_s=3600)
    alert = Alert(key="r/n/g", title="ecc-uncorrected on n", text="rise=2", at=1000.0)
    assert alerter.send(alert)
    assert not alerter.send(Alert(key="r/n/g", title="t", text="x", at=2000.0))  # duplicate
    assert alerter.suppressed == 1
    alerter.deliver(alert)
    body = webhook.got[0]
    assert body["text"].startswith("[warning] ecc-uncorrected on n")  # Slack, Mattermost
    assert body["content"] and body["alerts"][0]["labels"]["alertname"]  # Discord, Alertmanager
    assert alerter.send(Alert(key="r/n/g", title="t", text="x", at=1000.0 + 3601))  # resent


def test_a_failing_webhook_or_smtp_server_is_counted_not_raised(webhook):
    webhook.status = 500
    dead_port = free_port()  # nothing listens here
    alerter = Alerter(
        [f"http://127.0.0.1:{webhook.server_port}/T0/B0/secret", f"http://127.0.0.1:{dead_port}/"],
        Smtp("127.0.0.1", dead_port, "gpp@example.org", ("ops@example.org",)),
        timeout_s=2,
    )
    results = alerter.deliver(Alert(key="k", title="t", text="x"))
    assert [r.ok for r in results] == [False, False, False]
    assert "HTTP 500" in results[0].detail and alerter.failed == 3
    assert "secret" not in results[0].target  # Slack's and Discord's secrets are in the path
