"""Watching a run from outside its coordinator, for `microfed mesh run` and `microfed
coordinator` alike: the options (--metrics, --dashboard, --dashboard-token, --alerts) and
what they start — all of it reads the coordinator store, none of it touches the coordinator.

    add_arguments(parser)
    obs = Observers.start(args, run_dir / "coordinator.sqlite", say=print)   # ObserveError
    obs.broker_ready(host, port, mesh_dir)    # when the run's broker is known (--alerts mqtt)
    obs.stop()                                # -> a closing line about alerts, or ""
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN_ENV = "MICROFED_DASHBOARD_TOKEN"


class ObserveError(ValueError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alerts", metavar="URL|FILE|mqtt", action="append", default=None,
                   help="deliver alerts (ban, digest disagreement, cross-check mismatch, silent "
                   "node, accuracy drop; each with its evidence) to a webhook (http(s) URL: "
                   "POST JSON), a JSON-lines file, or 'mqtt': the run's broker, topic "
                   "microfed/<mesh>/alerts; repeatable (docs/metrics.md)")
    p.add_argument("--metrics", metavar="[HOST:]PORT", default=None,
                   help="serve Prometheus metrics of the run at http://HOST:PORT/metrics "
                   "(host default 127.0.0.1; docs/metrics.md)")
    p.add_argument("--dashboard", metavar="[HOST:]PORT", default=None,
                   help="serve the live dashboard of the run at http://HOST:PORT/ (host "
                   "default 127.0.0.1; elsewhere it needs a token; docs/dashboard.md)")
    p.add_argument("--dashboard-token", dest="dashboard_token", default=None,
                   help="token the dashboard asks for (at least 16 characters; default: $"
                   + TOKEN_ENV + "); required when --dashboard binds beyond localhost")


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.metrics or args.alerts or args.dashboard)


class Observers:
    def __init__(self) -> None:
        self.metrics: Any = None
        self.dashboard: Any = None
        self.watcher: Any = None
        self.mqtt_sink: Any = None

    @classmethod
    def start(cls, args: argparse.Namespace, store: Path,
              say: Callable[[str], None] = print) -> Observers:
        """Start what the options ask for; ObserveError (nothing left running) if one fails."""
        obs = cls()
        try:
            obs._start(args, Path(store), say)
        except BaseException:
            obs.stop()
            raise
        return obs

    def _start(self, args: argparse.Namespace, store: Path, say: Callable[[str], None]) -> None:
        if args.metrics:
            from microfed_host import metrics

            try:
                self.metrics = metrics.serve(args.metrics, store)
            except (ValueError, OSError) as e:
                raise ObserveError(f"--metrics {args.metrics}: {e}") from None
            say(f"metrics: {metrics.url(self.metrics)}")
        if args.dashboard:
            from microfed_host import dashboard

            token = args.dashboard_token or os.environ.get(TOKEN_ENV) or None
            try:
                self.dashboard = dashboard.serve(args.dashboard, store, token)
            except (ValueError, OSError) as e:
                raise ObserveError(f"--dashboard {args.dashboard}: {e}") from None
            say(f"dashboard: {self.dashboard.url}"
                + (" (token required: ?token=... once in the browser)" if token else ""))
        if args.alerts:
            from microfed_host import alerts

            sinks = []
            for target in args.alerts:
                if target == "mqtt":
                    self.mqtt_sink = alerts.MqttSink()
                    sinks.append(self.mqtt_sink)
                else:
                    sinks.append(alerts.sink(target))
            self.watcher = alerts.Watcher(store, sinks)
            self.watcher.start()

    def broker_ready(self, host: str, port: int, mesh_dir: Path) -> None:
        """The run's broker and mesh directory, for `--alerts mqtt`."""
        if self.mqtt_sink is not None:
            self.mqtt_sink.connect(host, port, Path(mesh_dir))

    def poll(self) -> None:
        """Deliver the alerts the store holds now (the watcher does it every second)."""
        if self.watcher is not None:
            self.watcher.poll()

    def stop(self) -> str:
        """Stop everything (the alert watcher after one last poll); a line about the alerts
        delivered, or "" without --alerts."""
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics = None
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        line = ""
        if self.watcher is not None:
            self.watcher.stop()
            w = self.watcher
            line = (f"alerts: {w.sent} delivered, {w.failed} failed"
                    + (f" (last: {w.last_error})" if w.failed else ""))
            self.watcher = None
        if self.mqtt_sink is not None:
            self.mqtt_sink.close()
            self.mqtt_sink = None
        return line
