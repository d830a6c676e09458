"""Kernel backend worker: socket-level relays from IPv6 listeners to the IPv4 services.

Where the kernel has sit (``coordinator/kernel_backend.py`` sets the tunnel up), the kernel
decapsulates, checks and terminates IPv6 itself; what remains for sixgate is letting IPv4-only
services answer IPv6 clients. Each worker listens on every forwarded port of every gateway
address with ``SO_REUSEPORT`` (the kernel spreads clients over the workers) on AF_INET6 sockets
with ``IPV6_V6ONLY`` set (inet6(4): never rely on v4-mapped addresses), and relays:

- TCP: one IPv4 connection to the target per client connection, both directions copied, each
  half-close passed on (RFC 9293 §3.6), idle connections closed after the TCP established
  timeout.
- UDP: one connected IPv4 socket per client (address, port) "session", with the same timeouts
  and limits as the userspace backend (RFC 6146 §4 defaults, per source /64 limit).

Relayed clients reach the services from a source address of their own: each IPv6 client
holds one address of the worker's pool slice while it has sessions (RFC 6888 REQ-2 paired
pooling, as the userspace backend), never 127.0.0.1, so a service that trusts localhost does
not trust the internet (issue 13, finding 4). The coordinator makes the pool local
(``coordinator/kernel_backend.py``) so the sockets can bind it without privileges.

Sessions, limits and pool addresses are the userspace backend's own table
(``workers/engine/flows.py FlowTable``): the same global, per /64 and per /48 limits, paired
pooling, early drop of unassured sessions (a UDP session is assured once the service answers;
a TCP connection the kernel accepted has completed its handshake, so it is assured at once) and
the same timeouts, expired by the same timer wheel. Counters use the same structure and names
as the userspace datapath (``workers/engine/counters.py``); the control socket answers the same
``flows``/``ping``/``stats`` requests. I/O shell on asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import socket
import struct
import time
from itertools import islice
from typing import Any, cast

import zmq
import zmq.asyncio

from sixgate.workers import control as protocol
from sixgate.workers import seccomp
from sixgate.workers.engine.counters import Counters, LimitHits, worker_stats
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.flows import FlowTable, Session, worker_share
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP
from sixgate.workers.engine.settings import Forward, Settings, source_allowed, worker_pool
from sixgate.workers.privileges import drop_privileges

log = logging.getLogger("sixgate.relay")

READ_BYTES = 65536
TCP_CONNECT_TIMEOUT_S = 10.0
# A peer that takes none of our data for this long is gone (RFC 9293 §3.8.3: R2 for data at
# least 100 s): a zero-window client cannot pin a session and its two sockets for ever.
DRAIN_TIMEOUT_S = 120.0
# Descriptors besides the sessions': listeners, the control socket, ZeroMQ, logging.
SPARE_DESCRIPTORS = 256
PENDING_DATAGRAMS = 16  # per new UDP session, while its service socket opens
RETIRE_POLL_S = 0.2  # a retiring relay looks this often whether its last connection ended


class RelaySession:
    """The I/O of one relayed session; its table entry (``session``) is the FlowTable's."""

    __slots__ = ("proto", "client", "cport", "gateway", "gwport", "local", "rule", "state",
                 "transport", "upstream", "pending", "session")

    def __init__(self, proto: int, client: str, cport: int, gateway: str, gwport: int,
                 rule: str) -> None:
        self.proto = proto
        self.client = client
        self.cport = cport
        self.gateway = gateway
        self.gwport = gwport
        self.local = ""
        self.rule = rule
        self.state = "connecting" if proto == PROTO_TCP else "open"
        # TCP: the client's transport; UDP: the connected socket to the service.
        self.transport: asyncio.BaseTransport | None = None
        self.upstream: asyncio.BaseTransport | None = None  # TCP: the service's transport
        # UDP datagrams that arrive while the socket to the service is still being opened.
        self.pending: list[bytes] = []
        self.session: Session | None = None

    @property
    def source(self) -> str:
        """The pool address the service sees this client as."""
        return "" if self.session is None else socket.inet_ntoa(self.session.pool4)

    def close(self, reset: bool = False) -> None:
        """The table removed the session (expired, evicted): close what it holds. ``reset``:
        a TCP connection ends with a RST on both sides (SO_LINGER 0), as a reload ends the
        sessions of a removed rule (issue 17)."""
        for transport in (self.transport, self.upstream):
            if transport is not None:
                if reset:
                    sock = transport.get_extra_info("socket")
                    if sock is not None and sock.type == socket.SOCK_STREAM:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                if isinstance(transport, asyncio.WriteTransport):
                    transport.abort()
                else:
                    transport.close()


def packed6(address: str) -> bytes:
    """An IPv6 address as the kernel gives it (a scope suffix dropped), packed."""
    return socket.inet_pton(socket.AF_INET6, address.split("%")[0])


class _UdpToService(asyncio.DatagramProtocol):
    """The IPv4 side of one UDP session: replies go back out of the IPv6 listener."""

    def __init__(self, relay: Relay, session: RelaySession,
                 listener: asyncio.DatagramTransport) -> None:
        self.relay = relay
        self.session = session
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        relay = self.relay
        relay.counters.count("from_services", PROTO_UDP, len(data))
        if self.session.session is not None:
            # The service answered: the session is assured (RFC 6146 §3.5.1 keeps it, early
            # drop never takes it).
            relay.flows.touch_udp(self.session.session, False, time.monotonic())
        try:
            self.listener.sendto(data, (self.session.client, self.session.cport))
            relay.counters.count("outbound", PROTO_UDP, len(data))
        except OSError:
            relay.counters.drop(DropReason.SEND_FAILED)

    def error_received(self, exc: Exception) -> None:
        # The service's port is closed (ICMP port unreachable); the client will time out.
        self.relay.counters.event(Event.UDP_SERVICE_ERRORS)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, rule: Forward, gateway: str, port: int) -> None:
        self.relay = relay
        self.rule = rule
        self.gateway = gateway
        self.gateway6 = packed6(gateway)
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay.udp_from_client(self, data, str(addr[0]), int(addr[1]))


class Relay:
    def __init__(self, settings: Settings, index: int, settings_path: str = "") -> None:
        self.settings = settings
        self.settings_path = settings_path  # where a reload's settings are (the coordinator's)
        self.index = index
        self.counters = Counters()
        pool = worker_pool(settings.pool, settings.workers, index)
        self.flows = FlowTable.for_shard(
            pool, settings.workers, settings.max_flows, settings.max_flows_per_prefix,
            settings.timeouts, max_flows_per_48=settings.max_flows_per_48)
        self.flows.removed = []
        self.connections: dict[Session, RelaySession] = {}
        self.limit_hits = LimitHits()
        self.running = True
        # (proto, port, address) -> (its rule, its listener): what ``reconfigure`` changes.
        self._listeners: dict[tuple[str, int, str], tuple[Forward, asyncio.Server
                                                          | asyncio.BaseTransport]] = {}
        self._filters: dict[Forward, tuple[tuple[int, int], ...]] = {}
        self.drain_timeout_s = DRAIN_TIMEOUT_S
        self.pool_addresses = [socket.inet_ntoa(a) for a in pool]

    # --- sessions and limits ------------------------------------------------------------------

    def _admit(self, connection: RelaySession, rule: Forward, now: float) -> bool:
        """A table entry for a new client session, within the limits (RFC 6888 REQ-4); False
        (counted under its reason) when none may be made."""
        created = self.flows.create(
            connection.proto, packed6(connection.client), connection.cport,
            packed6(connection.gateway), connection.gwport,
            socket.inet_aton(rule.target_ipv4), rule.target_for(connection.gwport),
            rule.label, now)
        if self.flows.removed:
            # Unassured sessions evicted to make room (Linux conntrack's early drop).
            self.counters.event(Event.FLOWS_EVICTED, len(self.flows.removed))
            self._close_removed()
        if isinstance(created, DropReason):
            self.counters.drop(created)
            self.limit_hits.hit(created)
            return False
        connection.session = created
        self.connections[created] = connection
        if connection.proto == PROTO_TCP:
            self.flows.assure(created)  # the kernel accepted it: the handshake is complete
        self.counters.event(Event.FLOWS_CREATED_TCP if connection.proto == PROTO_TCP
                            else Event.FLOWS_CREATED_UDP)
        return True

    def _source_allowed(self, rule: Forward, client: str) -> bool:
        """The rule's ``from`` list; a client outside it is refused as by a closed port."""
        nets = self._filters.get(rule)
        if nets is None:
            nets = self._filters[rule] = rule.source_filter() or ()
        if not nets or source_allowed(nets, packed6(client)):
            return True
        self.counters.drop(DropReason.SOURCE_NOT_ALLOWED)
        return False

    def _forget(self, connection: RelaySession) -> None:
        """The session ended on its own (closed, failed): out of the table."""
        session = connection.session
        if session is not None and self.connections.pop(session, None) is not None:
            self.flows.close(session)
            self.flows.removed.clear()  # type: ignore[union-attr]

    def _close_removed(self) -> None:
        """Close the I/O of the sessions the table removed (expired or evicted)."""
        removed = self.flows.removed
        assert removed is not None
        for session in removed:
            connection = self.connections.pop(session, None)
            if connection is not None:
                connection.close()
        removed.clear()

    # --- TCP ----------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          rule: Forward, gateway: str, port: int) -> None:
        peer = writer.get_extra_info("peername")
        now = time.monotonic()
        session = RelaySession(PROTO_TCP, peer[0], peer[1], gateway, port, rule.label)
        session.transport = writer.transport
        if not self._source_allowed(rule, peer[0]) or not self._admit(session, rule, now):
            writer.transport.abort()
            return
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(rule.target_ipv4, rule.target_for(port),
                                            local_addr=(session.source, 0)),
                    TCP_CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError):
                # The service is down: the client gets a reset, as the kernel would send.
                self.counters.event(Event.TCP_SERVICE_UNREACHABLE)
                writer.transport.abort()
                return
            session.upstream = up_writer.transport
            local = up_writer.get_extra_info("sockname")
            session.local = f"{local[0]}:{local[1]}"
            session.state = "established"
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, session, "inbound", "to_services"),
                    self._pipe(up_reader, writer, session, "from_services", "outbound"))
            finally:
                up_writer.close()
            session.state = "closed"
        finally:
            self._forget(session)
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    session: RelaySession, rx: str, tx: str) -> None:
        idle_s = self.settings.timeouts.tcp_established_s
        try:
            while True:
                data = await asyncio.wait_for(reader.read(READ_BYTES), idle_s)
                if not data:
                    break
                if session.session is not None:
                    self.flows.touch(session.session, time.monotonic())
                self.counters.count(rx, PROTO_TCP, len(data))
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.drain_timeout_s)
                self.counters.count(tx, PROTO_TCP, len(data))
            # RFC 9293 §3.6: pass the half-close on; the other direction may go on.
            if writer.can_write_eof():
                writer.write_eof()
        except (TimeoutError, OSError, ConnectionError):
            writer.transport.abort()

    # --- UDP ----------------------------------------------------------------------------------

    def udp_from_client(self, listener: _UdpListener, data: bytes, client: str,
                        cport: int) -> None:
        now = time.monotonic()
        self.counters.count("inbound", PROTO_UDP, len(data))
        entry = self.flows.lookup_v6(PROTO_UDP, packed6(client), cport, listener.gateway6,
                                     listener.port)
        session = None if entry is None else self.connections.get(entry)
        if session is None:
            session = RelaySession(PROTO_UDP, client, cport, listener.gateway, listener.port,
                                   listener.rule.label)
            if (not self._source_allowed(listener.rule, client)
                    or not self._admit(session, listener.rule, now)):
                return
            asyncio.get_running_loop().create_task(
                self._open_udp(session, listener, data))
            return
        self.flows.touch_udp(entry, True, now)  # type: ignore[arg-type]
        if session.transport is not None:
            cast(asyncio.DatagramTransport, session.transport).sendto(data)
            self.counters.count("to_services", PROTO_UDP, len(data))
        elif len(session.pending) < PENDING_DATAGRAMS:
            session.pending.append(data)
        else:
            self.counters.drop(DropReason.QUEUE_FULL)

    async def _open_udp(self, session: RelaySession, listener: _UdpListener,
                        first: bytes) -> None:
        loop = asyncio.get_running_loop()
        if listener.transport is None:
            return
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpToService(self, session, listener.transport),  # type: ignore[arg-type]
                local_addr=(session.source, 0),
                remote_addr=(listener.rule.target_ipv4, listener.rule.target_for(listener.port)))
        except OSError:
            self.counters.drop(DropReason.SEND_FAILED)
            self._forget(session)
            return
        if session.session is None or not session.session.alive:
            transport.close()  # removed from the table while the socket was being opened
            return
        session.transport = transport
        local = transport.get_extra_info("sockname")
        session.local = f"{local[0]}:{local[1]}"
        for data in (first, *session.pending):
            transport.sendto(data)
            self.counters.count("to_services", PROTO_UDP, len(data))
        session.pending.clear()

    def expire(self, now: float) -> None:
        """Remove sessions idle past their timeouts (RFC 6146 §4, the table's timer wheel) and
        close their sockets; report limit hits at most once a minute (RFC 6888 REQ-11)."""
        report = self.limit_hits.report_due(now)
        if report:
            log.warning("worker %d: limits hit: %s", self.index, report)
        expired = self.flows.expire(now)
        if expired:
            self.counters.event(Event.FLOWS_EXPIRED, expired)
        self._close_removed()

    # --- listeners ----------------------------------------------------------------------------

    @staticmethod
    def _listener_socket(kind: int, address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, kind)
        # inet6(4): an IPv6 listener must never see IPv4 as v4-mapped addresses.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.setblocking(False)
        return sock

    def check_pool_is_local(self) -> None:
        """The clients' sources must be bindable: the coordinator makes the pool local
        (coordinator/kernel_backend.py). Said at start, not as a reset per client."""
        if not self.pool_addresses:
            raise OSError(f"worker {self.index} has no address of the pool "
                          f"{self.settings.pool}; give [gateway] pool more addresses")
        first = self.pool_addresses[0]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((first, 0))
        except OSError as exc:
            raise OSError(f"cannot use pool address {first} as a client's source "
                          f"({exc.strerror}): the pool {self.settings.pool} is not local on "
                          "this host (sixgate run makes it so with the kernel backend)") from None
        finally:
            probe.close()

    @staticmethod
    def wanted(settings: Settings) -> dict[tuple[str, int, str], Forward]:
        """Every listener the forward rules ask for: (proto, port, address) -> its rule."""
        return {(rule.proto, port, address): rule for rule in settings.forwards
                for port in range(rule.port_lo, rule.port_hi + 1)
                for address in settings.addresses}

    async def _listen(self, key: tuple[str, int, str], rule: Forward) -> None:
        proto, port, address = key
        if proto == "tcp":
            sock = self._listener_socket(socket.SOCK_STREAM, address, port)
            listener: asyncio.Server | asyncio.BaseTransport = await asyncio.start_server(
                functools.partial(self._tcp_client, rule=rule, gateway=address, port=port),
                sock=sock, backlog=1024)
        else:
            sock = self._listener_socket(socket.SOCK_DGRAM, address, port)
            listener, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                functools.partial(_UdpListener, self, rule, address, port), sock=sock)
        self._listeners[key] = (rule, listener)

    def _unlisten(self, key: tuple[str, int, str]) -> None:
        _, listener = self._listeners.pop(key)
        listener.close()

    async def start(self) -> None:
        self.check_pool_is_local()
        for key, rule in self.wanted(self.settings).items():
            await self._listen(key, rule)

    async def reconfigure(self, settings: Settings) -> dict[str, Any]:
        """A reloaded config (issue 17; coordinator/reload.py checked what changed): the
        limits and timeouts change in place; listeners of removed rules close and those of
        new ones open (the coordinator refused a reload that needs a privileged port this
        unprivileged process may not bind); the sessions of removed rules end with a RST on
        both sides, every other session goes on. The reply: how many ended, and the
        listeners that could not open."""
        self.settings = settings
        self._filters.clear()
        self.flows.set_shard_limits(settings.workers, settings.max_flows,
                                    settings.max_flows_per_prefix, settings.timeouts,
                                    max_flows_per_48=settings.max_flows_per_48,
                                    max_flows_per_ipv4_source=settings.max_flows_per_ipv4_source)
        wanted = self.wanted(settings)
        for key, (rule, _) in list(self._listeners.items()):
            if wanted.get(key) != rule:
                self._unlisten(key)
        failed = []
        for key, rule in wanted.items():
            if key not in self._listeners:
                try:
                    await self._listen(key, rule)
                except OSError as exc:
                    failed.append(f"{key[0]}/[{key[2]}]:{key[1]} ({exc.strerror})")
        labels = {rule.label for rule in settings.forwards}
        ended = [c for c in self.connections.values() if c.rule not in labels]
        for connection in ended:
            connection.close(reset=True)
            self._forget(connection)
        if ended:
            self.counters.event(Event.FLOWS_ENDED_BY_RELOAD, len(ended))
            log.info("worker %d: %d session(s) of removed rules ended", self.index, len(ended))
        if failed:
            log.error("worker %d: cannot listen on %s: restart sixgate to open them",
                      self.index, ", ".join(failed))
            return protocol.error(f"worker {self.index} cannot listen on {', '.join(failed)}")
        return protocol.ok(ended=len(ended))

    async def retire(self) -> None:
        """A take-over's retiring relay (SIGUSR1, sent once the next run's relays listen
        beside ours in each port's SO_REUSEPORT group): our listeners close, so every new
        client reaches the next run (connections not yet accepted move there too:
        net.ipv4.tcp_migrate_req); UDP sessions end (a client's next datagram opens one
        there); TCP connections go on until they end, at most take_over_drain_s. Returns
        when none is left; the worker then stops."""
        for key in list(self._listeners):
            self._unlisten(key)
        for connection in [c for c in self.connections.values() if c.proto == PROTO_UDP]:
            connection.close()
            self._forget(connection)
        bound = self.settings.take_over_drain_s
        log.info("worker %d: retiring: listeners closed, the next run takes new clients; %d "
                 "connection(s) go on until they end (at most %g s)", self.index,
                 len(self.connections), bound)
        deadline = time.monotonic() + bound
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        if self.connections:
            log.warning("worker %d: retiring: %d connection(s) still open after %g s "
                        "(take_over_drain_s): closed", self.index, len(self.connections), bound)
        else:
            log.info("worker %d: retired: its last connection ended", self.index)

    async def stop(self) -> None:
        for key in list(self._listeners):
            self._unlisten(key)
        for connection in list(self.connections.values()):
            connection.close()

    # --- control ------------------------------------------------------------------------------

    def describe(self, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        return [{
            "proto": "tcp" if c.proto == PROTO_TCP else "udp",
            "client": f"[{c.client}]:{c.cport}",
            "gateway": f"[{c.gateway}]:{c.gwport}",
            "pool": c.local,
            "rule": c.rule,
            "state": c.state,
            "idle_s": round(now - session.last_seen, 1),
            "worker": self.index,
        } for session, c in islice(self.connections.items(), limit)]

    async def serve_control(self, control: zmq.asyncio.Socket, endpoint: str) -> None:
        """Answer control requests at ``endpoint`` (and the retiring endpoint beside it)."""
        while self.running:
            if not await control.poll(500):
                self.expire(time.monotonic())
                continue
            cmd, fields, reply = protocol.parse_request(await control.recv_multipart())
            now = time.monotonic()
            if reply is not None:
                self.counters.event(Event.CONTROL_ERRORS)
            elif cmd == "ping":
                reply = protocol.ok()
            elif cmd == "stats":
                # Same document as the userspace worker; the kernel does the per-packet work,
                # so there is no per-packet engine time to report.
                flows = self.flows
                reply = protocol.ok(index=self.index, **worker_stats(
                    self.counters, flows.active_by_proto, flows.created_by_proto,
                    flows.expired_total, flows.max_flows, flows.pool_in_use(), flows.pool_size,
                    {}))
            elif cmd == "reload":
                try:
                    with open(self.settings_path, encoding="utf-8") as f:
                        new = Settings.from_json(f.read())
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    reply = protocol.error(f"worker {self.index} cannot read the new "
                                           f"settings: {exc}")
                else:
                    reply = await self.reconfigure(new)
            elif cmd == "rebind":
                # A take-over that failed before it released this retiring relay handed
                # back to this run (coordinator ``come_back``): the failed run removed the
                # worker-N endpoint its own relay had taken; it is this relay's again.
                await control.send_json(protocol.ok())
                rebind(control, endpoint)
                log.info("worker %d: back from retirement: answering at %s again",
                         self.index, endpoint)
                continue
            elif cmd == "flows":
                reply = protocol.ok(
                    index=self.index,
                    bindings=self.describe(now, protocol.page_limit(fields)),
                    flows={"active": len(self.flows), "created": self.flows.created_total,
                           "expired": self.flows.expired_total, "limit": self.flows.max_flows,
                           "pool_in_use": self.flows.pool_in_use(),
                           "pool_size": self.flows.pool_size},
                    counters=self.counters.as_dict())
            else:
                reply = protocol.error(f"unknown command {cmd!r}")
            await control.send_json(reply)
            self.expire(now)


def rebind(control: zmq.asyncio.Socket, endpoint: str) -> None:
    """Bind ``control`` to ``endpoint`` again, whose ipc file another process removed."""
    with contextlib.suppress(zmq.ZMQError):  # bound before: the listener on the lost file
        control.unbind(endpoint)
    try:
        control.bind(endpoint)
    except zmq.ZMQError as exc:
        log.warning("cannot answer at %s again (%s): sixgate flows and /metrics miss this "
                    "relay until a restart", endpoint, exc)


def descriptors_needed(settings: Settings) -> int:
    """Open files a relay worker may need at its flow limit: two per TCP session (client and
    service), one per UDP session is less, a listener per port and address, and spares."""
    listeners = sum((rule.port_hi - rule.port_lo + 1) * len(settings.addresses)
                    for rule in settings.forwards)
    per_worker = worker_share(settings.max_flows, settings.workers) or 1
    return 2 * per_worker + listeners + SPARE_DESCRIPTORS


def raise_descriptor_limit(settings: Settings) -> int:
    """RLIMIT_NOFILE up to what ``max_flows`` needs (the hard limit too, where we may);
    raises OSError saying what to change when the system will not allow it."""
    need = descriptors_needed(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        if hard < need:
            raise OSError(f"max_flows = {settings.max_flows} needs {need} open files per "
                          f"worker, the limit is {hard} and cannot be raised here; lower "
                          "[gateway] max_flows or raise LimitNOFILE / ulimit -n") from None
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


async def run_relay(settings: Settings, index: int, control_endpoint: str,
                    settings_path: str = "") -> None:
    log.info("worker %d: up to %d open files (RLIMIT_NOFILE) for max_flows", index,
             raise_descriptor_limit(settings))
    relay = Relay(settings, index, settings_path)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    import signal
    loop.add_signal_handler(signal.SIGTERM, stopped.set)

    def retire() -> None:
        loop.remove_signal_handler(signal.SIGUSR1)  # once
        task = asyncio.ensure_future(relay.retire())
        task.add_done_callback(lambda _: stopped.set())
        retiring.append(task)

    retiring: list[asyncio.Future[None]] = []
    loop.add_signal_handler(signal.SIGUSR1, retire)
    ctx = zmq.asyncio.Context()
    control = ctx.socket(zmq.REP)
    control.setsockopt(zmq.LINGER, 0)
    await relay.start()
    control.bind(control_endpoint)
    # Also where the next run asks once a take-over made this run retire (its worker-N
    # endpoint is the next run's then): it lists the connections this relay still carries.
    control.bind(protocol.retiring_endpoint(settings.run_dir, os.getppid(), index))
    # Listeners (privileged ports too) and the control socket are open: drop to the user.
    log.info("worker %d: %s", index, drop_privileges(settings.user, signal.SIGTERM))
    log.info("worker %d: %s", index, seccomp.apply(seccomp.ALLOWED + seccomp.RELAY_ALLOWED))
    task = asyncio.create_task(relay.serve_control(control, control_endpoint))
    await stopped.wait()
    relay.running = False
    task.cancel()
    await relay.stop()
    control.close(0)
    ctx.term()
