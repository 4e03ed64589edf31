"""Alerts to webhooks (one JSON body that Slack, Discord, Mattermost and Alertmanager's
webhook receiver all read) and optionally by email (SMTP). An alert with the same key
is sent again only after `resend_interval_s`. Sending runs on a thread of its own: a
webhook that hangs or an SMTP server that does not answer is logged and counted, and
never holds up the daemon."""

from __future__ import annotations

import logging
import queue
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx

from gpuprovider.config import AlertsConfig
from gpuprovider.domain.durations import parse_duration

log = logging.getLogger(__name__)


@dataclass
class Alert:
    key: str  # what de-duplicates it: rule/node/gpu
    title: str
    text: str
    severity: str = "warning"  # "critical" when a rule took something out of service
    labels: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def body(self) -> dict[str, Any]:
        line = f"[{self.severity}] {self.title}: {self.text}"
        starts = datetime.fromtimestamp(self.at, UTC).isoformat()
        return {
            "text": line,  # Slack, Mattermost
            "content": line[:2000],  # Discord
            # Alertmanager's webhook payload, version 4
            "version": "4",
            "status": "firing",
            "receiver": "gpuprovider",
            "groupKey": self.key,
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": self.title, "severity": self.severity, **self.labels},
                    "annotations": {"summary": self.title, "description": self.text},
                    "startsAt": starts,
                }
            ],
        }


@dataclass(frozen=True)
class Smtp:
    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    starttls: bool = False
    username: str = ""
    password_file: str = ""


@dataclass
class Delivery:
    target: str
    ok: bool
    detail: str


class Alerter:
    def __init__(
        self,
        webhooks: list[str],
        smtp: Smtp | None = None,
        resend_interval_s: float = 4 * 3600,
        timeout_s: float = 5.0,
    ):
        self.webhooks, self.smtp = webhooks, smtp
        self.resend_interval_s, self.timeout_s = resend_interval_s, timeout_s
        self.sent = 0
        self.failed = 0
        self.suppressed = 0
        self._last: dict[str, float] = {}
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=1000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.webhooks or self.smtp)

    def start(self) -> None:
        if self.configured and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.timeout_s * 2)
            self._thread = None

    def send(self, alert: Alert) -> bool:
        """Queue `alert` unless the same key went out less than the resend interval
        ago. True when queued."""
        if not self.configured:
            return False
        with self._lock:
            last = self._last.get(alert.key)
            if last is not None and alert.at - last < self.resend_interval_s:
                self.suppressed += 1
                return False
            self._last[alert.key] = alert.at
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.failed += 1
            log.error("alert queue full; dropped %s", alert.title)
            return False
        return True

    def _run(self) -> None:
        while (alert := self._queue.get()) is not None:
            self.deliver(alert)

    def deliver(self, alert: Alert) -> list[Delivery]:
        """Send `alert` now to every target (the test command waits for this)."""
        results = [self._post(url, alert) for url in self.webhooks]
        if self.smtp is not None:
            results.append(self._mail(self.smtp, alert))
        for result in results:
            if result.ok:
                self.sent += 1
            else:
                self.failed += 1
                log.error("alert %r to %s failed: %s", alert.title, result.target, result.detail)
        return results

    def _post(self, url: str, alert: Alert) -> Delivery:
        # Slack's and Discord's secrets are in the path: logs and answers show the host only
        parsed = httpx.URL(url)
        shown = f"{parsed.scheme}://{parsed.host}{f':{parsed.port}' if parsed.port else ''}/…"
        try:
            answer = httpx.post(url, json=alert.body(), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            return Delivery(shown, False, f"{type(exc).__name__}: {exc}")
        if answer.status_code >= 300:
            return Delivery(shown, False, f"HTTP {answer.status_code}: {answer.text[:200]}")
        return Delivery(shown, True, f"HTTP {answer.status_code}")

    def _mail(self, smtp: Smtp, alert: Alert) -> Delivery:
        target = f"smtp://{smtp.host}:{smtp.port}"
        message = EmailMessage()
        message["Subject"] = f"[gpuprovider {alert.severity}] {alert.title}"
        message["From"], message["To"] = smtp.sender, ", ".join(smtp.to)
        message.set_content(alert.text)
        try:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=self.timeout_s) as client:
                if smtp.starttls:
                    client.starttls(context=ssl.create_default_context())
                if smtp.username:
                    password = Path(smtp.password_file).read_text().strip()
                    client.login(smtp.username, password)
                client.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            return Delivery(target, False, f"{type(exc).__name__}: {exc}")
        return Delivery(target, True, "sent")


def alerter_for(config: AlertsConfig) -> Alerter:
    """The alerter [alerts] asks for."""
    smtp = config.smtp
    return Alerter(
        [str(url) for url in config.webhooks],
        Smtp(
            smtp.host,
            smtp.port,
            smtp.sender,
            tuple(smtp.to),
            smtp.starttls,
            smtp.username,
            smtp.password_file,
        )
        if smtp
        else None,
        parse_duration(config.resend_interval),
        config.timeout_s,
    )
