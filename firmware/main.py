# microfed node boot: load bundle and config, bring the board's network up, connect to the
# broker, run the node loop. Runs as /main.py on a board and as
#   MICROPYPATH=<repo>/shared:<repo>/firmware \
#       micropython -X heapsize=4m <repo>/firmware/main.py [NODE_DIR]
# on the unix port (firmware/README.md has the whole contract). Output: one JSON object per
# line on stdout (or config "log"; with config "link": "serial", as L frames on the serial line
# that also carries the MQTT session: docs/bridge.md). Exit codes: 0 run finished (final GLOBAL_MODEL),
# 2 bad bundle/config/shard/state (message says which), 4 idle exit, 1 unexpected fatal error,
# 130 interrupted. Bad input at run time is never fatal: it is logged, counted and reported.

import gc
import json
import os
import sys
import time

EXIT_DONE = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_IDLE = 4

_out = [None]  # the log file, when config "log" names one
_link = [None]  # the serialstream.Link, when config "link" is "serial"
# A block held from the start of boot until the node makes its round's large buffers
# (Node(release=...)): then freed, it is a contiguous hole they fit in. Made after the
# config's parsing and the imports, whose long-lived objects land anywhere, a 2.6 KB
# block was not always there on a 64 KB heap (measured: a 5-node mesh's Cortex-M3 nodes
# failed every boot at 64 KB, 2026-11-27). Sized for the default model's buffers (about
# 10 KB for 650 parameters and 13 nodes), at most a quarter of the heap free then.
RESERVE = 12 * 1024
_reserve = [None]


def _release():
    _reserve[0] = None
    gc.collect()


def emit(d):
    f = _out[0]
    link = _link[0]
    if link is not None and f is None:
        link.log(json.dumps(d))  # one L frame: the line whole
        return
    # Streamed, not built: json.dump writes the line piece by piece, so the longest one (the
    # exit event's counters, ~1 KB) needs no block of its size (a 48 KB unix32 node once lost
    # its exit line to that).
    out = sys.stdout if f is None else f
    json.dump(d, out)
    out.write("\n")
    if f is not None:
        try:
            f.flush()
        except Exception:
            pass


def _mkdir(path):
    try:
        os.mkdir(path)
    except OSError:
        pass  # exists (EEXIST); a real failure shows up on the first state write
    try:
        os.stat(path)
    except OSError:
        raise OSError("cannot create state directory %s" % path)


def _absolute_path():
    # MICROPYPATH may hold relative directories; they must survive the chdir below.
    try:
        cwd = os.getcwd()
    except Exception:
        return
    for i in range(len(sys.path)):
        p = sys.path[i]
        if p and p[0] not in "/." and ":" not in p:
            sys.path[i] = cwd + "/" + p


def boot(argv):
    """Everything that can fail because of the node's files; returns (node, transport, hal)
    or raises BootError with a readable message."""
    gc.collect()
    try:
        # A quarter of the free heap at most: the imports and the config still need the rest
        # (the whole 12 KB starved a 40 KB unix32 node's boot).
        _reserve[0] = bytearray(min(RESERVE, gc.mem_free() // 4))
    except MemoryError:
        pass
    if argv:
        # Before any import: packages remember the (possibly relative) path they came from.
        _absolute_path()
        try:
            os.chdir(argv[0])
        except OSError:
            raise BootError("node directory %s does not exist" % argv[0])
    import config
    import hal as halmod
    from microfed import model, replay

    try:
        bundle, cfg = config.load("bundle.json", "config.json")
    except config.ConfigError as e:
        raise BootError(str(e))
    # Read once: Bundle and Config are fields only, so nothing keeps the module's functions
    # and tables now (~1 KB of a 32-bit node's heap: benchmarks/node_boot_heap.py).
    config = None
    sys.modules.pop("config", None)
    if cfg.log:
        _out[0] = open(cfg.log, "a")
    hal = halmod.load()
    try:
        # Opened, not read: the node reads one sample row at a time from flash.
        shard = open(cfg.shard, "rb")
    except OSError:
        raise BootError("%s: cannot read the data shard (host/microfed_host/data.py writes it)"
                        % cfg.shard)
    try:
        _mkdir(cfg.state_dir)
    except OSError as e:
        raise BootError(str(e))
    import node as nodemod

    broker = cfg.broker or bundle.broker
    if broker is None:
        raise BootError("no broker: bundle.json and config.json both lack 'broker'")
    try:
        from mqtt import Transport
    except ImportError as e:
        raise BootError("MQTT client missing (%r): put firmware/ on the module path" % e)
    login = bundle.mqtt or {}
    stream = allocate = None
    if cfg.link == "serial":
        # The board's serial line carries both the log and the MQTT session; the broker is
        # whatever `microfed bridge` on the other end connects to (TLS is the bridge's).
        import serialstream

        link = serialstream.Link()
        _link[0] = link
        stream = link.open
        allocate = link.allocate  # with the node's boot-time buffers (use_rx_buffer)
    t = Transport(bundle.node_id, broker["host"], broker["port"], user=login.get("username"),
                  password=login.get("password"),
                  ssl=_tls(bundle, broker) if stream is None else None, stream=stream,
                  allocate=allocate,
                  keepalive=cfg.keepalive,
                  nodelay=True, max_msg=cfg.max_msg, io_timeout_ms=cfg.io_timeout_ms,
                  publish_timeout_ms=cfg.publish_timeout_ms,
                  log=lambda m: emit({"ev": "mqtt", "node": bundle.node_id, "msg": m}))
    try:
        nd = nodemod.Node(bundle, cfg, shard, t, hal, emit, release=_release)
    except (ValueError, nodemod.StateError, replay.StoreError, model.ModelError) as e:
        raise BootError(str(e))
    shard = None  # the node holds the open file now
    # Node.on_message never publishes (its output waits for step()): messages that arrive
    # while a PUBACK is awaited go straight to it, instead of waiting in RAM, 2.7 KB each.
    t.deliver_while_busy = True
    t.set_handler(nd.on_message)
    nd.subscribe()
    wifi = cfg.wifi or bundle.wifi
    return nd, t, hal, wifi, cfg, broker


class BootError(Exception):
    pass


def _tls(bundle, broker):
    """An SSLContext that verifies the broker against the mesh CA, or None (plain MQTT)."""
    if not broker.get("tls"):
        return None
    try:
        import ssl
    except ImportError:
        try:
            # The C module that the frozen ssl.py wraps: a MICROPYPATH without '.frozen'
            # (the unix-port mesh runner's) hides ssl.py but not tls.
            import tls as ssl
        except ImportError:
            raise BootError("broker 'tls' is set but this MicroPython has neither ssl nor tls")
    if bundle.broker_ca is None:
        raise BootError("broker 'tls' is set but bundle.json has no 'broker_ca' (re-provision)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED  # pyright: ignore[reportAttributeAccessIssue]
    try:
        ctx.load_verify_locations(cadata=bundle.broker_ca)
    except TypeError:
        ctx.load_verify_locations(bundle.broker_ca)  # tls.SSLContext: positional only
    except Exception as e:
        raise BootError("broker_ca: %r" % e)
    return ctx


def run(argv):
    try:
        nd, t, hal, wifi, cfg, broker = boot(argv)
    except BootError as e:
        emit({"ev": "boot_error", "error": str(e)})
        return EXIT_CONFIG
    gc.collect()
    nd.log("boot", hal=hal.NAME, mode=cfg.mode, broker="%s:%d" % (broker["host"], broker["port"]),
           last_round=nd.state.last_round, next_seq=nd.seqs.last + 1,
           params=nd.model.n_params, samples=nd.n_samples, free_heap=hal.free_heap())
    while cfg.link == "tcp" and not hal.connect(wifi, cfg.wifi_timeout_ms,
                                                lambda m: nd.log("hal", msg=m)):
        time.sleep_ms(2000)
    # The first attempt may wait; after that poll() reconnects with back-off by itself.
    if not t.connect(5000):
        nd.log("mqtt_waiting", error=t.last_error)
    down_since = None
    failures = 0
    while not nd.done:
        try:
            t.poll(100)
            nd.step()
            failures = 0
            if t.connected:
                down_since = None
            elif down_since is None:
                down_since = time.ticks_ms()
            elif cfg.link == "tcp" and time.ticks_diff(time.ticks_ms(), down_since) > 30000:
                # The broker has been unreachable for a while: maybe the Wi-Fi dropped.
                hal.connect(wifi, cfg.wifi_timeout_ms, lambda m: nd.log("hal", msg=m))
                down_since = time.ticks_ms()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            # A bug must not stop the node: report it, back off, carry on.
            failures += 1
            nd.error("loop", e)
            time.sleep_ms(min(100 * failures, 5000))
    nd.drain(3000)
    gc.collect()  # the exit line, with every counter, is the run's longest: room for it
    nd.log("exit", code=nd.exit_code, counters=nd.counters())
    t.close()
    return nd.exit_code


def main():
    argv = sys.argv[1:] if len(sys.argv) > 1 else []
    try:
        code = run(argv)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        emit({"ev": "fatal", "error": repr(e)})
        try:
            sys.print_exception(e)
        except Exception:
            pass
        code = EXIT_FATAL
    f = _out[0]
    if f is not None:
        f.close()
    if sys.platform in ("linux", "darwin", "win32"):
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
