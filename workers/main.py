"""The worker process: receive its share of the tunnel, translate, deliver, reply.

I/O shell around ``workers/engine/datapath.py``: a raw IPv4 protocol-41 socket that captures this
worker's share of the tunnel in recvmmsg batches (kernel fan-out; with the coordinator's
fan-out, a ZeroMQ PULL socket brings batches instead) and sends the encapsulated replies
straight to the tunnel peer (the kernel writes the outer header: TTL 64, DF clear as RFC 4213
§3.2.1 asks for a static MTU); a TUN device for the services (``workers/tun.py``), written a
batch per io_uring call (``workers/uring.py``) or a packet per write(2); and a ZeroMQ REP
control socket that answers ``flows``/``ping``/``stats`` requests. The engine returns what to
send (``Output``); a packet that raised is counted there as INTERNAL_ERROR and logged here,
rate-limited, and never kills the loop. Where the compiled loops are built (not for a CLAT or
several tunnels), the devices and the capture are served by a compiled loop around the poll
(workers/_tunread.c ``serve``): it reads, translates, writes and sends the plain packets of
known sessions with no Python run, and hands the rest back.

Started by the coordinator as ``python -m sixgate.workers.main --settings FILE --index N``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from itertools import islice
from typing import Any, NamedTuple

import zmq

from sixgate.workers import control, seccomp
from sixgate.workers.capture import DROP_ALL, TunnelCapture, attach_filter
from sixgate.workers.control import control_endpoint, data_endpoint
from sixgate.workers.engine.counters import (
    PROCESSING_SECONDS_BOUNDS,
    Histogram,
    TunnelTraffic,
    worker_stats,
)
from sixgate.workers.engine.datapath import Datapath, DeviceLoops, Output
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.flows import Bib, FlowTable, Session
from sixgate.workers.engine.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from sixgate.workers.engine.settings import (
    Settings,
    nat64_table,
    shard_pools,
    worker_pool,
    worker_routes,
)
from sixgate.workers.engine.wire import decode_batch, fanout_filter
from sixgate.workers.journal import FLUSH_INTERVAL_S, journal_endpoint, read_shard, split_held
from sixgate.workers.journal import encode as encode_journal
from sixgate.workers.mmsg import BatchSender
from sixgate.workers.privileges import become_supervisor, drop_privileges, user_id
from sixgate.workers.uring import UringWriter

try:  # a batch of TUN reads in C, built at install beside the engine's compiled loops
    from sixgate.workers._tunread import read_packets, serve
except ImportError:  # pragma: no cover - a host without gcc at install time
    read_packets = serve = None  # type: ignore[assignment]

log = logging.getLogger("sixgate.worker")

PR_SET_PDEATHSIG = 1
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
# Packets per wakeup from each side, balanced (4 batches of 64 in, 256 back) so that an
# inbound flood cannot starve the services' replies: their TUN queue would overflow.
INBOUND_BATCHES = 4
BUSY_BATCH = 8  # a device read that found this many packets is read again before a poll
TUN_BATCH = 256
# The compiled loop around the devices and the capture hands back to Python after this many
# packets at the latest, so the control socket, the tick and the journal never wait long.
SERVE_LIMIT = 4096
TRACEBACK_LOG_INTERVAL_S = 10.0
# Send errors that are load or routing, counted as send_failed without a log line each.
QUIET_SEND_ERRORS = frozenset({errno.ENOBUFS, errno.EAGAIN, errno.ENETUNREACH,
                               errno.EHOSTUNREACH, errno.EMSGSIZE, errno.EPERM})


class InternalErrorLog:
    """Logs a packet that raised (counted as internal_error by the caller) at most once per
    ``TRACEBACK_LOG_INTERVAL_S``: a packet that trips a bug, sent in a flood, must not flood
    the log too. The workers and the coordinator's capture loop share it."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._last = -TRACEBACK_LOG_INTERVAL_S

    def packet_raised(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last >= TRACEBACK_LOG_INTERVAL_S:
            self._last = now
            log.error("%s: packet raised %r (counted as internal_error)", self.who, exc,
                      exc_info=exc)


def tun_name(settings: Settings, index: int) -> str:
    """Worker ``index``'s device (its NAT64 IPv6 one adds "i", a 464XLAT box's CLAT one "c")."""
    return f"{settings.name}{index}"


def worker_devices(settings: Settings, index: int) -> list[str]:
    """Worker ``index``'s devices a take-over may hand over: its own and its NAT64 IPv6 one
    (the CLAT's is made again at every start)."""
    return [tun_name(settings, index), f"{tun_name(settings, index)}i"]


def clat_device(settings: Settings) -> str:
    """The CLAT's device: worker 0's own alone (mode "clat"), a third one of worker 0's beside
    the NAT64 (a 464XLAT box)."""
    return tun_name(settings, 0) + ("" if settings.mode == "clat" else "c")


class Served(NamedTuple):
    """What one call of workers/_tunread.c ``serve`` did and left, in its order."""

    ready: list[int]  # the watched descriptors readable
    ident: int  # the last IPv4 identification given
    left_ipv6: list[bytes]  # packets its compiled loops left to the engine, in order
    left_ipv4: list[bytes]
    left_capture: list[bytes]
    statuses: list[int]  # the left captured packets' tp_status
    to_tunnel: list[tuple[bytes, bytes]]  # for the tunnel, when it has no send socket
    inbound: tuple[int, ...]  # the inbound compiled loop's 13 totals
    returning: tuple[int, ...]  # the returning loop's 9
    seconds_in: float  # in the compiled loops, each way
    seconds_back: float
    translated_in: int
    translated_back: int
    device_failed: int  # writes to the device refused
    captured: int  # packets read from the capture, and their bytes
    captured_bytes: int
    sent: int  # packets sent to the tunnel, and their IPv6 bytes
    sent_bytes: int
    send_failed: int
    send_errno: int  # the last refusal's
    ring_errno: int  # the device's io_uring failed as a whole (not used again in the call)


class DeviceOut:
    """Writes to one TUN device: a batch per io_uring submission (workers/uring.py) where the
    ring works, else one write(2) per packet; a ring that fails as a whole (not a packet:
    how far the batch got is not known, so all of it counts as failed) gives way to write(2)
    for good. ``write`` returns how many packets failed."""

    def __init__(self, fd: int, ring: UringWriter | None, index: int) -> None:
        self.fd = fd
        self.ring = ring
        self.index = index  # the worker's, for the log

    def write(self, packets: list[bytes]) -> int:
        if self.ring is not None and len(packets) > 1:  # one packet: write(2) is cheaper
            try:
                return self.ring.write(packets)
            except OSError as exc:
                self.ring_failed(exc)
                return len(packets)
        failed = 0
        for packet in packets:
            try:
                os.write(self.fd, packet)
            except OSError:
                failed += 1
        return failed

    def ring_failed(self, exc: OSError) -> None:
        """The ring failed as a whole: said once, and write(2) from now on."""
        log.warning("worker %d: io_uring failed (%s): one write(2) per packet to the device "
                    "from now on", self.index, exc)
        self.close()

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the coordinator dies, so no worker outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PROTOCOL_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}


def pool4_usage(flows: FlowTable) -> list[dict[str, object]]:
    """A NAT64 worker's pool4 per address and protocol: ports and ports in use."""
    if flows.ports is None:
        return []
    return [{"protocol": PROTOCOL_NAMES[proto], "address": str(ipaddress.IPv4Address(address)),
             "ports": size, "in_use": in_use}
            for proto, address, size, in_use in flows.ports.usage()]


BINDING_LOG = logging.getLogger("sixgate.nat64.bindings")


def log_bindings(events: list[tuple[bool, Bib]]) -> None:
    """RFC 6888 REQ-12: one logfmt line per NAT64 binding made or ended, with the client's
    transport address and its pool4 one, never a destination; the list is emptied."""
    for made, bib in events:
        BINDING_LOG.info("nat64_binding=%s proto=%s client=[%s]:%d pool4=%s:%d",
                         "create" if made else "delete", PROTOCOL_NAMES.get(bib.proto, "?"),
                         ipaddress.IPv6Address(bib.client6), bib.cport,
                         ipaddress.IPv4Address(bib.pool4), bib.pport)
    events.clear()


def describe_session(session: Session, now: float, index: int) -> dict[str, Any]:
    proto = PROTOCOL_NAMES.get(session.proto, str(session.proto))
    return {
        "proto": proto,
        "client": f"[{ipaddress.IPv6Address(session.client6)}]:{session.cport}",
        "gateway": f"[{ipaddress.IPv6Address(session.gw6)}]:{session.gwport}",
        "pool": f"{ipaddress.IPv4Address(session.pool4)}:{session.pport}",
        "target": f"{ipaddress.IPv4Address(session.target4)}:{session.tport}",
        "rule": session.rule,
        "state": session.state,
        "idle_s": round(now - session.last_seen, 1),
        "worker": index,
    }


# How long a starting worker waits for the coordinator's data socket (bound before any worker
# is spawned, so this is reached only when something is badly wrong).
DATA_CONNECT_TIMEOUT_S = 10.0
JOURNAL_QUEUE = 1000  # journal messages queued towards the coordinator before one is lost
JOURNAL_LINGER_MS = 1000


def connect_now(sock: zmq.Socket[bytes], endpoint: str, timeout_s: float,
                what: str = "data") -> None:
    """Connect ``sock`` to ``endpoint`` and block until the connection is made.

    ZeroMQ connects in its I/O thread, later than ``connect()`` returns. The run directory is
    the gateway user's alone (mode 0700), so a connect first tried after the worker has given
    up root fails for good (EACCES, retried forever): the worker would then get nothing from
    the coordinator. So the connection is made while the worker is still root. The monitor
    is attached before ``connect()`` so the event cannot pass unseen."""
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(int(timeout_s * 1000)):
            raise OSError(f"no connection to the coordinator's {what} socket {endpoint} after "
                          f"{timeout_s:g} s")
        monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(0)


class Worker:
    def __init__(self, settings: Settings, index: int, settings_path: str = "") -> None:
        self.settings = settings
        self.settings_path = settings_path  # re-read at a reload
        self.index = index
        self.nat64 = bool(settings.nat64_prefix)
        self.nat64_alone = settings.mode == "nat64"
        # A NAT64 alone has no forward rules, so no pool of their own.
        # With more shards than workers, its shards' slices (a shard moves with them).
        pool: list[bytes] | dict[int, list[bytes]] = (
            [] if settings.mode == "nat64"
            else worker_pool(settings.pool, settings.workers, index)
            if settings.shard_count == settings.workers
            else shard_pools(settings.pool, settings.shard_count, settings.workers, index))
        self.datapath = Datapath(settings, pool, settings.workers, index=index)
        if self.nat64 and settings.nat64_log_bindings:
            self.datapath.flows.binding_events = []
        self.journal: zmq.Socket[Any] | None = None  # the shard journal's push socket
        self.next_journal = 0.0
        if settings.flow_journal:
            self.datapath.flows.journal = {}
        self.running = True
        self.keep_devices = False  # a take-over's stop: its devices stay for the next run
        self.errors = InternalErrorLog(f"worker {index}")
        self.tun_fd = -1
        # NAT64 for this host's side: a second device, for the clients' IPv6 only, so an IPv6
        # flood cannot crowd the IPv4 answers out of one queue (each is read in turn).
        self.tun6_fd = -1
        self.tun_out: DeviceOut | None = None  # the TUN device's writes
        self.wake_fd = -1  # signals wake the loop here (``main``)
        # A 464XLAT box: worker 0 also has the CLAT's device (the NAT64's own stay as above).
        self.clat_fd = -1
        self.clat_out: DeviceOut | None = None
        self.capture: TunnelCapture | None = None
        self.processing = {"inbound": Histogram(PROCESSING_SECONDS_BOUNDS),
                           "from_services": Histogram(PROCESSING_SECONDS_BOUNDS)}

    # --- setup --------------------------------------------------------------------------------

    def open(self) -> None:
        from sixgate.workers.tun import (  # pyroute2: userspace backend only
            configure_tun,
            kept_devices,
            local_pool4,
            open_tun,
        )

        settings = self.settings
        name = tun_name(settings, self.index)
        # Devices a take-over's previous run kept for this one (workers/tun.py), and the
        # uid that may keep them for the next.
        adopted = set(kept_devices(worker_devices(settings, self.index)))
        if adopted:
            log.info("worker %d: device(s) %s kept by the previous run, taken over",
                     self.index, ", ".join(sorted(adopted)))
        owner = user_id(settings.user)
        self.tun_fd = open_tun(name, owner)
        if settings.mode == "clat":
            self._open_clat(name)
            return
        nat64_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        main_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        if not self.nat64_alone:
            main_routes += worker_routes(settings.pool, settings.workers, self.index,
                                         settings.shard_count)
        table = nat64_table(settings.name, self.index)
        if self.nat64:
            # NAT64: this worker's pool4 addresses are routed to its device, in its own table
            # (the gateway's marks select it). The host's own sockets look a route up before
            # their packets are marked (the output hook then steers them to the owner): worker
            # 0's devices in the main table give them one.
            nat64_routes += sorted({ipaddress.IPv4Network(row[0])
                                    for row in settings.nat64_pool4})
            main_routes += nat64_routes if self.index == 0 else []
        # Every worker's device a previous run may have kept (up to 64 workers: config.py),
        # and the pool slices the other workers take from a kept device (a take-over to
        # another worker count): left for them to move (no instant without a route).
        siblings = frozenset(device for i in range(64) if i != self.index
                             for device in worker_devices(settings, i))
        theirs = frozenset() if self.nat64_alone else frozenset(
            net for i in range(settings.workers) if i != self.index
            for net in worker_routes(settings.pool, settings.workers, i, settings.shard_count))
        configure_tun(name, main_routes, nat64_routes, table,
                      sends_from_local=bool(local_pool4(settings.nat64_pool4)),
                      adopted=name in adopted, siblings=siblings, theirs=theirs)
        if self.nat64 and settings.nat64_input == "tun":
            prefix: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
                ipaddress.IPv6Network(settings.nat64_prefix)]
            self.tun6_fd = open_tun(f"{name}i", owner)
            configure_tun(f"{name}i", prefix if self.index == 0 else [], prefix, table,
                          adopted=f"{name}i" in adopted)
        self._open_writer()
        if settings.clat_enabled and self.index == 0:
            self.clat_fd = open_tun(clat_device(settings))
            self._configure_clat(clat_device(settings))
            self.clat_out = self._device_out(self.clat_fd)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control_endpoint(settings.run_dir, self.index))
        if settings.flow_journal:
            self.journal = self.ctx.socket(zmq.PUSH)
            self.journal.setsockopt(zmq.SNDHWM, JOURNAL_QUEUE)
            # At a stop the last message is still delivered (the next run resumes from it).
            self.journal.setsockopt(zmq.LINGER, JOURNAL_LINGER_MS)
            # Connected while still root, like the data socket (``connect_now``): a NAT64 alone
            # connects nothing else, and nothing would wait for ZeroMQ's I/O thread, which
            # then tried for ever under the seccomp filter (EPERM).
            connect_now(self.journal, journal_endpoint(settings.run_dir),
                        DATA_CONNECT_TIMEOUT_S, "journal")
        self._resume_shard()
        if self.nat64_alone:
            return  # no tunnel
        self.send_sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
        self.send_sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
        self.send_sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        self.send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.send_sock.bind((settings.local_ipv4, 0))
        # The raw socket would receive the IP layer's copy of every protocol-41 packet; the
        # capture reads them (workers/capture.py), so a BPF filter drops them before they are
        # queued. Being there, it keeps the kernel from answering Protocol Unreachable.
        attach_filter(self.send_sock, DROP_ALL)
        if settings.fanout == "kernel":
            # The worker's own capture: its classic BPF filter accepts this worker's share of
            # the flow hash (and worker 0 every outer fragment), so no packet crosses the
            # coordinator.
            self.capture = TunnelCapture(
                settings.local_ipv4, fanout_filter(self.index, settings.workers,
                                                   settings.hash_seed, settings.shard_count),
                self.index == 0, self.datapath.counters, min(settings.batch_packets, 256),
                tunnels=settings.all_tunnels())
        self.sender = BatchSender(self.send_sock)
        self.traffic = TunnelTraffic(self.datapath.counters, settings.all_tunnels())
        self.pull.setsockopt(zmq.RCVHWM, settings.queue_batches)
        self.pull.setsockopt(zmq.LINGER, 0)
        if settings.fanout != "kernel":
            connect_now(self.pull, data_endpoint(settings.run_dir, self.index),
                        DATA_CONNECT_TIMEOUT_S)

    def _open_writer(self) -> None:
        """The TUN device's writes (``DeviceOut``)."""
        self.tun_out = self._device_out(self.tun_fd)
        log.info("worker %d: packets to the device by %s", self.index,
                 "io_uring" if self.tun_out.ring is not None else "write(2)")

    def _device_out(self, fd: int) -> DeviceOut:
        """A batch of packets to ``fd`` in one io_uring submission, where [gateway]
        tun_writes asks for it and the kernel allows it, or one write(2) each."""
        ring = None
        if self.settings.tun_writes == "io_uring":
            try:
                ring = UringWriter.open(fd)
            except OSError as exc:
                log.warning("worker %d: io_uring refused (%s): one write(2) per packet to the "
                            "device; set [gateway] tun_writes = \"write\" to say so",
                            self.index, exc)
        return DeviceOut(fd, ring, self.index)

    def _reload(self) -> dict[str, Any]:
        """The coordinator reloaded the config (coordinator/reload.py): take the new settings
        file; the sessions of removed rules end (``Datapath.reconfigure``)."""
        try:
            with open(self.settings_path, encoding="utf-8") as f:
                settings = Settings.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return control.error(f"worker {self.index} cannot read the new settings: {exc}")
        before = self.datapath.counters.events.get(Event.FLOWS_ENDED_BY_RELOAD.value, 0)
        self._send(self.datapath.reconfigure(settings))
        self.settings = settings
        if self.nat64:  # RFC 6888 REQ-12's log, switched on or off
            flows = self.datapath.flows
            if not settings.nat64_log_bindings:
                flows.binding_events = None
            elif flows.binding_events is None:
                flows.binding_events = []
        logging.getLogger().setLevel(settings.log_level.upper())
        ended = self.datapath.counters.events.get(Event.FLOWS_ENDED_BY_RELOAD.value, 0) - before
        if ended:
            log.info("worker %d: %d session(s) of removed rules ended", self.index, ended)
        return control.ok(index=self.index, ended=ended)

    def _resume_shard(self) -> None:
        """After a crash: the sessions of this shard the coordinator kept (workers/journal.py)."""
        records = read_shard(self.settings.run_dir, self.index)
        if records is None:
            return
        records, held = split_held(records)
        now = time.monotonic()
        resumed, refused = self.datapath.flows.restore(records, now)
        holding = self.datapath.flows.restore_held(held, now)
        self.datapath.counters.event(Event.FLOWS_RESUMED, resumed)
        log.info("worker %d: resumed %d session(s) of its shard%s%s", self.index, resumed,
                 f" ({refused} refused: malformed or not this shard's)" if refused else "",
                 f"; {holding} pool4 port(s) still held (RFC 6888 REQ-8)" if holding else "")

    def _flush_journal(self, now: float, last: bool = False) -> None:
        """Push what changed in the shard to the coordinator, at most every
        FLUSH_INTERVAL_S (``last``: now, the worker is stopping)."""
        flows = self.datapath.flows
        if self.journal is None or (now < self.next_journal and not last) or not (
                last or flows.journal or flows.journal_removed or flows.journal_held):
            return
        self.next_journal = now + FLUSH_INTERVAL_S
        records, removed = flows.take_journal()
        try:
            self.journal.send(encode_journal(self.index, records, removed, flows.take_held(),
                                             last=last), zmq.NOBLOCK)
        except zmq.Again:
            # The coordinator is not taking them: its copy misses these (counted).
            self.datapath.counters.event(Event.JOURNAL_LOST)

    def _open_clat(self, name: str) -> None:
        """The CLAT's device: its addresses and routes; its control socket. Nothing else: no
        tunnel, no sessions to journal (a CLAT is stateless)."""
        self._configure_clat(name)
        self._open_writer()
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)  # never connected: no tunnel batches
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control_endpoint(self.settings.run_dir, self.index))
        self.journal = None

    def _configure_clat(self, name: str) -> None:
        """The CLAT device's addresses and routes (workers/tun.py ``configure_clat``)."""
        from sixgate.workers.tun import configure_clat
        settings = self.settings
        routed = configure_clat(name, settings.clat_ipv4_address, settings.clat_ipv6_address,
                                settings.clat_mtu)
        log.info("worker %d: CLAT %s <-> %s under %s on %s%s", self.index,
                 settings.clat_ipv4_address, settings.clat_ipv6_address,
                 settings.clat_plat_prefix, name,
                 f", IPv4 default route through it (MTU {settings.clat_mtu})" if routed else
                 ": this host has an IPv4 default route of its own, so none through the CLAT "
                 "(native IPv4 wins, RFC 6877 §6.3)")

    def close(self) -> None:
        for sock in (getattr(self, "pull", None), getattr(self, "control", None)):
            if sock is not None:
                sock.close(0)
        if self.journal is not None:
            self.journal.close()  # with its linger: the last message still goes out
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()
        for out in (self.tun_out, self.clat_out):
            if out is not None:
                out.close()
        self.tun_out = self.clat_out = None
        if self.keep_devices:
            self._keep_devices()
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
            self.tun_fd = -1
        if self.clat_fd >= 0:
            os.close(self.clat_fd)
            self.clat_fd = -1
        if self.tun6_fd >= 0:
            os.close(self.tun6_fd)
            self.tun6_fd = -1
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def _keep_devices(self) -> None:
        """A take-over's stop: the TUN devices stay, with their routes, for the next run's
        worker (workers/tun.py); the CLAT's is made again as at any start."""
        from sixgate.workers.tun import keep_for_next_run
        for fd in (self.tun_fd, self.tun6_fd):
            if fd < 0:
                continue
            try:
                keep_for_next_run(fd)
            except OSError as exc:  # not its owner (an older run's device): made again
                log.warning("worker %d: cannot keep its device for the next run (%s); it is "
                            "made again", self.index, exc)

    # --- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        # select.poll over the devices and the ZeroMQ sockets' own descriptors (ZMQ_FD), not
        # zmq_poll: that asks each ZeroMQ socket before and after every sleep, two system
        # calls each time, and an idle worker's wakeup is a packet's latency (issue 21). A
        # ZMQ_FD only signals that something changed, so its socket is asked (ZMQ_EVENTS)
        # when it is ready and again after every message handled, until it has none left;
        # the poll does not sleep while a socket may still hold one.
        poller = select.poll()
        capture_fd = self.capture.fileno() if self.capture is not None else -1
        for fd in (self.tun_fd, self.wake_fd, self.tun6_fd, self.clat_fd, capture_fd):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        pull_fd = int(self.pull.getsockopt(zmq.FD))
        control_fd = int(self.control.getsockopt(zmq.FD))
        poller.register(pull_fd, select.POLLIN)
        poller.register(control_fd, select.POLLIN)
        pending = {pull_fd, control_fd}  # asked at the first turn
        next_tick = time.monotonic() + 1.0
        flows = self.datapath.flows
        # With the compiled loops built, the devices and the tunnel's capture are served by a
        # compiled loop around the poll, which runs no Python for a packet it translates
        # (issue 21: an idle gateway's wakeup is a packet's latency); it comes back for
        # everything else. Several tunnels count their traffic per peer: Python's loop.
        # A NAT64 alone and a CLAT have no tunnel (``open`` returns before making one).
        one_row = not hasattr(self, "traffic") or self.traffic.one_row
        served_capture = capture_fd if one_row and self.capture is not None else -1
        send_fd = self.send_sock.fileno() if hasattr(self, "send_sock") else -1
        capture_batch = self.capture.batch if self.capture is not None else 0
        sources = (self.tun6_fd, self.tun_fd, served_capture, capture_batch, self.tun_fd,
                   send_fd)
        watch = [fd for fd in (self.wake_fd, capture_fd, self.clat_fd, pull_fd, control_fd)
                 if fd >= 0 and fd != served_capture]
        devices = serve is not None and self.tun_fd >= 0 and one_row
        while self.running:
            # A journal waiting to go out is sent within its interval even when all is quiet
            # (the compiled loop returns within it once its openers changed the journal).
            timeout = (0 if pending else int(FLUSH_INTERVAL_S * 1000)
                       if flows.journal or flows.journal_removed else 500)
            loops = self.datapath.device_loops(FLUSH_INTERVAL_S) if devices else None
            if loops is not None:
                events = self._serve(loops, sources, watch, timeout)
            else:
                events = {fd for fd, _ in poller.poll(timeout)}
            now = time.monotonic()
            if self.wake_fd in events:  # a signal's byte: the loop's condition decides
                os.read(self.wake_fd, 512)
            if pull_fd in events or pull_fd in pending:
                self._ask(self.pull, pull_fd, pending, self._drain_pull, now)
            if capture_fd in events:
                self._drain_capture(now)
            if self.tun6_fd in events and 0 < self._drain_tun6(now) < BUSY_BATCH:
                # What it wrote the kernel mostly answers at once (an echo, a local
                # service): an idle worker reads it now, not after another poll (issue 21:
                # latency); a busy one leaves it to the poll (no read that finds nothing).
                events.add(self.tun_fd)
            if self.tun_fd in events:
                self._drain_tun(now)
            if self.clat_fd in events:
                self._drain_clat(now)
            if control_fd in events or control_fd in pending:
                self._ask(self.control, control_fd, pending, self._answer_control, now)
            self._flush_journal(now)
            if now >= next_tick:
                next_tick = now + 1.0
                self._send(self.datapath.tick(now))
                if self.capture is not None:
                    self.capture.tick(now)
                self._log_limits(now)
        self._flush_journal(time.monotonic(), last=True)

    def _serve(self, loops: DeviceLoops, sources: tuple[int, int, int, int, int, int],
               watch: list[int], timeout: int) -> set[int]:
        """One call of the compiled loop around the devices and the capture (``sources``:
        workers/_tunread.c ``serve``) with the engine's ``loops``: what it translated, read
        and sent counted, what it left (from the first packet its compiled loops did not take)
        through the engine; the ``watch`` descriptors ready."""
        datapath = self.datapath
        out = self.tun_out
        assert out is not None
        ring = out.ring.compiled_ring() if out.ring is not None else None
        try:
            served = Served._make(serve(watch, timeout, SERVE_LIMIT, sources, loops, ring))
        except OSError:
            raise  # a device or socket that fails, as a read outside it: the worker restarts
        except Exception as exc:  # noqa: BLE001 - as _run_compiled: counted once, logged
            datapath.counters.drop(DropReason.INTERNAL_ERROR)
            self.errors.packet_raised(exc)
            return set()
        datapath.count_served(served.ident, served.inbound, served.returning)
        # What the engine's openers answered themselves (a refused first packet) goes now.
        self._send(datapath.pending())
        if served.translated_in:
            self.processing["inbound"].observe_many(
                served.seconds_in / served.translated_in, served.translated_in)
        if served.translated_back:
            self.processing["from_services"].observe_many(
                served.seconds_back / served.translated_back, served.translated_back)
        counters = datapath.counters
        if served.ring_errno:
            out.ring_failed(OSError(served.ring_errno, os.strerror(served.ring_errno)))
        if served.device_failed:
            counters.drop(DropReason.SEND_FAILED, served.device_failed)
        if served.captured:
            assert self.capture is not None
            self.capture.counted(served.captured, served.captured_bytes)
            self.capture.traffic.received_totals(served.captured, served.captured_bytes)
        if served.sent:
            self.traffic.sent_totals(served.sent, served.sent_bytes)
        if served.send_failed:
            counters.drop(DropReason.SEND_FAILED, served.send_failed)
            if served.send_errno not in QUIET_SEND_ERRORS:
                log.warning("worker %d: %d send(s) to the tunnel failed: %s", self.index,
                            served.send_failed, os.strerror(served.send_errno))
        now = time.monotonic()
        if served.to_tunnel:  # no send socket of its own (a NAT64 alone)
            self._send(Output([], served.to_tunnel))
        if served.left_capture:
            assert self.capture is not None
            # An outer fragment alone completes nothing yet (it waits for the rest).
            whole = self.capture.complete(served.left_capture, served.statuses, now)
            if whole:
                self._from_tunnel(whole, now)
        if served.left_ipv6:
            self._translate(served.left_ipv6, datapath.from_ipv6, "inbound", now)
        if served.left_ipv4:
            self._translate(served.left_ipv4, datapath.from_services, "from_services", now)
        return set(served.ready)

    @staticmethod
    def _ask(sock: zmq.Socket[bytes], fd: int, pending: set[int],
             handle: Callable[[float], None], now: float) -> None:
        """``handle`` what ``sock`` holds; ``fd`` stays in ``pending`` (asked again at the
        next turn, which does not sleep) until the socket says it has nothing."""
        if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            handle(now)
            pending.add(fd)
        else:
            pending.discard(fd)

    def _drain_pull(self, now: float) -> None:
        """Coordinator fan-out: batches of captured packets from the coordinator."""
        for _ in range(INBOUND_BATCHES):
            try:
                message = self.pull.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            packets = decode_batch(message)
            if packets is None:
                log.warning("worker %d: batch with unknown wire version dropped", self.index)
                self.datapath.counters.drop(DropReason.INTERNAL_ERROR)
                continue
            if packets:
                self._from_tunnel(packets, now)

    def _drain_capture(self, now: float) -> None:
        """Kernel fan-out: read this worker's share of the tunnel in recvmmsg batches."""
        capture = self.capture
        assert capture is not None
        for _ in range(INBOUND_BATCHES):
            try:
                packets, read = capture.receive(now)
            except OSError as exc:
                log.warning("worker %d: capture failed: %s", self.index, exc)
                return
            if packets:
                self._from_tunnel(packets, now)
            if read < capture.batch:
                return

    def _from_tunnel(self, packets: list[bytes], now: float) -> None:
        """One batch of captured packets through the engine and out."""
        self._translate(packets, self.datapath.from_tunnel, "inbound", now)

    def _read_tun(self, fd: int) -> list[bytes]:
        """What waits on a TUN device: one read each, up to TUN_BATCH; compiled
        (workers/_tunread.c) where it was built, with the engine's compiled loops."""
        if read_packets is not None and self.datapath.compiled is not None:
            return read_packets(fd, TUN_BATCH)
        packets = []
        read = os.read
        for _ in range(TUN_BATCH):
            try:
                packets.append(read(fd, 65536))
            except BlockingIOError:
                break
        return packets

    def _drain_tun6(self, now: float) -> int:
        """NAT64: the clients' IPv6 waiting on the IPv6 device; the last batch's size."""
        return self._drain_device(self.tun6_fd, self.datapath.from_ipv6, "inbound", now)

    def _drain_tun(self, now: float) -> None:
        """The services' packets (NAT64: the IPv4 internet's; CLAT: the host's IPv4 and the
        PLAT's IPv6) waiting on the TUN device."""
        translate = (self.datapath.from_clat if self.settings.mode == "clat"
                     else self.datapath.from_services)
        self._drain_device(self.tun_fd, translate, "from_services", now)

    def _drain_clat(self, now: float) -> None:
        """A 464XLAT box: the CLAT device beside the NAT64's (this host's IPv4 and the IPv6
        answers to the CLAT's address), translated and written back to it."""
        self._drain_device(self.clat_fd, self.datapath.from_clat, "from_services", now,
                           self.clat_out)

    def _drain_device(self, fd: int, translate: Callable[[list[bytes], float], Output],
                      processing: str, now: float, out: DeviceOut | None = None) -> int:
        """What waits on a device, translated and sent in batches, each one's time observed
        as its mean per packet; the last batch's size. A busy device (a batch of BUSY_BATCH
        or more) is read again at once, up to INBOUND_BATCHES times, instead of through
        another poll: under load the poll's cost is spread over more packets; an idle device
        answers as before."""
        packets: list[bytes] = []
        for _ in range(INBOUND_BATCHES):
            packets = self._read_tun(fd)
            if not packets:
                break
            self._translate(packets, translate, processing, now, out)
            if len(packets) < BUSY_BATCH:
                break
        return len(packets)

    def _translate(self, packets: list[bytes], translate: Callable[[list[bytes], float], Output],
                   processing: str, now: float, out: DeviceOut | None = None) -> None:
        """A batch through the engine and out, its time observed as its mean per packet."""
        start = time.perf_counter()
        output = translate(packets, now)
        self.processing[processing].observe_many(
            (time.perf_counter() - start) / len(packets), len(packets))
        self._send(output, out)

    def _send(self, output: Output, out: DeviceOut | None = None) -> None:
        """Send what the engine returned, its device packets through ``out`` (the TUN
        device's by default; beside a NAT64, the CLAT device's for ``from_clat``); log what
        a packet raised (rate-limited)."""
        counters = self.datapath.counters
        events = self.datapath.flows.binding_events
        if events:
            log_bindings(events)
        if output.raised is not None:
            self.errors.packet_raised(output.raised)
        to_tun = output.to_services + output.to_ipv6 if output.to_ipv6 else output.to_services
        if to_tun:
            device = out or self.tun_out
            assert device is not None
            failed = device.write(to_tun)
            if failed:
                counters.drop(DropReason.SEND_FAILED, failed)
        if output.to_tunnel:
            failed = self.sender.send(output.to_tunnel)
            self.traffic.sent(output.to_tunnel, self.sender.last_bytes)
            if failed:
                counters.drop(DropReason.SEND_FAILED, failed)
                if self.sender.last_errno not in QUIET_SEND_ERRORS:
                    log.warning("worker %d: %d send(s) to the tunnel failed: %s", self.index,
                                failed, os.strerror(self.sender.last_errno))

    def _log_limits(self, now: float) -> None:
        """RFC 6888 REQ-11: tell the operator about limit hits, at most once a minute."""
        report = self.datapath.limit_hits.report_due(now)
        if report:
            log.warning("worker %d: limits hit: %s", self.index, report)

    def _answer_control(self, now: float) -> None:
        try:
            frames = self.control.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        cmd, fields, reply = control.parse_request(frames)
        if reply is not None:
            self.datapath.counters.event(Event.CONTROL_ERRORS)
        elif cmd == "ping":
            reply = control.ok()
        elif cmd == "stats":
            flows = self.datapath.flows
            reply = control.ok(index=self.index, **worker_stats(
                self.datapath.counters, flows.active_by_proto, flows.created_by_proto,
                flows.expired_total, flows.max_flows, flows.pool_in_use(), flows.pool_size,
                self.processing, pool4_usage(flows)))
        elif cmd == "reload":
            reply = self._reload()
        elif cmd == "flows":
            flows = self.datapath.flows
            page = islice(flows.sessions_iter(), control.page_limit(fields))
            reply = control.ok(
                index=self.index,
                bindings=[describe_session(s, now, self.index) for s in page],
                flows={"active": len(flows), "created": flows.created_total,
                       "expired": flows.expired_total, "limit": flows.max_flows,
                       "pool_in_use": flows.pool_in_use(), "pool_size": flows.pool_size},
                counters=self.datapath.counters.as_dict())
        else:
            self.datapath.counters.event(Event.CONTROL_ERRORS)
            reply = control.error(f"unknown command {cmd!r}")
        self.control.send_json(reply)


def standby() -> tuple[int, ...] | None:
    """``--standby``: what a start loads (this module and pyroute2, the slow part) is loaded;
    say so, then wait for the coordinator's go: the capabilities it kept (None: its end of
    the pipe closed)."""
    import sixgate.workers.tun  # noqa: F401 - pyroute2, imported by ``open`` otherwise
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads the pipe from here on
    words = sys.stdin.readline().split()
    if not words or words[0] != "go":
        return None
    return tuple(int(word) for word in words[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sixgate-worker")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--standby", action="store_true",
                        help="load, say \"ready\" on stdout, then wait for \"go\" on stdin "
                        "before reading the settings (``sixgate run --take-over``)")
    args = parser.parse_args(argv)
    die_with_parent()
    caps = standby() if args.standby else ()
    if caps is None:
        return 0  # the coordinator went away before it needed us
    with open(args.settings, encoding="utf-8") as f:
        settings = Settings.from_json(f.read())
    if args.standby and os.geteuid() == 0:
        # Started as root beside the old gateway: what a worker the coordinator started now
        # would be (its user, its ambient capabilities).
        become_supervisor(settings.user, caps)
        die_with_parent()  # a change of credentials cleared it
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s worker-{args.index} %(levelname)s %(message)s")
    if settings.backend == "kernel":
        import asyncio

        from sixgate.workers.relay import run_relay
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            asyncio.run(run_relay(settings, args.index,
                                  control_endpoint(settings.run_dir, args.index), args.settings))
        except OSError as exc:
            log.error("worker %d cannot start its relays: %s", args.index, exc)
            return 1
        return 0
    worker = Worker(settings, args.index, args.settings)

    def stop(_signum: int, _frame: object) -> None:
        worker.running = False

    def stop_for_next_run(_signum: int, _frame: object) -> None:
        # A take-over (the coordinator's SIGUSR2): as SIGTERM, the devices kept for the next
        # run's worker.
        worker.keep_devices = True
        worker.running = False

    # The loop sleeps in poll(): a SIGTERM writes a byte here (the interpreter's wakeup fd),
    # so it wakes at once and ends instead of at its next timeout (a stop is a restart's or an
    # upgrade's outage).
    worker.wake_fd, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR2, stop_for_next_run)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides; Ctrl-C goes to it
    try:
        worker.open()
        # Everything that needs root is open: from here on the worker has no privileges.
        log.info("worker %d: %s", args.index,
                 drop_privileges(settings.user, signal.SIGTERM))
        log.info("worker %d: %s", args.index, seccomp.apply(seccomp.ALLOWED))
    except Exception as exc:  # noqa: BLE001 - OSError, pyroute2's NetlinkError, ...: say it
        log.error("worker %d cannot start: %s", args.index, exc)
        worker.close()
        return 1
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is closed and sent: skip the interpreter's teardown (~0.1 s here), which
    # a restart or a take-over would otherwise wait for with no worker serving.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
