"""An MQTT broker for a mesh: mosquitto when installed, else an embedded amqtt broker,
or an existing broker named by ``MICROFED_BROKER=host:port``.

    with start_broker() as b:          # kind="auto"
        print(b.kind, b.host, b.port)

Both local brokers listen on 127.0.0.1 only, allow anonymous clients unless given a mesh's
broker directory (``auth_dir``: password file + ACL from ``microfed provision``; mosquitto
then refuses strangers, and ``tls_port`` adds a TLS listener; the embedded amqtt broker
checks the same passwords and ACL through its plugins), keep no persistence (a restarted
broker starts empty, like a rebooted one), cap the packet size and disable Nagle's
algorithm (the node writes a large PUBLISH in two pieces; with Nagle on every QoS 1 round
trip costs ~44 ms). amqtt runs in a subprocess (``python -m microfed_host.broker
--serve-amqtt``) so it can be killed, paused and restarted exactly like mosquitto.

Run a broker in the foreground:  python -m microfed_host.broker [--kind K] [--port P]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

ENV_VAR = "MICROFED_BROKER"
KINDS = ("auto", "mosquitto", "amqtt", "external")
DEFAULT_MAX_PACKET = 1 << 20  # a signed 650-parameter update is ~3 KB; 1 MiB is ample
MOSQUITTO_HINT = "apt-get install mosquitto"
AMQTT_HINT = "pip install amqtt"
_READY = "MICROFED-AMQTT-READY"
MAX_QUEUED_MESSAGES = 1_000_000


class BrokerError(RuntimeError):
    """A broker could not be started, reached or stopped; the message says why."""


def find_mosquitto() -> str | None:
    """The mosquitto binary; Debian puts it in /usr/sbin, often not on a user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except Exception:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (what only this machine can reach)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error for anything else."""
    host, sep, port_s = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise BrokerError(f"broker address must be host:port with port 1..65535, got {text!r}")
    return host, int(port_s)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mqtt_probe(host: str, port: int, timeout: float = 2.0, refused_ok: bool = False) -> None:
    """One MQTT 3.1.1 CONNECT/CONNACK exchange; raises OSError/BrokerError if the
    endpoint is not an MQTT broker that accepts anonymous clients (with refused_ok, a
    broker that answers "not authorized" counts as up)."""
    cid = b"microfed-probe-%d" % os.getpid()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(cid).to_bytes(2, "big") + cid
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        resp = b""
        while len(resp) < 4:
            chunk = s.recv(4 - len(resp))
            if not chunk:
                raise BrokerError(f"{host}:{port} closed the connection during the MQTT handshake")
            resp += chunk
        if resp[0] != 0x20 or resp[1] != 2:
            raise BrokerError(f"{host}:{port} is not an MQTT broker (reply {resp.hex()})")
        if resp[3] != 0 and not (refused_ok and resp[3] in (4, 5)):
            raise BrokerError(f"{host}:{port} refused an anonymous MQTT connection (code {resp[3]})")
        with contextlib.suppress(OSError):
            s.sendall(b"\xe0\x00")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


class Broker:
    """A running (or startable) broker. ``kind`` is 'mosquitto', 'amqtt' or 'external'."""

    def __init__(
        self,
        kind: str = "auto",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        tcp_nodelay: bool = True,
        workdir: str | Path | None = None,
        startup_timeout: float = 15.0,
        external: str | None = None,
        auth_dir: str | Path | None = None,
        tls_port: int | None = None,
        extra_conf: list[str] | None = None,
    ) -> None:
        """extra_conf: more mosquitto.conf lines (a bridge to a root broker: hier.py); the
        configuration file is then 0600, since a bridge's lines hold its remote password."""
        if kind not in KINDS:
            raise BrokerError(f"unknown broker kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not 0 <= port < 65536:
            raise BrokerError(f"port must be 0..65535, got {port}")
        if not 64 <= max_packet_size <= 268435455:
            raise BrokerError(f"max_packet_size must be 64..268435455, got {max_packet_size}")
        if external is None and kind in ("auto", "external"):
            external = os.environ.get(ENV_VAR) or None
        if kind == "external" and external is None:
            raise BrokerError(f"kind 'external' needs an address: set {ENV_VAR}=host:port")
        self.requested = kind
        self.kind = "external" if external is not None else kind
        self.host = host
        self.port = port
        self._external = parse_address(external) if external is not None else None
        self.max_packet_size = max_packet_size
        self.tcp_nodelay = tcp_nodelay
        self.startup_timeout = startup_timeout
        self._own_dir = workdir is None
        self._dir = Path(workdir) if workdir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.auth_dir = Path(auth_dir).resolve() if auth_dir is not None else None
        if tls_port is not None and (self.auth_dir is None or not 0 <= tls_port < 65536):
            raise BrokerError("tls_port needs auth_dir (the mesh's broker/ certificates) and 0..65535")
        self.tls_port = tls_port
        self.extra_conf = list(extra_conf or [])
        if self.extra_conf and kind not in ("mosquitto",):
            raise BrokerError("extra mosquitto.conf lines (a bridge) need kind 'mosquitto'")

    # -- public --------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / f"{self.kind}.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Broker:
        """Start (or, after stop/kill, restart on the same port) and wait until it
        answers an MQTT CONNECT. Raises BrokerError with the reasons on failure."""
        if self._external is not None:
            self.host, self.port = self._external
            try:
                mqtt_probe(self.host, self.port, timeout=self.startup_timeout,
                           refused_ok=self.auth_dir is not None)
            except (OSError, BrokerError) as e:
                raise BrokerError(f"external broker {self.address} ({ENV_VAR}) unusable: {e}") from e
            return self
        if self.running():
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="microfed-broker-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        kinds = [self.kind] if self.kind != "auto" else ["mosquitto", "amqtt"]
        errors: list[str] = []
        try:
            for k in kinds:
                try:
                    self._start_kind(k)
                    self.kind = k
                    return self
                except BrokerError as e:
                    errors.append(f"{k}: {e}")
        except BaseException:
            # e.g. Ctrl-C during start-up: leave no broker process or temp dir behind.
            self.close()
            raise
        self.close()
        raise BrokerError("could not start an MQTT broker; " + "; ".join(errors))

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after timeout). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self.resume()
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._release(proc)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the clients can tell."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._release(proc)

    def _release(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None
        self._paused = False

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password file and ACL (e.g. after a revoke; the
        embedded amqtt broker re-reads them when they change, so this is a no-op for it).
        Existing connections stay; the next CONNECT is checked against the new files."""
        if self.kind == "amqtt":
            return  # the embedded broker's auth plugins re-read changed files by themselves
        if self.kind != "mosquitto":
            raise BrokerError(f"cannot reload a broker of kind {self.kind}: reload it yourself")
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGHUP)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open (the kernel still ACKs) but nothing answers."""
        if self._proc is not None and self._proc.poll() is None and not self._paused:
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Stop the broker and remove its work directory (if this object made it)."""
        self.stop()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Broker(kind={self.kind!r}, address={self.address!r}, running={self.running()})"

    # -- internals -------------------------------------------------------------
    def _start_kind(self, kind: str) -> None:
        fixed = self.port != 0
        last = ""
        # An auto-picked free port can be taken before the broker binds it: retry.
        for _ in range(1 if fixed else 3):
            if kind == "mosquitto":
                ok, last = self._start_mosquitto(self.port if fixed else free_port(self.host))
            else:
                ok, last = self._start_amqtt(self.port)
            if ok:
                return
        raise BrokerError(last)

    def _wait_ready(self, port: int, log: Path) -> tuple[bool, str]:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.startup_timeout
        err = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._release(proc)
                return False, f"exited with code {proc.returncode}: {_tail(log) or '(no log)'}"
            try:
                mqtt_probe(self.host, port, timeout=1.0, refused_ok=self.auth_dir is not None)
                self.port = port
                return True, ""
            except (OSError, BrokerError) as e:
                err = str(e)
            time.sleep(0.05)
        self.kill()
        return False, f"no MQTT answer on {self.host}:{port} within {self.startup_timeout:g} s ({err}); log: {_tail(log)}"

    def _start_mosquitto(self, port: int) -> tuple[bool, str]:
        exe = find_mosquitto()
        if exe is None:
            return False, f"mosquitto not installed ({MOSQUITTO_HINT})"
        assert self._dir is not None
        log = self._dir / "mosquitto.log"
        conf = self._dir / "mosquitto.conf"
        from microfed_host import brokerauth, keys

        lines = ["per_listener_settings false"]
        if self.auth_dir is not None:
            lines += brokerauth.mosquitto_auth_lines(self.auth_dir)
        else:
            lines.append("allow_anonymous true")
        lines += [
            f"listener {port} {self.host}",
            f"set_tcp_nodelay {'true' if self.tcp_nodelay else 'false'}",
            f"max_packet_size {self.max_packet_size}",
            "persistence false",
            # A persistent client (the coordinator) that reads slowly under a flood must not
            # lose queued QoS 1 updates: mosquitto's default drops beyond 1000 per client.
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            f"log_dest file {log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # As root, mosquitto would switch to user 'mosquitto', who cannot write the log
            # in our temp dir; naming the current user keeps it as is (ignored when not root).
            brokerauth.mosquitto_user_line(),
        ]
        if self.tls_port is not None and self.auth_dir is not None:
            if not self.tls_port:
                self.tls_port = free_port(self.host)
            lines += brokerauth.mosquitto_tls_lines(self.auth_dir, self.tls_port, self.host)
        lines += self.extra_conf
        keys.write_secret_file(conf, "\n".join(lines) + "\n")
        with open(self._dir / "mosquitto.stderr", "ab") as err:
            self._proc = subprocess.Popen(
                [exe, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        ok, why = self._wait_ready(port, log)
        if not ok and not _tail(log):
            why += " " + _tail(self._dir / "mosquitto.stderr")
        return ok, why

    def _start_amqtt(self, port: int) -> tuple[bool, str]:
        if not amqtt_available():
            return False, f"amqtt not importable ({AMQTT_HINT})"
        if self.tls_port is not None:
            return False, "the embedded amqtt broker has no TLS listener here (use mosquitto)"
        assert self._dir is not None
        log = self._dir / "amqtt.log"
        cmd = [
            sys.executable, "-m", "microfed_host.broker", "--serve-amqtt",
            "--host", self.host, "--port", str(port),
            "--max-packet-size", str(self.max_packet_size), "--log", str(log),
        ]
        if self.auth_dir is not None:
            cmd += ["--auth-dir", str(self.auth_dir)]  # no TLS listener: mosquitto only
        env = dict(os.environ)
        # The child must import this package even when the parent runs from a checkout.
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env
            )
        proc = self._proc
        assert proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            b = os.read(proc.stdout.fileno(), 1)
            if not b:
                break
            line += b
        text = line.decode(errors="replace").split()
        if len(text) != 2 or text[0] != _READY or not text[1].isdigit():
            self.kill()
            return False, f"embedded amqtt broker did not start: {_tail(log) or '(no log)'}"
        return self._wait_ready(int(text[1]), log)


def start_broker(kind: str = "auto", **kw: object) -> Broker:
    """Start and return a broker (use as a context manager to stop it)."""
    return Broker(kind, **kw).start()  # type: ignore[arg-type]


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The --broker option for CLI commands that need one (e.g. mesh run)."""
    parser.add_argument(
        "--broker",
        default=None,
        metavar="auto|mosquitto|amqtt|HOST:PORT",
        help=f"broker to start, or an existing one to use (default: ${ENV_VAR} if set, else auto:"
        " mosquitto when installed, else embedded amqtt)",
    )


def broker_from_arg(value: str | None, **kw: object) -> Broker:
    """Build (not start) a Broker from a --broker value."""
    if value is None or value == "auto":
        return Broker("auto", **kw)  # type: ignore[arg-type]
    if value in ("mosquitto", "amqtt"):
        return Broker(value, **kw)  # type: ignore[arg-type]
    return Broker("external", external=value, **kw)  # type: ignore[arg-type]


# -- embedded amqtt server (runs in the child process) ------------------------------
def _limit_packet_size(max_size: int) -> None:
    """amqtt has no packet-size limit: reject a fixed header announcing more than
    max_size (the reader loop then drops the client, as mosquitto does)."""
    from amqtt.mqtt.packet import MQTTFixedHeader

    orig = MQTTFixedHeader.from_stream.__func__  # type: ignore[attr-defined]

    async def from_stream(cls: type, reader: object) -> object:
        hdr = await orig(cls, reader)
        if hdr is not None and hdr.remaining_length > max_size:
            raise ConnectionAbortedError(f"packet of {hdr.remaining_length} bytes > max {max_size}")
        return hdr

    MQTTFixedHeader.from_stream = classmethod(from_stream)  # type: ignore[assignment,method-assign]


def _serve_amqtt(host: str, port: int, max_packet_size: int, log: str | None,
                 auth_dir: str | None = None) -> int:
    import asyncio
    import logging

    logging.basicConfig(
        filename=log, level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    from amqtt.broker import Broker as AmqttBroker

    _limit_packet_size(max_packet_size)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "sys_interval": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    if auth_dir is not None:
        # The mesh's password file and ACL, enforced like mosquitto does (amqtt_auth.py).
        config["plugins"] = {
            "microfed_host.amqtt_auth.MeshPasswordPlugin": {"password_file": str(Path(auth_dir) / "passwd")},
            "microfed_host.amqtt_auth.MeshACLPlugin": {"acl_file": str(Path(auth_dir) / "acl")},
        }

    async def main() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        server = broker._servers["default"].instance
        bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # asyncio sets TCP_NODELAY on every accepted TCP transport already.
        sys.stdout.write(f"{_READY} {bound}\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m microfed_host.broker", description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET)
    p.add_argument("--serve-amqtt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log", default=None, help=argparse.SUPPRESS)
    p.add_argument("--auth-dir", default=None,
                   help="a mesh's broker/ directory: refuse anonymous clients, enforce its ACL")
    a = p.parse_args(argv)
    if a.serve_amqtt:
        return _serve_amqtt(a.host, a.port, a.max_packet_size, a.log, a.auth_dir)
    try:
        with Broker(a.kind, host=a.host, port=a.port, max_packet_size=a.max_packet_size,
                    auth_dir=a.auth_dir) as b:
            print(f"{b.kind} broker on {b.address} (log: {b.log_path}); Ctrl-C stops it", flush=True)
            while b.kind == "external" or b.running():
                time.sleep(0.5)
            print(f"broker exited; log: {b.log_path}", file=sys.stderr)
            return 1
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
