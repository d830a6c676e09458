"""``sixgate run``: the coordinator process.

Supervises the worker processes (restart on crash), answers control requests (``sixgate
flows``) on an ipc:// socket in the run directory and serves /metrics. With ``fanout =
"coordinator"`` it also owns the raw IPv4 protocol-41 socket and fans every received packet
out by the flow hash (the shard kernel fan-out would pick) to the workers, in one ZeroMQ
message per worker per batch (bounded by high-water marks: overload is counted as QUEUE_FULL,
never buffered); the workers run the tunnel checks. With ``fanout = "kernel"`` (the
default) the workers capture their own shares and no packet passes through here.

Shutdown (SIGINT/SIGTERM) stops the workers, whose TUN devices and routes vanish with them,
and removes the run directory's sockets and pidfiles. A stale run directory of a crashed run
is cleaned at the next start (its leftover workers are stopped by PID after checking they are
ours).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
from pyroute2 import NetlinkError

from sixgate.coordinator import (
    clat,
    cluster,
    forwarding,
    kernel_backend,
    lan,
    service_manager,
    uplink,
)
from sixgate.coordinator import reload as reloading
from sixgate.coordinator.broker import RESULTS as BROKER_RESULTS
from sixgate.coordinator.broker import Broker, KeyFileError, broker_of, retry_after, update
from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.coordinator.liveness import PROBE_TIMEOUT_S, PeerProbe
from sixgate.coordinator.metrics import (
    READY_WORKER_TIMEOUT_MS,
    GatewayView,
    MetricsServer,
    WorkerView,
    readiness,
)
from sixgate.workers import control
from sixgate.workers.capture import TunnelCapture
from sixgate.workers.control import control_endpoint, coordinator_endpoint, data_endpoint
from sixgate.workers.engine.counters import BATCH_PACKETS_BOUNDS, Counters, Histogram
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.flows import worker_share
from sixgate.workers.engine.settings import Settings
from sixgate.workers.engine.wire import encode_batch, fanout_index
from sixgate.workers.journal import (
    HANDOVER_MAX_AGE_S,
    CrashLog,
    ShardCopy,
    journal_endpoint,
    take_previous_sessions,
    write_handover,
)
from sixgate.workers.main import tun_name, worker_devices
from sixgate.workers.privileges import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    become_supervisor,
    supervisor_capabilities,
    unreachable_as,
    who_am_i,
)

log = logging.getLogger("sixgate")

RECV_BUDGET = 256  # packets read per wakeup before batches are sent
# Generous: a slow machine (or a software-emulated VM) takes seconds to import a worker (a
# guest under emulation on a loaded host took more than 60 s on 2026-12-07); a worker that
# dies instead is noticed at once.
WORKER_READY_TIMEOUT_S = 180.0
RETIRE_POLL_S = 0.05  # a retiring run looks this often at its signals and relays
# A refused reload that a new run (a restart, a take-over) would apply ends with this.
RESTART_NEEDED = "restart needed (the running config stays)"
TAKE_OVER_WAIT_S = 30.0  # ``sixgate run --take-over``: how long the old gateway may take to stop
CONTROL_TIMEOUT_MS = 4000
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
SUPERVISE_INTERVAL_S = 0.2  # how often the coordinator looks for a dead worker
ANNOUNCE_CHECK_S = 0.5  # [cluster]: how often readiness decides the BGP announcement
# At a stop, once every worker has exited (its last journal message sent, ZeroMQ's linger):
# how long a quiet journal socket is waited on for what is still on its way.
JOURNAL_DRAIN_MS = 100
WORKER_STOP_TIMEOUT_S = 5.0  # a worker stopped on purpose (SIGTERM) before SIGKILL
# A worker that ran this long before it died starts the backoff over (systemd's
# StartLimitIntervalSec idea): one crash a day never waits the longest delay.
STABLE_RUN_S = 60.0
TUN_DEVICE = Path("/dev/net/tun")


def restart_delay(crash_streak: int) -> float:
    """Seconds before a dead worker is started again, by how many short runs in a row."""
    return RESTART_BACKOFF_S[min(crash_streak, len(RESTART_BACKOFF_S) - 1)]


def _pid_is_ours(pid: int) -> bool:
    """True when ``pid`` runs a sixgate process (checked before we ever signal it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"sixgate" in cmdline


def _endpoint_owner(path: Path) -> int:
    """The coordinator pid a relay-<pid>-<index>.ctl endpoint is named with (0: not one)."""
    parts = path.name.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def _pidfile_pid(path: Path) -> int:
    """The pid a pidfile names (0: none, or unreadable)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def running_coordinator(settings: Settings) -> int | None:
    """The pid of another sixgate's coordinator running with this run_dir, if one runs."""
    pid = _pidfile_pid(Path(settings.run_dir) / "coordinator.pid")
    return pid if pid and pid != os.getpid() and _pid_is_ours(pid) else None


def with_plat_prefix(settings: Settings, prefix: str) -> Settings:
    """``settings`` with the CLAT's PLAT prefix; a CLAT alone's ``prefix`` is that prefix too
    (beside a NAT64 it stays the NAT64's)."""
    return dataclasses.replace(settings, clat_plat_prefix=prefix,
                               prefix=prefix if settings.mode == "clat" else settings.prefix)


class RunDirBusy(Exception):
    pass


def prepare_run_dir(settings: Settings) -> Path:
    """Create the run directory; clean what a crashed earlier run left there."""
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = run_dir.lstat()
    owners = {os.geteuid()} | ({_uid_of(settings.user)} if os.geteuid() == 0 else set())
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners:
        # A symlink, or somebody else's directory: its owner could swap what we clean up.
        raise RuntimeError(f"run_dir {run_dir} is {'a symlink' if run_dir.is_symlink() else ''}"
                           f"{'' if run_dir.is_symlink() else f'owned by uid {info.st_uid}'}, "
                           f"not a directory of this user (uid {os.geteuid()}) or of "
                           f"[gateway] user; remove it or set [gateway] run_dir to a "
                           "directory of sixgate's own")
    pidfile = run_dir / "coordinator.pid"
    if pidfile.exists():
        running = running_coordinator(settings)
        if running is not None:
            raise RunDirBusy(f"another sixgate (pid {running}) runs with run_dir {run_dir}; "
                             "stop it first, take over from it (sixgate run --take-over), or "
                             "give this gateway its own gateway.run_dir")
        log.info("cleaning up after a stale run (pid %s) in %s",
                 _pidfile_pid(pidfile) or "?", run_dir)
    if info.st_uid != os.geteuid():
        # The gateway user's, from the last run: root takes it back before cleaning, so no
        # process of that user can plant a link in it while root writes there.
        os.chown(run_dir, os.geteuid(), os.getegid(), follow_symlinks=False)
    # The control sockets reveal which IPv6 client is which pool address (RFC 6888 REQ-12
    # asks for care with such data): only the gateway's own user may connect.
    run_dir.chmod(0o700)
    for stale in run_dir.glob("worker-*.pid"):
        try:
            pid = int(stale.read_text().strip())
        except ValueError:
            pid = 0
        if pid and _pid_is_ours(pid):
            log.info("stopping leftover worker pid %d of a crashed run", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # A retiring run's relays answer at relay-<its pid>-<index> (retiring_endpoint): left
    # alone while that run lives (a take-over's retiree), removed after it.
    dead_relays = [path for path in run_dir.glob("relay-*")
                   if not _pid_is_ours(_endpoint_owner(path))]
    for leftover in dead_relays + list(run_dir.glob("worker-*")) + [run_dir / "control", pidfile,
                                                        run_dir / "settings.json",
                                                        run_dir / "journal"]:
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass
    pidfile.write_text(f"{os.getpid()}\n")
    return run_dir


def _settings_of(settings_file: Path) -> Settings | None:
    """The settings of the run that wrote ``settings_file`` (None when unreadable)."""
    try:
        return Settings.from_json(settings_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def give_run_dir(run_dir: Path, user: str) -> None:
    """Root gives ``user`` the run directory and what is in it (sockets, state files)."""
    entry = pwd.getpwnam(user)
    for path in [run_dir, *run_dir.iterdir()]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _uid_of(user: str) -> int:
    """The uid of ``user``, or -1 when it is empty or unknown (checked again at start)."""
    try:
        return pwd.getpwnam(user).pw_uid if user else -1
    except KeyError:
        return -1


def installation_paths() -> list[tuple[Path, int]]:
    """What a worker started again by the unprivileged coordinator must read: the interpreter,
    its standard library and shared libpython, sixgate's code and the packages it imports."""
    import pyroute2

    from sixgate import workers
    paths = [(Path(os.path.realpath(sys.executable)), os.X_OK)]
    for module in (os, workers, zmq, pyroute2):
        paths.append((Path(os.path.realpath(str(module.__file__))).parent, os.R_OK | os.X_OK))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        paths.append((Path(libdir) / library, os.R_OK))
    return paths


def hand_over(run_dir: Path, settings: Settings) -> tuple[int, ...]:
    """Before the coordinator becomes ``[gateway] user``: give it the run directory and what
    setup put there (sockets, state files), check it can reach them, and return the
    capabilities it keeps. A worker started again after a crash must read sixgate's
    installation and open /dev/net/tun as that user: where it cannot, the coordinator keeps
    CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE for it, and says so with the fix."""
    caps = supervisor_capabilities(settings)
    if os.geteuid() == 0 and not settings.user:
        return caps
    user = settings.user
    if os.geteuid() == 0:
        give_run_dir(run_dir, user)
    else:
        user = who_am_i()  # started as the user itself (systemd User=)
    if unreachable_as(user, [(run_dir, os.W_OK | os.X_OK)]):
        raise RuntimeError(f"run_dir {run_dir} cannot be reached by [gateway] user {user!r} "
                           "(a parent directory is not searchable by it); set [gateway] "
                           "run_dir under /run, or make its parents searchable (chmod o+x)")
    unreadable = unreachable_as(user, installation_paths())
    if settings.backend != "kernel" and unreachable_as(user, [(TUN_DEVICE,
                                                               os.R_OK | os.W_OK)]):
        log.warning("[gateway] user %r cannot open %s, which a restarted worker needs: the "
                    "coordinator keeps CAP_DAC_OVERRIDE for it; make the device 0666 "
                    "(Debian's default) to drop this", user, TUN_DEVICE)
        return (CAP_DAC_OVERRIDE, *caps)
    if unreadable:
        log.warning("[gateway] user %r cannot read %s, which a restarted worker needs: the "
                    "coordinator keeps CAP_DAC_READ_SEARCH for it; install sixgate (and its "
                    "Python) where that user can read it to drop this", user,
                    ", ".join(str(p) for p in unreadable))
        return (CAP_DAC_READ_SEARCH, *caps)
    return caps


class WorkerProcess:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0
        self.started = 0.0  # monotonic time of the last spawn
        self.crash_streak = -1  # deaths in a row after a short run (-1: none yet)
        self.standby: subprocess.Popen[bytes] | None = None  # ``take_over``'s, waiting


class Coordinator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.running = True
        self.workers = [WorkerProcess(i) for i in range(settings.workers)]
        self.started = time.monotonic()
        self.started_unix = time.time()
        self.capture: TunnelCapture | None = None
        self.batch_packets = Histogram(BATCH_PACKETS_BOUNDS)
        self.queue_drops = [0] * settings.workers  # packets per worker lost to a full queue
        self.loop_seen = time.monotonic()  # /healthz: the main loop went round recently
        self.metrics_server: MetricsServer | None = None
        self.sit_link: str | None = None
        self.radvd: subprocess.Popen[bytes] | None = None  # [lan]: its router advertisements
        self.lan_enabled = False
        self.journal: zmq.Socket[Any] | None = None
        self.shard_copy: ShardCopy | None = None
        self.shard_lock = threading.Lock()
        self.handed_over: list[list[Any]] = []  # the previous run's shards, to resume
        self.crash_log: CrashLog | None = None  # the copy on disk, for a coordinator crash
        self.kept_caps: tuple[int, ...] = ()  # what the coordinator keeps after setup
        # What the workers read their settings from (written by ``start``).
        self.settings_file = Path(settings.run_dir) / "settings.json"
        # CLAT: how its PLAT prefix was found; with "auto", the RA options the kernel hands on.
        self.plat_source = ""
        self.plat_changes = 0
        self.pref64: clat.Pref64Listener | None = None
        self.pref64_uplink = -1
        # RFC 7050 asked again in a thread of its own (a resolver that does not answer must
        # not hold up the supervision); its latest answer, taken by the main loop.
        self.rediscovered: tuple[str | None, str] | None = None
        self.stopping = threading.Event()
        # 6in4: the broker's reachability (RFC 4213 §3.8), probed from a thread of its own.
        self.peer_probes: list[PeerProbe] = []  # one per 6in4 tunnel's broker
        self.broker: Broker | None = None  # [broker]: the 6in4 broker's update API
        self.broker_updates: dict[str, int] = {}  # result -> count (the update thread's)
        # [tunnel] uplink: the interface's address changes, watched from a thread of its own;
        # the address to move to, taken by the main loop (``_move_tunnel``).
        self.uplink_watch: uplink.UplinkWatch | None = None
        # (local, public): where the tunnel moves, taken by the main loop; [tunnel] uplink and
        # public_ipv4_url set it from their threads.
        self.move_to: tuple[str, str] | None = None
        self.endpoint_changes = 0
        self.broker_wake = threading.Event()  # a new address for the broker
        self.reload_ok = True
        self.reload_success_unix = self.started_unix
        self.reload_requested = False  # SIGHUP: the main loop reloads
        self.reload_lock = threading.Lock()
        # [cluster] (issue 20): the anchor device BIRD announces through, and a drain.
        self.anchor: cluster.Anchor | None = None
        self.draining = False
        self.drain_quiet_s = 0.0  # while draining: how long no packet has come (metrics)
        self.drain_started = 0.0
        # The kernel backend's take-over (``retire``): this run retires (SIGUSR2 from the next
        # run), is told the next run's relays listen (SIGUSR1), or is stopped while retiring.
        self.retiring = False
        self.retire_release = threading.Event()
        self.retire_stop = threading.Event()
        self.retiree: int | None = None  # the retiring run this one took over from
        self.retired = False
        # A take-over that fails before it released the retiring run's relays (SIGUSR1)
        # hands back to that run instead of stopping it (``_hand_back``); the retiring run
        # comes back on its second SIGUSR2 (``_come_back``).
        self.released = False
        self.handing_back = False
        self.retire_return = threading.Event()
        self.threads: list[threading.Thread] = []  # what ``run`` started, joined at a return
        # The userspace take-over: this run stops for the next one (SIGUSR2), its workers
        # keeping their TUN devices for the next run's (workers/tun.py); and how many
        # workers the run this one took over from had (its kept devices no worker of this
        # run takes are removed).
        self.handing_over = False
        self.previous: Settings | None = None  # the settings of the run taken over from
        self.previous_workers = 0
        # Written at the stop: the control and journal threads wake from their poll at once
        # (a take-over's handover waited up to their 200 ms timeout for them).
        self.threads_wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Readable once a signal came (``run_gateway``'s wakeup fd): the loop ends at once on
        # SIGTERM instead of at its next timeout (a stop is a take-over's outage).
        self.wake_fd = -1

    # --- what /metrics reads (coordinator/metrics.py Gateway) -----------------------------------

    def view(self) -> GatewayView:
        workers = []
        for worker in self.workers:
            proc = worker.proc
            alive = proc is not None and proc.poll() is None
            workers.append(WorkerView(worker.index, proc.pid if alive and proc else None,
                                      worker.restarts, self.queue_drops[worker.index]))
        return GatewayView(
            counters=self.counters.as_dict(), workers=tuple(workers),
            started_unix=self.started_unix, loop_age_s=time.monotonic() - self.loop_seen,
            batch_packets=self.batch_packets.as_dict(),
            capture_open=self.capture is not None and self.capture.fileno() >= 0,
            sit_link=self.sit_link, reload_ok=self.reload_ok,
            reload_success_unix=self.reload_success_unix, plat_source=self.plat_source,
            plat_changes=self.plat_changes,
            peers=tuple((p.peer, p.reachable, p.rtt_s) for p in self.peer_probes),
            broker_updates=dict(self.broker_updates), endpoint_changes=self.endpoint_changes,
            announced=None if self.anchor is None else self.anchor.up,
            draining=self.draining, drain_quiet_s=self.drain_quiet_s)

    def ask_workers(self, cmd: str, timeout_ms: int) -> list[dict[str, Any] | None]:
        return control.ask_workers(self.ctx, self.settings.run_dir, self.settings.workers, cmd,
                                   timeout_ms)

    def ask_retiring(self, cmd: str, timeout_ms: int, **args: Any) -> list[dict[str, Any]]:
        """``cmd`` to the relays of the run this one took over from while it retires (the
        kernel backend: they carry their connections until these end); [] without one."""
        retiree = self.retiree
        if retiree is None or not self.previous_workers or not _pid_is_ours(retiree):
            return []
        return control.ask_retiring(self.ctx, self.settings.run_dir, retiree,
                                    self.previous_workers, cmd, timeout_ms, **args)

    # --- lifecycle ----------------------------------------------------------------------------

    def take_over(self) -> None:
        """``sixgate run --take-over``: this run's workers are started beside the running
        gateway of this run_dir and wait, loaded (an interpreter and its imports are most of
        a start); then that gateway is stopped (SIGTERM: it hands its sessions over as at
        any stop) and this one starts in its place, its workers going at once. The outage is
        the old one's stop and this one's setup, not two starts. Without a running gateway
        it is an ordinary start."""
        old = running_coordinator(self.settings)
        if old is None:
            log.info("take-over: no sixgate runs with run_dir %s; starting as usual",
                     self.settings.run_dir)
            return
        if self.settings.backend == "kernel":
            # Before the standby relays start: they inherit the limit (``start`` raises it
            # for workers it spawns itself).
            from sixgate.workers.relay import raise_descriptor_limit
            raise_descriptor_limit(self.settings)
        for worker in self.workers:
            worker.standby = subprocess.Popen(self._worker_command(worker.index, "--standby"),
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for worker in self.workers:
            assert worker.standby is not None and worker.standby.stdout is not None
            ready, _, _ = select.select([worker.standby.stdout], [], [], WORKER_READY_TIMEOUT_S)
            line = worker.standby.stdout.readline() if ready else b""
            worker.standby.stdout.close()
            if line.strip() != b"ready":
                raise RuntimeError(f"take-over: worker {worker.index} did not get ready "
                                   f"beside the running gateway (pid {old}); it runs on")
        started = time.monotonic()
        # The kernel backend's run retires instead (``retire``): its relays keep the
        # connections they carry; it gives up its pidfile once this run may start.
        kernel = self.settings.backend == "kernel"
        log.info("take-over: this run's %d worker(s) are ready; %s pid %d",
                 len(self.workers), "retiring" if kernel else "stopping", old)
        # Under systemd this run becomes the unit's main process before the old one ends:
        # otherwise its end would stop the unit, this run included (service_manager).
        service_manager.notify(f"MAINPID={os.getpid()}", f"STATUS=taking over from pid {old}")
        self.previous = _settings_of(self.settings_file)
        self.previous_workers = self.previous.workers if self.previous is not None else 0
        # SIGUSR2: a userspace run stops and keeps its TUN devices for this one (an older
        # release stops as on SIGTERM); the kernel backend's retires.
        os.kill(old, signal.SIGUSR2)
        # Its pidfile goes last at its stop (after the handover and the teardown) or first
        # at its retirement: this run may start then, not only once its process has ended.
        while running_coordinator(self.settings) == old:
            if time.monotonic() - started > TAKE_OVER_WAIT_S:
                service_manager.notify(f"MAINPID={old}", "STATUS=the take-over failed")
                raise RuntimeError(f"take-over: pid {old} did not stop within "
                                   f"{TAKE_OVER_WAIT_S:.0f} s; stop it, then start again")
            time.sleep(0.005)
        if kernel and _pid_is_ours(old):
            self.retiree = old
        log.info("take-over: pid %d %s in %.2f s; starting in its place", old,
                 "retired" if self.retiree else "stopped", time.monotonic() - started)

    def start(self) -> None:
        settings = self.settings
        self.run_dir = prepare_run_dir(settings)
        if settings.uplink:
            settings = self.settings = self._watch_uplink_from(settings)
        if settings.public_ipv4_url:
            address, how = uplink.ask_public_ipv4(settings.public_ipv4_url)
            if address is not None and address != settings.known_ipv4:
                log.warning("tunnel: the public address is %s, not %s (%s)", address,
                            settings.known_ipv4, how)
                settings = self.settings = dataclasses.replace(settings, public_ipv4=address)
            elif address is None:
                log.warning("tunnel: %s; public_ipv4 %s until it answers", how,
                            settings.known_ipv4)
        # The kernel backend's relays keep no sessions to journal.
        # A CLAT is stateless: nothing to journal either.
        journaling = (settings.flow_journal and settings.backend != "kernel"
                      and settings.mode != "clat")
        if settings.clat_enabled:
            settings = self._find_plat_prefix(settings)
        if journaling:
            # A restart or an upgrade: the sessions the previous run handed over at its stop,
            # with its fan-out seed so every client reaches the worker that has its sessions.
            # (Or the sessions a crashed coordinator had: its session log.)
            seed, self.handed_over, messages = take_previous_sessions(
                str(self.run_dir), dataclasses.asdict(settings), time.time())
            for message in messages:
                log.info("%s", message)
            if seed is not None:
                settings = self.settings = dataclasses.replace(settings, hash_seed=seed)
        self.settings_file.write_text(settings.to_json())
        if settings.user:
            try:
                pwd.getpwnam(settings.user)
            except KeyError:
                raise RuntimeError(f"[gateway] user {settings.user!r} does not exist on this "
                                   "host; create it (useradd --system sixgate) or name another "
                                   "(\"\" keeps sixgate root)") from None
        self.ctx = zmq.Context()
        self.pushes = []
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(coordinator_endpoint(settings.run_dir))
        if journaling:
            # The workers' shard journals (workers/journal.py): bound before any worker starts.
            self.journal = self.ctx.socket(zmq.PULL)
            self.journal.setsockopt(zmq.LINGER, 0)
            self.journal.bind(journal_endpoint(settings.run_dir))
            self.shard_copy = ShardCopy(settings.workers,
                                        worker_share(settings.max_flows, settings.workers) or 1,
                                        settings.nat64_port_hold_s)
            for index, records in enumerate(self.handed_over):
                self.shard_copy.load(index, records)
            # Kept on disk as it changes, for the next coordinator should this one crash.
            self.crash_log = CrashLog(settings.run_dir, dataclasses.asdict(settings), time.time())
            self.crash_log.rewrite(self.shard_copy)
        if settings.backend == "kernel":
            # The kernel's sit link does the tunnel; workers only relay ports, with up to two
            # descriptors a session: the limit is raised here (the workers inherit it) or the
            # config is refused before anything is set up.
            from sixgate.workers.relay import raise_descriptor_limit
            raise_descriptor_limit(settings)
            try:
                self.sit_link = kernel_backend.setup(settings, adopt=self.retiree is not None)
            except kernel_backend.KernelBackendError as exc:
                raise RuntimeError(str(exc)) from None
            lan.remove_leftovers(settings)  # a crashed run's LAN, even if this one has none
            if settings.lan_interface:
                self.lan_enabled = True
                try:
                    self.radvd = lan.setup(settings, self.sit_link)
                except lan.LanError as exc:
                    raise RuntimeError(str(exc)) from None
        elif settings.mode == "clat":
            try:
                clat.enable(settings)
            except clat.ClatError as exc:
                raise RuntimeError(str(exc)) from None
            self.clat_enabled = True
        else:
            if settings.clat_enabled:  # a crashed run's CLAT switches, before the NAT64's
                clat.undo(settings)
            try:
                forwarding.enable(settings)
            except forwarding.ForwardingError as exc:
                raise RuntimeError(str(exc)) from None
            self.forwarding_enabled = True
            if settings.clat_enabled:  # a 464XLAT box: the CLAT beside the NAT64
                try:
                    clat.enable(settings)
                except clat.ClatError as exc:
                    raise RuntimeError(str(exc)) from None
                self.clat_enabled = True
        if (settings.backend != "kernel" and settings.fanout == "coordinator"
                and settings.mode not in ("nat64", "clat")):  # no tunnel to capture
            # Every packet, outer fragments put together (workers/capture.py); the workers'
            # raw protocol-41 sockets take the IP layer's copy and accept none of it.
            self.capture = TunnelCapture(settings.local_ipv4, None, True, self.counters,
                                         min(settings.batch_packets, RECV_BUDGET),
                                         tunnels=settings.all_tunnels())
        for worker in self.workers if self.capture is not None else ():
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, settings.queue_batches)
            push.setsockopt(zmq.LINGER, 0)
            push.bind(data_endpoint(settings.run_dir, worker.index))
            self.pushes.append(push)
        if settings.metrics_listen:
            # Up before the workers are: /healthz answers and /readyz says what it waits for.
            try:
                self.metrics_server = MetricsServer(self, settings.metrics_listen)
            except OSError as exc:
                raise RuntimeError(f"cannot listen for metrics on {settings.metrics_listen} "
                                   f"({exc.strerror}); set [metrics] listen to a free "
                                   "address:port, or \"\" to turn metrics off") from None
        if any(t.mode == "6in4" for t in settings.all_tunnels()):
            # Raw sockets: opened while root (also with probe_interval_s = 0, which a reload
            # may raise).
            try:
                self.peer_probes = self._peer_probes(settings)
            except OSError as exc:
                raise RuntimeError(f"cannot open the 6in4 broker probe's raw socket on "
                                   f"{settings.local_ipv4} ({exc.strerror}): is local_ipv4 an "
                                   "address of this host?") from None
        if settings.cluster_announce:
            # Created while root; set up and down later with CAP_NET_ADMIN, which the
            # coordinator keeps as the supervisor.
            try:
                self.anchor = cluster.Anchor(settings)
            except OSError as exc:
                raise RuntimeError(f"cannot create the BGP anchor device "
                                   f"{cluster.anchor_name(settings)} ({exc}); is another "
                                   "gateway of this name running?") from None
            log.info("cluster: BIRD announces %s through %s while this node is ready",
                     ", ".join(settings.cluster_announce), self.anchor.name)
        if settings.broker_url:
            # The key file is root's (0600): read now, kept in memory.
            try:
                self.broker = broker_of(settings)
            except KeyFileError as exc:
                raise RuntimeError(f"{settings.source_file}: {exc}") from None
        # Everything only root could make exists: from here on the coordinator is the user,
        # and every worker starts (and restarts) as that user too.
        self.kept_caps = hand_over(self.run_dir, settings)
        log.info("%s", become_supervisor(settings.user, self.kept_caps))
        for worker in self.workers:
            if self.handed_over:
                self._hand_shard(worker.index)
            self._spawn(worker)
        self.handed_over = []
        self._wait_workers_ready()
        if self.previous_workers > settings.workers and settings.backend != "kernel":
            # The run this one took over from had more workers: their devices are no one's.
            self._remove_kept_devices(range(settings.workers, self.previous_workers))
        if self.retiree is not None:
            self._signal_retiree(signal.SIGUSR1, "this run's relays listen: the retiring run "
                                 "closes its listeners and keeps its connections until they "
                                 f"end (at most {settings.take_over_drain_s:g} s)")
            self.released = True
        if settings.clat_enabled:
            log.info("sixgate up: CLAT %s <-> %s under %s", settings.clat_ipv4_address,
                     settings.clat_ipv6_address, settings.clat_plat_prefix)
        if settings.mode == "clat":
            return
        if settings.mode == "nat64":
            log.info("sixgate up: NAT64 %s for %s, pool4 %s, %d worker(s)",
                     settings.nat64_prefix, ", ".join(settings.nat64_clients),
                     ", ".join(f"{a} {p} {lo}-{hi}" for a, p, lo, hi in settings.nat64_pool4),
                     settings.workers)
            return
        if settings.nat64_prefix:
            log.info("NAT64 beside the tunnel: %s for %s, IPv6 in by %s", settings.nat64_prefix,
                     ", ".join(settings.nat64_clients), settings.nat64_input)
        log.info("sixgate up: %s backend, %s tunnel, local %s, addresses %s, %d worker(s)%s",
                 settings.backend, settings.mode, settings.local_ipv4,
                 ", ".join(settings.addresses), settings.workers,
                 f", pool {settings.pool}, fan-out by the {settings.fanout}"
                 if settings.backend != "kernel" else "")

    def _watch_uplink_from(self, settings: Settings) -> Settings:
        """``[tunnel] uplink``: its address changes are watched from now on; the tunnel starts
        on local_ipv4 if the interface has it, else on the interface's address."""
        try:
            socket.if_nametoindex(settings.uplink)
        except OSError:
            raise RuntimeError(f"[tunnel] uplink {settings.uplink!r} is not an interface of "
                               "this host; name the one that holds local_ipv4 (ip -4 addr)"
                               ) from None
        try:
            self.uplink_watch = uplink.UplinkWatch(settings.uplink)
        except (OSError, NetlinkError) as exc:
            raise RuntimeError(f"cannot watch the addresses of [tunnel] uplink "
                               f"{settings.uplink!r}: {exc}") from None
        address = uplink.follow(settings.local_ipv4, self.uplink_watch.addresses())
        if address is None:
            return settings
        log.warning("tunnel: local_ipv4 %s is not on %s, which has %s now: the tunnel starts "
                    "there", settings.local_ipv4, settings.uplink, address)
        return dataclasses.replace(settings, local_ipv4=address,
                                   public_ipv4=self._public_after(settings, address))

    @staticmethod
    def _public_after(settings: Settings, local: str) -> str:
        """The public address once the local one is ``local``: the same without a NAT; with
        one, the NAT's (learnt from public_ipv4_url), unchanged."""
        return settings.known_ipv4 if settings.public_ipv4_url else local

    def _watch_uplink(self) -> None:
        """Thread: each announcement of an address change on the uplink is checked against
        the tunnel's address (``uplink.follow``); a move is left for the main loop."""
        watch = self.uplink_watch
        assert watch is not None
        while not self.stopping.is_set():
            try:
                readable, _, _ = select.select([watch], [], [], 1.0)
                if not readable:
                    continue
                watch.drain()
                address = uplink.follow(self.settings.local_ipv4, watch.addresses())
            except (OSError, NetlinkError, ValueError) as exc:
                if self.stopping.is_set():
                    return
                log.warning("watching %s's addresses: %s", self.settings.uplink, exc)
                self.stopping.wait(1.0)
                continue
            if address is not None:
                self.move_to = (address, self._public_after(self.settings, address))

    def _watch_public(self) -> None:
        """Thread: ``public_ipv4_url`` asked every ``public_ipv4_check_s``; a new answer is a
        move of the tunnel's public address, left for the main loop."""
        while not self.stopping.wait(self.settings.public_ipv4_check_s):
            address, how = uplink.ask_public_ipv4(self.settings.public_ipv4_url)
            if address is None:
                log.warning("tunnel: %s; keeping %s", how, self.settings.known_ipv4)
            elif address != self.settings.known_ipv4:
                self.move_to = (self.settings.local_ipv4, address)

    def _move_tunnel(self, address: str, public: str) -> None:
        """The uplink's address (``address``) or the public one behind a NAT (``public``)
        changed: the tunnel moves without a restart. New settings; the capture (coordinator
        fan-out) and the broker probe on the new address; each worker started again on them
        with its shard, as after a crash, so every session goes on (workers/journal.py); the
        broker told."""
        old = self.settings
        new = dataclasses.replace(old, local_ipv4=address, public_ipv4=public)
        self._write_settings(new)
        self.endpoint_changes += 1
        moved = (f"{old.local_ipv4} left {new.uplink}, which has {address} now"
                 if address != old.local_ipv4 else "")
        if public != old.known_ipv4 and old.public_ipv4_url:
            moved += ("; " if moved else "") + (f"the public address is {public} now, not "
                                                f"{old.known_ipv4} ({old.public_ipv4_url})")
        log.warning("tunnel: %s: the tunnel moves there (workers start again with their "
                    "sessions)%s", moved, "; the broker is told" if self.broker is not None
                    else "")
        if self.capture is not None:
            self.capture.close()
            self.capture = TunnelCapture(address, None, True, self.counters,
                                         min(new.batch_packets, RECV_BUDGET),
                                         tunnels=new.all_tunnels())
        if self.peer_probes:
            try:
                probes = self._peer_probes(new)
            except OSError as exc:
                log.error("cannot probe the 6in4 peer from %s (%s)", address, exc.strerror)
            else:
                self.peer_probes = probes  # the old ones close once their last probe is over
        for worker in self.workers:
            self._restart_worker(worker)
        self.broker_wake.set()

    def _restart_worker(self, worker: WorkerProcess) -> None:
        """Stop a worker and start it again at once on the current settings, with its shard
        (a planned restart: not counted as a crash)."""
        proc = worker.proc
        copy = self.shard_copy
        if copy is not None:
            copy.ended.discard(worker.index)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Its last journal message reaches the copy (the journal thread applies it).
        deadline = time.monotonic() + JOURNAL_DRAIN_MS / 1000
        while copy is not None and worker.index not in copy.ended \
                and time.monotonic() < deadline:
            time.sleep(0.002)
        worker.next_start = 0.0
        self._hand_shard(worker.index)
        self._spawn(worker)

    def _find_plat_prefix(self, settings: Settings) -> Settings:
        """CLAT: its address (``ipv6_address = "auto"``: picked and checked by DAD) and the
        PLAT prefix (coordinator/clat.py); with "auto", router advertisements are watched from
        now on, and a PREF64 that changes it is taken (``_watch_pref64``)."""
        if settings.clat_ipv6_address == "auto":
            try:
                address, how = clat.pick_ipv6_address(settings.name)
            except clat.ClatError as exc:
                raise RuntimeError(f"clat.ipv6_address = \"auto\": {exc}") from None
            log.info("CLAT: address %s %s", address, how)
            settings = dataclasses.replace(settings, clat_ipv6_address=address)
        if settings.clat_plat_prefix == "auto":
            uplink = clat.uplink_of(settings.clat_ipv6_address) if settings.clat_ipv6_address \
                else ""
            self.pref64 = clat.Pref64Listener()
            self.pref64_uplink = socket.if_nametoindex(uplink) if uplink else -1
        prefix, self.plat_source, how = clat.plat_prefix(settings)
        if prefix is None:
            raise RuntimeError(f"clat.plat_prefix = \"auto\": {how}")
        log.info("CLAT: PLAT prefix %s %s", prefix, how)
        if settings.mode != "clat":
            # Beside this host's NAT64: the CLAT's own address is one of its clients.
            own = ipaddress.IPv6Address(settings.clat_ipv6_address)
            if not any(own in ipaddress.IPv6Network(c) for c in settings.nat64_clients):
                settings = dataclasses.replace(settings, nat64_clients=(
                    *settings.nat64_clients, f"{own}/128"))
        self.settings = with_plat_prefix(settings, prefix)
        return self.settings

    def _watch_pref64(self) -> None:
        """RFC 8781 §5 (a host uses the latest PREF64): a router advertisement on the uplink
        with another prefix changes the CLAT's at once: logged, counted, the worker told."""
        assert self.pref64 is not None
        for ifindex, prefix, lifetime in self.pref64.read():
            if (ifindex != self.pref64_uplink or lifetime == 0
                    or prefix == self.settings.clat_plat_prefix):
                continue
            self._change_plat_prefix(prefix, "rfc8781",
                                     "RFC 8781 PREF64 in a router advertisement")

    def _rediscover(self) -> None:
        """RFC 7050 again every ``clat_rediscovery_interval_s`` (thread): the answer is left
        in ``rediscovered`` for the main loop (``_take_rediscovered``)."""
        while not self.stopping.wait(self.settings.clat_rediscovery_interval_s):
            self.rediscovered = clat.discover_rfc7050()

    def _update_broker(self) -> None:
        """Tell the 6in4 broker our address at the start (thread), retried after an error
        (coordinator/broker.py ``retry_after``), never after a refusal the operator must fix;
        each result logged and counted."""
        assert self.broker is not None
        failures = 0
        myip = self.settings.known_ipv4
        while not self.stopping.is_set():
            if self.broker_wake.is_set():
                # The tunnel moved (``_move_tunnel``): a new address is told at once (what
                # the update API is for); retries of one address keep min_interval_s.
                self.broker_wake.clear()
                myip, failures = self.settings.known_ipv4, 0
            done = update(self.broker, myip)
            self.broker_updates[done.result] = self.broker_updates.get(done.result, 0) + 1
            fix = BROKER_RESULTS[done.result]
            if fix is None:
                log.info("broker %s: our end is %s (%s)", self.broker.url, myip, done.detail)
            else:
                log.warning("broker %s: update to %s: %s (%s): %s", self.broker.url, myip,
                            done.result, done.detail, fix)
            failures = 0 if fix is None else failures + 1
            delay = retry_after(done.result, failures, self.settings.broker_min_interval_s)
            # Until the retry is due (for ever after a final answer); a move or a stop ends
            # the wait.
            due = time.monotonic() + (delay if delay is not None else float("inf"))
            while (not self.stopping.is_set() and not self.broker_wake.is_set()
                   and time.monotonic() < due):
                self.broker_wake.wait(min(1.0, max(0.0, due - time.monotonic())))

    def _announce(self) -> None:
        """[cluster]: the anchor device up while the node is ready and not draining
        (``cluster.announce_state``), checked every ANNOUNCE_CHECK_S; a drain ends the run
        once the node's traffic has been quiet for drain_quiet_s, or at drain_timeout_s."""
        unready_since: float | None = None
        inbound, quiet_since = -1, time.monotonic()
        while not self.stopping.is_set():
            anchor = self.anchor
            if anchor is None:
                return
            now = time.monotonic()
            try:
                replies = self.ask_workers("stats" if self.draining else "ping",
                                           READY_WORKER_TIMEOUT_MS)
            except Exception as exc:  # noqa: BLE001 - this thread must go on (a drain's end)
                log.error("cluster: cannot ask the workers: %r", exc)
                replies = [None] * len(self.workers)
            reason = readiness(self.settings, self.view(), replies)
            if reason is None or self.draining:
                unready_since = None
            elif unready_since is None:
                unready_since = now
            state = cluster.announce_state(
                reason is None, self.draining, anchor.up,
                0.0 if unready_since is None else now - unready_since,
                self.settings.cluster_withdraw_after_s)
            if state != anchor.state:
                try:
                    anchor.set(state)
                except (OSError, NetlinkError) as exc:
                    log.error("cluster: cannot make the announcements %s: %s", state, exc)
                else:
                    prefixes = ", ".join(self.settings.cluster_announce)
                    log.info("cluster: %s", {
                        cluster.ANNOUNCE: f"announcing {prefixes} (ready)",
                        cluster.DRAIN: f"draining: {prefixes} announced with the "
                                       "GRACEFUL_SHUTDOWN community (RFC 8326)",
                        cluster.WITHDRAWN: f"withdrew {prefixes} ({reason})"}[state])
            if self.draining:
                total = sum(sum(n for key, n in r.get("counters", {}).get("packets", {}).items()
                                if key.startswith("inbound/"))
                            for r in replies if r is not None)
                if total != inbound:
                    inbound, quiet_since = total, now
                self.drain_quiet_s = now - quiet_since
                quiet = self.drain_quiet_s >= self.settings.cluster_drain_quiet_s
                if quiet or now - self.drain_started >= self.settings.cluster_drain_timeout_s:
                    log.info("cluster: drained (%s after %.1f s): stopping",
                             "quiet" if quiet else "timeout", now - self.drain_started)
                    self.running = False
                    return
            self.stopping.wait(ANNOUNCE_CHECK_S)

    @staticmethod
    def _peer_probes(settings: Settings) -> list[PeerProbe]:
        """A probe of each 6in4 tunnel's broker (several with [[tunnel]])."""
        probes: list[PeerProbe] = []
        try:
            for tunnel in settings.all_tunnels():
                if tunnel.mode == "6in4":
                    probes.append(PeerProbe(settings, tunnel.remote_ipv4))
        except OSError:
            for probe in probes:
                probe.close()
            raise
        return probes

    def _probe_peer(self) -> None:
        """RFC 4213 §3.8: each broker probed every ``probe_interval_s`` (thread); a change of
        its answer is logged."""
        while not self.stopping.is_set():
            probes = self.peer_probes  # a move of the tunnel replaces them
            interval = self.settings.probe_interval_s  # a reload may change it
            if interval <= 0:
                for probe in probes:
                    probe.reachable = None
                self.stopping.wait(5.0)
                continue
            for probe in probes:
                before = probe.reachable
                probe.probe(min(PROBE_TIMEOUT_S, interval))
                if self.stopping.is_set():
                    return
                if probe.reachable == before:
                    continue
                if probe.reachable:
                    log.info("6in4 peer %s answers (RFC 4213 §3.8 probe, %.1f ms)", probe.peer,
                             (probe.rtt_s or 0) * 1000)
                else:
                    log.warning("6in4 peer %s does not answer its link-local %s: the broker is "
                                "down or no longer forwards to this host", probe.peer,
                                ipaddress.IPv6Address(probe.target))
            self.stopping.wait(interval)

    def _take_rediscovered(self) -> None:
        found, how = self.rediscovered or (None, "")
        self.rediscovered = None
        if self.plat_source != "rfc7050":
            return  # a router advertisement's PREF64 has taken over (RFC 8781 comes first)
        if found is None:
            log.info("CLAT: RFC 7050 asked again: %s; keeping %s", how,
                     self.settings.clat_plat_prefix)
        elif found != self.settings.clat_plat_prefix:
            self._change_plat_prefix(found, "rfc7050", how)

    def _change_plat_prefix(self, prefix: str, source: str, how: str) -> None:
        """A new PLAT prefix: logged, counted, the worker told (``_publish``)."""
        old = self.settings.clat_plat_prefix
        self.plat_source = source
        self.plat_changes += 1
        replies = self._publish(with_plat_prefix(self.settings, prefix))
        log.warning("CLAT: PLAT prefix changed from %s to %s (%s)%s", old, prefix, how,
                    "" if all(r is not None and r.get("ok") for r in replies)
                    else "; the worker did not answer: it takes it when it starts again")

    def _publish(self, new: Settings) -> list[dict[str, Any] | None]:
        """``new`` becomes the running settings: a worker started from here on reads them and
        the running ones re-read them (``reload``); their replies (None: no answer)."""
        self._write_settings(new)
        return control.ask_workers(self.ctx, new.run_dir, new.workers, "reload",
                                   CONTROL_TIMEOUT_MS)

    def _write_settings(self, new: Settings) -> None:
        """``new`` becomes the running settings, and the file a worker starts from (replaced
        atomically: a worker starting now reads the old or the new one, whole)."""
        self.settings = new
        staged = self.settings_file.with_suffix(".new")
        staged.write_text(new.to_json())
        staged.replace(self.settings_file)

    def _worker_command(self, index: int, *flags: str) -> list[str]:
        return [sys.executable, "-m", "sixgate.workers.main", *flags, "--settings",
                str(self.settings_file), "--index", str(index)]

    def _spawn(self, worker: WorkerProcess) -> None:
        standby, worker.standby = worker.standby, None
        if standby is not None and standby.poll() is None and standby.stdin is not None:
            # Started by ``take_over`` (as root) and waiting: it becomes what a worker started
            # now would be (the user with the coordinator's capabilities), then reads the
            # settings file.
            standby.stdin.write(f"go {' '.join(map(str, self.kept_caps))}\n".encode())
            standby.stdin.close()
            worker.proc = standby
        else:
            worker.proc = subprocess.Popen(self._worker_command(worker.index),
                                           stdin=subprocess.DEVNULL)
        worker.started = time.monotonic()
        (self.run_dir / f"worker-{worker.index}.pid").write_text(f"{worker.proc.pid}\n")

    def _wait_workers_ready(self) -> None:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        pending = {w.index for w in self.workers}
        while pending:
            for index in sorted(pending):
                proc = self.workers[index].proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"worker {index} exited with code {proc.returncode} "
                                       "during start-up (its error is logged above)")
                if control.ask(self.ctx, [control_endpoint(self.settings.run_dir, index)],
                               control.request("ping"), 200)[0]:
                    pending.discard(index)
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(pending)} did not answer within "
                                   f"{WORKER_READY_TIMEOUT_S:.0f} s")

    def _signal_retiree(self, signum: int, why: str) -> None:
        retiree = self.retiree
        if retiree is not None and _pid_is_ours(retiree):
            log.info("take-over: %s (pid %d)", why, retiree)
            try:
                os.kill(retiree, signum)
            except ProcessLookupError:
                pass

    def retire(self) -> bool:
        """The kernel backend's side of a take-over (SIGUSR2 from the next run's ``sixgate
        run --take-over``): what the next run makes again is given up at once (the metrics
        listener, the control socket, the run directory's files and last the pidfile, which
        the next run waits for); the sit link, pool route and input policy are left to it
        (it keeps them: ``kernel_backend.setup(adopt=True)``); the relays go on, listening
        until the next run's listen beside them (its SIGUSR1), carrying their connections
        until these end, at most take_over_drain_s. Returns when the relays have exited
        (False; SIGTERM ends them at once), or True when this run serves again: the next
        run failed before it released our relays and handed back (a second SIGUSR2,
        ``_come_back``)."""
        self.stopping.set()
        self._end_threads()
        if self.anchor is not None:
            self.anchor.close()
            self.anchor = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        thread = getattr(self, "control_thread", None)
        if thread is not None:
            thread.join(timeout=5)
        if getattr(self, "control", None) is not None:
            self.control.close(0)
        if self.lan_enabled:
            lan.teardown(self.settings, self.radvd)  # the next run starts its own radvd
            self.lan_enabled = False
        self.retired = True  # the run directory is the next run's from now on
        self.sit_link = None  # so is the link: never torn down by this run
        self._remove_run_files()
        started = time.monotonic()
        log.info("take-over: retiring; the sit link is the next run's, this run's relays "
                 "carry their connections on")
        told = False
        while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
            if self.retire_stop.is_set():
                break
            if self.retire_return.is_set():
                self.retire_return.clear()
                if not told:
                    self._come_back(time.monotonic() - started)
                    return True
                log.warning("take-over: the next run hands back, but this run's relays "
                            "closed their listeners already: it cannot serve again")
            if self.retire_release.is_set() and not told:
                told = True
                # The 6in4 brokers' probes (raw sockets this run may not open again) were
                # kept for a hand-back until now.
                for probe in self.peer_probes:
                    probe.close()
                self.peer_probes = []
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.poll() is None:
                        worker.proc.send_signal(signal.SIGUSR1)
            time.sleep(RETIRE_POLL_S)
        log.info("take-over: retired after %.1f s", time.monotonic() - started)
        return False

    def _come_back(self, retired_s: float) -> None:
        """The next run failed before its relays took over from ours (``_hand_back``): serve
        again as before the take-over. The relays still listen and carry every connection;
        what ``retire`` gave up is made again (the sit link's addresses, routes and input
        policy as this run's config has them, the LAN, the BGP anchor, the metrics listener,
        the control socket, the run directory's files), each with the capabilities the
        supervisor kept (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE); what cannot be is said."""
        log.info("take-over: the next run failed and hands back after %.1f s: this run "
                 "serves again", retired_s)
        for thread in self.threads:  # told to end by ``retire``; none may run twice
            thread.join(timeout=5)
            if thread.is_alive():
                log.warning("take-over: the %s thread did not end in 5 s", thread.name)
        self.threads = []
        self.stopping.clear()
        with contextlib.suppress(BlockingIOError):
            os.read(self.threads_wake[0], 4096)
        settings = self.settings
        self.settings_file.write_text(settings.to_json())
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(coordinator_endpoint(settings.run_dir))
        try:
            self.sit_link = kernel_backend.setup(settings, adopt=True)
        except (kernel_backend.KernelBackendError, NetlinkError, OSError) as exc:
            log.error("take-over: cannot put the sit link back as this run has it (%s): "
                      "restart sixgate", exc)
        if settings.lan_interface and self.sit_link is not None:
            try:
                self.radvd = lan.setup(settings, self.sit_link)
                self.lan_enabled = True
            except (lan.LanError, NetlinkError, OSError) as exc:
                log.error("take-over: cannot set the LAN up again (%s): restart sixgate", exc)
        if settings.cluster_announce:
            try:
                self.anchor = cluster.Anchor(settings)
            except OSError as exc:
                log.error("take-over: cannot create the BGP anchor again (%s): restart "
                          "sixgate", exc)
        if settings.metrics_listen:
            try:
                self.metrics_server = MetricsServer(self, settings.metrics_listen)
            except OSError as exc:
                log.error("take-over: cannot listen for metrics on %s again (%s): restart "
                          "sixgate", settings.metrics_listen, exc.strerror)
        # The relays answer at worker-N again (the failed run's relays had it).
        endpoints = [control.retiring_endpoint(settings.run_dir, os.getpid(), w.index)
                     for w in self.workers]
        answered = control.ask(self.ctx, endpoints, control.request("rebind"), 5000)
        missing = [w.index for w, reply in zip(self.workers, answered, strict=True)
                   if reply is None or not reply.get("ok")]
        if missing:
            log.warning("take-over: relay(s) %s did not answer at their endpoint again",
                        missing)
        for worker in self.workers:  # what a start after a crash of this run stops
            if worker.proc is not None and worker.proc.poll() is None:
                (self.run_dir / f"worker-{worker.index}.pid").write_text(f"{worker.proc.pid}\n")
        self.retired = self.retiring = False
        self.running = True
        # Last, as at a start: the failed run waits for this pidfile.
        (self.run_dir / "coordinator.pid").write_text(f"{os.getpid()}\n")
        service_manager.notify("READY=1", f"MAINPID={os.getpid()}",
                               f"STATUS=serving again with {settings.workers} worker(s) after "
                               "a failed take-over")
        log.info("sixgate up again: the take-over failed; kernel backend, %s tunnel, local "
                 "%s, %d worker(s)", settings.mode, settings.local_ipv4, settings.workers)

    def _hand_back(self) -> None:
        """This take-over failed before its relays took over (no SIGUSR1 yet): the retiring
        run serves again (its second SIGUSR2: ``_come_back``); this run's stop left it the
        sit link. Waits for its pidfile, as a take-over waits for the old run's."""
        retiree = self.retiree
        if retiree is None or not _pid_is_ours(retiree):
            return
        user = self.previous.user if self.previous is not None else ""
        run_dir = getattr(self, "run_dir", None)
        if os.geteuid() == 0 and user and run_dir is not None:
            # Taken back by root at this run's start (prepare_run_dir): the retiring run is
            # the gateway user, and writes there again when it comes back.
            try:
                give_run_dir(run_dir, user)
            except (OSError, KeyError) as exc:
                log.warning("take-over: cannot give %s back to %s (%s)", run_dir, user, exc)
        self._signal_retiree(signal.SIGUSR2, "this run failed before the retiring run "
                             "released its listeners: handing back to it")
        service_manager.notify(f"MAINPID={retiree}",
                               "STATUS=the take-over failed; the previous run serves again")
        deadline = time.monotonic() + TAKE_OVER_WAIT_S
        while running_coordinator(self.settings) != retiree:
            if time.monotonic() > deadline or not _pid_is_ours(retiree):
                log.error("take-over: pid %d did not come back within %.0f s; start sixgate "
                          "again", retiree, TAKE_OVER_WAIT_S)
                return
            time.sleep(0.02)
        log.info("take-over: handed back; pid %d serves again", retiree)

    def _poller(self, sock: zmq.Socket[Any]) -> zmq.Poller:
        """A poller of ``sock`` that also wakes when the stop begins (``threads_wake``)."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.threads_wake[0], zmq.POLLIN)
        return poller

    def _end_threads(self) -> None:
        """The control and journal threads end now, not at their poll's next timeout."""
        self.running = False
        os.write(self.threads_wake[1], b"!")

    def stop(self) -> None:
        self.stopping.set()  # the RFC 7050 and probe threads end (a wait in them runs out)
        self._end_threads()  # the handover below takes what the journal still holds
        # A retiring run this one took over from carries connections over the link this
        # stop removes: they end now. Unless this run failed before it released that run's
        # relays: it hands back to it (``_hand_back``), leaving it the link.
        if not self.handing_back:
            self._signal_retiree(signal.SIGTERM, "stopping the retiring run too")
        if self.anchor is not None:
            self.anchor.close()  # first: BIRD withdraws before anything stops answering
            self.anchor = None
        if self.metrics_server is not None:
            self.metrics_server.close()
        for worker in self.workers:
            if worker.standby is not None:  # a take-over that did not get to start them
                worker.standby.kill()
                worker.standby.wait()
                worker.standby = None
            if worker.proc is not None and worker.proc.poll() is None:
                # A take-over's stop: the worker keeps its devices for the next run's.
                worker.proc.send_signal(signal.SIGUSR2 if self.handing_over
                                        else signal.SIGTERM)
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in 5 s; killing it", worker.index)
                worker.proc.kill()
                worker.proc.wait()
        for sock in getattr(self, "pushes", []):
            sock.close(0)
        self.running = False
        for name in ("control_thread", "journal_thread"):
            thread = getattr(self, name, None)
            if thread is not None:
                thread.join(timeout=5)
        if self.journal is not None:
            self._hand_over()
            self.journal.close(0)
        if getattr(self, "control", None) is not None:
            self.control.close(0)
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()
        if self.capture is not None:
            self.capture.close()
        # The CLAT's switches first: beside a NAT64 it found some of them set by the NAT64.
        if getattr(self, "clat_enabled", False):
            clat.undo(self.settings)
        if getattr(self, "forwarding_enabled", False):
            forwarding.undo(self.settings)
        if self.pref64 is not None:
            self.pref64.close()
        if self.uplink_watch is not None:
            self.uplink_watch.close()
        for probe in self.peer_probes:
            probe.close()
        if self.lan_enabled:
            lan.teardown(self.settings, self.radvd)
        if self.sit_link is not None and not self.handing_back:
            kernel_backend.teardown(self.settings)
        if not self.retired:
            self._remove_run_files()
        for path in Path(self.settings.run_dir).glob(f"relay-{os.getpid()}-*"):
            path.unlink(missing_ok=True)  # this run's relays' (retiring_endpoint)
        self._check_no_tun_left()
        if self.handing_back:
            self._hand_back()

    def _remove_run_files(self) -> None:
        run_dir = getattr(self, "run_dir", None)
        if run_dir is None:
            return
        for path in [*run_dir.glob("worker-*"), run_dir / "control", run_dir / "journal",
                     run_dir / "settings.json", run_dir / "coordinator.pid"]:
            path.unlink(missing_ok=True)

    def _check_no_tun_left(self) -> None:
        """Warn about a TUN device our own stopped worker left (never about another run's);
        devices kept for a next run that none took are removed, unless this stop is a
        take-over's (the next run takes them)."""
        if self.settings.backend == "kernel" or self.handing_over:
            return
        self._remove_kept_devices(range(max(self.settings.workers, self.previous_workers)))
        for worker in self.workers:
            if worker.proc is None:
                continue
            name = tun_name(self.settings, worker.index)
            if Path(f"/sys/class/net/{name}").exists():
                log.warning("TUN device %s still exists after its worker stopped", name)

    def _remove_kept_devices(self, indexes: range) -> None:
        """Remove the devices of workers ``indexes`` kept for a next run (workers/tun.py)
        that no worker took: a take-over from a run with more workers, or one that failed
        before its workers started."""
        from sixgate.workers.tun import kept_devices, remove_devices
        kept = kept_devices([name for i in indexes for name in worker_devices(self.settings, i)])
        if kept:
            log.info("removing device(s) %s kept for a next run that did not take them",
                     ", ".join(kept))
            try:
                remove_devices(kept)
            except Exception as exc:  # noqa: BLE001 - NetlinkError: said, the stop goes on
                log.warning("cannot remove device(s) %s: %s", ", ".join(kept), exc)

    # --- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        sock_fd = self.capture.fileno() if self.capture is not None else -1
        if self.capture is not None:
            poller.register(sock_fd, zmq.POLLIN)
            if self.wake_fd >= 0:
                poller.register(self.wake_fd, zmq.POLLIN)
        # The control socket has a thread of its own: a `sixgate flows` that waits for slow
        # workers must never hold up capture or the supervision of crashed workers.
        self.control_thread = self._thread(self._control_loop, "control")
        if self.journal is not None:
            self.journal_thread = self._thread(self._journal_loop, "journal")
        if self.peer_probes:
            self._thread(self._probe_peer, "peer-probe")
        if self.anchor is not None:
            self._thread(self._announce, "announce")
        if self.broker is not None:
            self._thread(self._update_broker, "broker-update")
        if self.plat_source == "rfc7050":
            self._thread(self._rediscover, "rfc7050")
        if self.uplink_watch is not None:
            self._thread(self._watch_uplink, "uplink")
        if self.settings.public_ipv4_url:
            self._thread(self._watch_public, "public-ipv4")
        next_check = next_tick = time.monotonic() + 1.0
        wait_s = SUPERVISE_INTERVAL_S
        while self.running:
            if self.capture is not None:
                events = dict(poller.poll(timeout=int(wait_s * 1000)))
            else:
                # Kernel fan-out or backend: nothing to poll here (the control socket has its
                # own thread), and zmq_poll of no socket returns at once: sleep instead.
                events = {}
                if self.wake_fd >= 0:
                    readable, _, _ = select.select([self.wake_fd], [], [], wait_s)
                    events = dict.fromkeys(readable, zmq.POLLIN)
                else:
                    time.sleep(wait_s)
            if self.wake_fd in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_fd, 4096)
            self.loop_seen = time.monotonic()
            if sock_fd in events:
                self._capture()
            if self.move_to is not None:
                (address, public), self.move_to = self.move_to, None
                if (address, public) != (self.settings.local_ipv4, self.settings.known_ipv4):
                    self._move_tunnel(address, public)
                    if self.capture is not None:  # the new capture socket
                        poller.unregister(sock_fd)
                        sock_fd = self.capture.fileno()
                        poller.register(sock_fd, zmq.POLLIN)
            if self.reload_requested:
                self.reload_requested = False
                self.reload(None)
            now = time.monotonic()
            if now >= next_check:
                # A dead worker is noticed within this interval (its sessions wait for it).
                next_check = now + SUPERVISE_INTERVAL_S
                self._supervise(now)
                if self.pref64 is not None:
                    self._watch_pref64()
                if self.rediscovered is not None:
                    self._take_rediscovered()
            if now >= next_tick:
                next_tick = now + 1.0
                if self.capture is not None:
                    self.capture.tick(now)  # outer fragments that did not complete in time

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def _capture(self) -> None:
        """Read up to RECV_BUDGET packets in recvmmsg batches and send one message per worker
        per batch. The worker checks and translates them (``Datapath.from_tunnel``), as with
        kernel fan-out; the shard is the one the kernel's filter would pick (``fanout_index``)."""
        nworkers = self.settings.workers
        shards = self.settings.shard_count
        seed = self.settings.hash_seed
        capture = self.capture
        assert capture is not None
        now = time.monotonic()
        for _ in range(RECV_BUDGET // capture.batch):
            try:
                packets, read = capture.receive(now)
            except OSError as exc:
                log.warning("receive failed: %s", exc)
                return
            if not read:
                return
            if nworkers == 1:
                if packets:
                    self._send_batch(0, packets)
            else:
                batches: list[list[bytes | memoryview]] = [[] for _ in range(nworkers)]
                for packet in packets:
                    batches[fanout_index(packet, seed, nworkers, shards)].append(packet)
                for index, batch in enumerate(batches):
                    if batch:
                        self._send_batch(index, batch)
            if read < capture.batch:
                return

    def _send_batch(self, index: int, batch: Sequence[bytes | memoryview]) -> None:
        try:
            self.pushes[index].send(encode_batch(batch), zmq.NOBLOCK, copy=False)
            self.counters.event(Event.BATCHES_SENT)
            self.counters.event(Event.PACKETS_FANNED_OUT, len(batch))
            self.batch_packets.observe(len(batch))
        except zmq.Again:
            # Bounded queue: a slow or dead worker costs these packets, never our memory.
            self.counters.drops[DropReason.QUEUE_FULL] += len(batch)
            self.queue_drops[index] += len(batch)

    def _supervise(self, now: float) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            if worker.next_start == 0.0:
                worker.crash_streak = (0 if now - worker.started >= STABLE_RUN_S
                                       else worker.crash_streak + 1)
                delay = restart_delay(worker.crash_streak)
                worker.next_start = now + delay
                log.error("worker %d (pid %d) exited with code %s; restarting in %.1f s",
                          worker.index, proc.pid, proc.returncode, delay)
            elif now >= worker.next_start:
                worker.restarts += 1
                worker.next_start = 0.0
                self.counters.event(Event.WORKER_RESTARTS)
                self._hand_shard(worker.index)
                self._spawn(worker)

    # --- the shard journal ----------------------------------------------------------------------

    def _journal_loop(self) -> None:
        """Apply the workers' journal messages to the copy (its own thread: a burst of new
        flows never holds up capture or supervision)."""
        assert self.journal is not None and self.shard_copy is not None
        poller = self._poller(self.journal)
        while self.running:
            try:
                if self.journal not in dict(poller.poll(200)):
                    continue
                message = self.journal.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # closed at stop
            with self.shard_lock:
                if self.shard_copy.apply(message) is not None and self.crash_log is not None:
                    try:
                        self.crash_log.append(message, self.shard_copy)
                    except OSError as exc:
                        log.error("cannot write the session log %s (%s): a crash of the "
                                  "coordinator would now lose the sessions; a worker's "
                                  "crash would not", self.crash_log.path, exc)
                        self.crash_log.remove()
                        self.crash_log = None

    def _hand_shard(self, index: int) -> None:
        """Before worker ``index`` starts again: its shard, for it to resume."""
        if self.shard_copy is None:
            return
        with self.shard_lock:
            try:
                count = self.shard_copy.write(self.settings.run_dir, index)
            except OSError as exc:
                log.error("cannot hand worker %d its shard (%s): it starts empty", index, exc)
                return
        log.info("worker %d gets its shard of %d session(s) to resume", index, count)

    def _hand_over(self) -> None:
        """At a stop: the workers' last journal messages, then every shard for the next run
        (a restart, an upgrade, a deploy) to resume."""
        assert self.journal is not None and self.shard_copy is not None
        stopped = {worker.index for worker in self.workers if worker.proc is not None}
        # A worker that stopped cleanly said so in its last message: once all have, what is
        # queued is the rest. One that did not (killed) gets JOURNAL_DRAIN_MS of quiet.
        while self.journal.poll(0 if stopped <= self.shard_copy.ended else JOURNAL_DRAIN_MS):
            self.shard_copy.apply(self.journal.recv())
        try:
            count = write_handover(self.settings.run_dir, self.shard_copy,
                                   dataclasses.asdict(self.settings), time.time())
        except OSError as exc:
            log.error("cannot hand the sessions over to the next run (%s)", exc)
            return  # the session log, if any, stays for it instead
        if self.crash_log is not None:
            self.crash_log.remove()  # the handover supersedes it
        log.info("%d session(s) handed over to the next run (taken within %.0f s)", count,
                 HANDOVER_MAX_AGE_S)

    # --- reload -------------------------------------------------------------------------------

    def reload(self, path: str | None, text: str | None = None) -> tuple[bool, str]:
        """Re-read the config (``path``, else the file the gateway started with; ``text``: its
        content as ``sixgate reload`` read it) and apply what may change live
        (coordinator/reload.py); (applied?, what happened). A refused reload changes nothing
        and says why, in the log and in the metrics."""
        with self.reload_lock:
            done, message = self._reload(path or self.settings.source_file, text)
            self.reload_ok = done
            if done:
                self.reload_success_unix = time.time()
                log.info("config reloaded: %s", message)
            else:
                log.error("config reload refused, the running config stays: %s", message)
            return done, message

    def _reload(self, path: str, text: str | None) -> tuple[bool, str]:
        running = self.settings
        if text is None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                return False, (f"{path}: cannot read it as {who_am_i()!r} ({exc.strerror}): "
                               "make it readable by the gateway's user, or run `sixgate "
                               f"reload --config {path}` as root")
        try:
            new = reloading.as_running(running, parse_config(text, path))
        except ConfigError as exc:
            return False, str(exc)
        blocked = reloading.restart_needed(running, new)
        if blocked:
            keeps = (" (a take-over, `sixgate reload --or-take-over` or `systemctl reload`, "
                     "keeps every session)"
                     if reloading.take_over_keeps_sessions(running, new, blocked) else "")
            return False, (f"{path}: {', '.join(blocked)} cannot change while sixgate "
                           f"runs{keeps}: {RESTART_NEEDED}")
        what = reloading.changed(running, new)
        if not what:
            return True, f"{path}: nothing changed"
        if running.backend == "kernel":
            # The relays run unprivileged: a new listener on a privileged port needs a start.
            privileged = kernel_backend.new_privileged_ports(running, new)
            if privileged:
                return False, (f"{path}: new forward port(s) {', '.join(privileged)} are below "
                               "net.ipv4.ip_unprivileged_port_start, which the unprivileged "
                               f"relays cannot open: {RESTART_NEEDED}")
            try:
                kernel_backend.update_input_policy(new, self.sit_link or "")
            except kernel_backend.KernelBackendError as exc:
                return False, f"{path}: {exc} (the running config stays)"
        if new.metrics_listen != running.metrics_listen:
            try:
                server = MetricsServer(self, new.metrics_listen) if new.metrics_listen else None
            except OSError as exc:
                return False, (f"{path}: cannot listen for metrics on {new.metrics_listen} "
                               f"({exc.strerror}); the running config stays")
            if self.metrics_server is not None:
                self.metrics_server.close()
            self.metrics_server = server
        logging.getLogger().setLevel(new.log_level.upper())
        replies = self._publish(new)
        ended = sum(int(r.get("ended", 0)) for r in replies if r is not None and r.get("ok"))
        late = [str(i) for i, r in enumerate(replies) if r is None or not r.get("ok")]
        return True, (f"{path}: {', '.join(what)} changed; {ended} flow(s) of removed rules "
                      "ended" + (f"; worker(s) {', '.join(late)} did not answer: they take it "
                                 "when they start again" if late else ""))

    # --- control ------------------------------------------------------------------------------

    def _control_loop(self) -> None:
        poller = self._poller(self.control)
        while self.running:
            try:
                if self.control in dict(poller.poll(200)):
                    self._answer_control()
            except Exception as exc:  # noqa: BLE001 - a bad request must not end the gateway
                self.counters.event(Event.CONTROL_ERRORS)
                log.error("control request failed: %r", exc, exc_info=exc)

    def _answer_control(self) -> None:
        try:
            frames = self.control.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        cmd, fields, error = control.parse_request(frames, control.MAX_RELOAD_BYTES)
        if error is not None:
            self.counters.event(Event.CONTROL_ERRORS)
            self.control.send_json(error)
        elif cmd in ("flows", "status"):
            workers = []
            replies = control.ask_workers(self.ctx, self.settings.run_dir, self.settings.workers,
                                  "flows", CONTROL_TIMEOUT_MS,
                                  limit=control.page_limit(fields))
            for worker, reply in zip(self.workers, replies, strict=True):
                entry: dict[str, Any] = {"index": worker.index, "restarts": worker.restarts,
                                         "up": reply is not None}
                if reply is not None:
                    entry.update(reply)
                workers.append(entry)
            self.control.send_json(control.ok(
                uptime_s=round(time.monotonic() - self.started, 1),
                settings={"mode": self.settings.mode, "workers": self.settings.workers,
                          "backend": self.settings.backend,
                          "addresses": list(self.settings.addresses),
                          "pool": self.settings.pool},
                coordinator=self.counters.as_dict(),
                workers=workers,
                # A take-over's retiring run (kernel backend): the connections it still
                # carries are this gateway's too until they end.
                retiring=[{**reply, "pid": self.retiree} for reply in self.ask_retiring(
                    "flows", CONTROL_TIMEOUT_MS, limit=control.page_limit(fields))]))
        elif cmd == "reload":
            path, text = fields.get("config"), fields.get("text")
            done, message = self.reload(path if isinstance(path, str) and path else None,
                                        text if isinstance(text, str) else None)
            self.control.send_json(control.ok(message=message) if done else control.error(
                message, restart_needed=message.endswith(RESTART_NEEDED)))
        elif cmd == "ping":
            self.control.send_json(control.ok(installation=service_manager.installation()))
        elif cmd == "drain":
            if self.anchor is None:
                self.control.send_json(control.error(
                    "this gateway has no [cluster]: nothing to withdraw; stop it instead"))
            else:
                if not self.draining:
                    self.drain_started = time.monotonic()
                    self.draining = True
                    log.info("cluster: drain asked")
                self.control.send_json(control.ok(
                    message=f"draining {', '.join(self.settings.cluster_announce)}: announced "
                    "with the GRACEFUL_SHUTDOWN community (RFC 8326) until the node stops, "
                    "once no packet came for "
                    f"{self.settings.cluster_drain_quiet_s:g} s, at most "
                    f"{self.settings.cluster_drain_timeout_s:g} s; then withdrawn"))
        else:
            self.counters.event(Event.CONTROL_ERRORS)
            self.control.send_json(control.error(f"unknown command {cmd!r}"))


def run_gateway(settings: Settings, take_over: bool = False) -> int:
    """Run until SIGINT/SIGTERM; exit code 0 on a clean stop, 1 on a runtime failure.
    ``take_over``: in place of the gateway running with this run_dir (``take_over``)."""
    coordinator = Coordinator(settings)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        coordinator.running = False
        coordinator.retire_stop.set()

    def retire(_signum: int, _frame: object) -> None:
        # The next run takes over: the kernel backend's run retires (``retire``), another
        # stops as on SIGTERM (it hands its sessions over) and leaves its TUN devices to it.
        # Once retired, the next run's SIGUSR2 hands back: it failed (``_hand_back``).
        if coordinator.retired:
            coordinator.retire_return.set()
            return
        log.info("take-over asked by the next run")
        coordinator.retiring = settings.backend == "kernel"
        coordinator.handing_over = settings.backend != "kernel"
        coordinator.running = False

    def hangup(_signum: int, _frame: object) -> None:
        coordinator.reload_requested = True  # the main loop reloads (never in a handler)

    coordinator.wake_fd, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    signal.signal(signal.SIGUSR2, retire)
    signal.signal(signal.SIGUSR1, lambda *_: coordinator.retire_release.set())
    try:
        if take_over:
            coordinator.take_over()
        coordinator.start()
        service_manager.notify("READY=1", f"MAINPID={os.getpid()}",
                               f"STATUS=serving with {settings.workers} worker(s)")
        coordinator.run()
        # A retired run comes back if the take-over fails before it released our relays.
        while coordinator.retiring and coordinator.retire():
            coordinator.run()
        # A take-over's old run says nothing: the unit goes on (its main process is the
        # next run's, which said MAINPID=); STOPPING=1 from any of its processes stops it.
        if not coordinator.retiring and not coordinator.handing_over:
            service_manager.notify("STOPPING=1")
    except (OSError, RuntimeError, RunDirBusy, zmq.ZMQError, NetlinkError) as exc:
        log.error("sixgate cannot run: %s", exc)
        # A take-over that failed before it released the retiring run's relays hands back.
        coordinator.handing_back = coordinator.retiree is not None and not coordinator.released
        return 1
    finally:
        # Whatever went wrong, what start() made is undone (links, routes, tables, files).
        coordinator.stop()
    log.info("sixgate stopped cleanly")
    return 0
