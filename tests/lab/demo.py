"""A readable end-to-end demonstration: ``python -m tests.lab.demo`` (as root, from the repo).

Builds the test lab (6to4, 2 workers), starts dnsmasq, http.server and the real ``sixgate run``,
then drives it from the IPv6 namespace with real ping -6, curl -6 and dig, shows
``sixgate flows`` and the drop counters, and tears everything down. Each step prints its
command, OK/FAIL and how long it took; the exit code is 1 if any step failed.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.lab import netlab
from tests.lab.netlab import Lab

MODE = "6to4"
WORKERS = 2


@dataclass
class Step:
    """One demonstrated action and its outcome."""

    title: str
    command: str
    ok: bool
    elapsed_s: float
    detail: str


class Demo:
    """Runs steps, prints each as it finishes, remembers the outcome."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def run(self, title: str, command: str, action: Callable[[], tuple[bool, str]]) -> bool:
        """Run ``action`` (returning ok, detail); a raised exception is a FAIL."""
        started = time.monotonic()
        try:
            ok, detail = action()
        except Exception as exc:  # a demo reports every failure and goes on
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        step = Step(title, command, ok, time.monotonic() - started, detail)
        self.steps.append(step)
        self.show(step)
        return ok

    @staticmethod
    def show(step: Step) -> None:
        """Print one step."""
        mark = "\033[32m OK \033[0m" if step.ok else "\033[31mFAIL\033[0m"
        if not sys.stdout.isatty():
            mark = " OK " if step.ok else "FAIL"
        print(f"[{mark}] {step.elapsed_s:6.2f}s  {step.title}")
        print(f"         $ {step.command}")
        for line in step.detail.strip().splitlines():
            print(f"           {line}")
        sys.stdout.flush()

    def summary(self) -> int:
        """Print the tally; the process exit code."""
        failed = [s for s in self.steps if not s.ok]
        print(f"\n{len(self.steps) - len(failed)}/{len(self.steps)} steps OK"
              + (f"; failed: {', '.join(s.title for s in failed)}" if failed else ""))
        return 1 if failed else 0


def ping_step(demo: Demo, lab: Lab, payload_bytes: int) -> None:
    """ping -6 the gateway address."""
    def action() -> tuple[bool, str]:
        done = netlab.ping(lab, payload_bytes)
        lines = [line for line in done.stdout.splitlines() if "received" in line or "rtt" in line]
        return netlab.ping_received(done.stdout) == 3, "\n".join(lines) or done.stderr

    demo.run(f"ping -6, {payload_bytes}-byte payload", f"ping -6 -c 3 -s {payload_bytes} "
             f"{lab.plan.gateway_address}", action)


def curl_small_step(demo: Demo, lab: Lab) -> None:
    """curl -6 the small text file and compare it."""
    url = netlab.http_url(lab, netlab.SMALL_NAME)

    def action() -> tuple[bool, str]:
        done = lab.peer(["curl", "-6", "-g", "-sS", "--max-time", "10", url])
        return done.stdout == netlab.SMALL_TEXT, (done.stdout or done.stderr).strip()

    demo.run("curl -6 small file", f"curl -6 -g {url}", action)


def curl_big_step(demo: Demo, lab: Lab) -> None:
    """curl -6 the 10 MB file; digest and throughput."""
    served = lab.files.mid
    url = netlab.http_url(lab, served.name)

    def action() -> tuple[bool, str]:
        got = netlab.download(lab, url, max_time_s=60)
        ok = got.exit_code == 0 and got.sha256 == served.sha256
        return ok, (f"{got.size_bytes} bytes in {got.elapsed_s:.2f} s = "
                    f"{got.megabytes_per_s:.1f} MB/s, sha256 "
                    f"{'matches' if got.sha256 == served.sha256 else 'DIFFERS'} {got.stderr}")

    demo.run(f"curl -6 {served.size_bytes >> 20} MB file", f"curl -6 -g {url}", action)


def dig_steps(demo: Demo, lab: Lab) -> None:
    """dig a small A record and a TXT answer larger than the tunnel MTU."""
    address = lab.plan.gateway_address

    def small() -> tuple[bool, str]:
        done = netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short")
        return done.stdout.strip() == netlab.DNS_SMALL_A, (done.stdout + done.stderr).strip()

    def big() -> tuple[bool, str]:
        done = netlab.dig(lab, netlab.DNS_BIG_NAME, "TXT", "+bufsize=8192", "+ignore")
        strings = netlab.dig_txt_strings(done.stdout)
        size = netlab.dig_message_bytes(done.stdout)
        ok = strings == netlab.big_txt_strings() and "tc" not in netlab.dig_flags(done.stdout)
        return ok, (f"{size}-byte UDP answer (tunnel MTU {netlab.TUNNEL_MTU}), "
                    f"{len(strings)}/{netlab.TXT_STRINGS} strings intact, "
                    f"flags {' '.join(sorted(netlab.dig_flags(done.stdout)))}")

    demo.run("dig small A record", f"dig -6 @{address} -p 53 {netlab.DNS_SMALL_NAME} A", small)
    demo.run("dig TXT answer larger than the MTU (IPv6 fragments)",
             f"dig -6 @{address} -p 53 +bufsize=8192 +ignore {netlab.DNS_BIG_NAME} TXT", big)


def flows_step(demo: Demo, lab: Lab) -> None:
    """sixgate flows while a TCP connection is held open."""
    def action() -> tuple[bool, str]:
        with netlab.open_tcp_connection(lab) as (client_addr, client_port):
            done = lab.sixgate("flows")
        ok = done.returncode == 0 and client_addr in done.stdout
        return ok, (f"(held open: [{client_addr}]:{client_port} -> port 80)\n"
                    + (done.stdout or done.stderr))

    demo.run("sixgate flows with one open TCP connection",
             f"sixgate flows --config {lab.config_path}", action)


def drops_step(demo: Demo, lab: Lab) -> None:
    """The drop counters: the non-zero ones, and internal_error must be 0."""
    def action() -> tuple[bool, str]:
        counts = netlab.drops(lab)
        nonzero = {k: v for k, v in counts.items() if v}
        return counts.get("internal_error") == 0, (
            f"{len(counts)} reasons, non-zero: {nonzero or 'none'}")

    demo.run("drop counters (internal_error must be 0)",
             f"sixgate flows --json --config {lab.config_path}  # .drops", action)


def shutdown_step(demo: Demo, lab: Lab) -> None:
    """SIGTERM the gateway: exit 0 and no links left named after it."""
    def action() -> tuple[bool, str]:
        exit_code = lab.stop_gateway(timeout=10)
        leftovers = lab.gateway_links()
        detail = f"exit code {exit_code}; links left named {lab.name!r}: {leftovers or 'none'}"
        if exit_code != 0:
            detail += f"\n{lab.gateway_stderr()}"
        return exit_code == 0 and not leftovers, detail

    demo.run("stop sixgate (SIGTERM)", f"kill -TERM {lab.processes['sixgate'].pid}", action)


def build_step(demo: Demo, lab: Lab) -> bool:
    """Namespaces, tunnel peer, services, then ``sixgate run`` until it answers."""
    def action() -> tuple[bool, str]:
        lab.start()
        return True, (f"namespaces {lab.gw_ns} / {lab.peer_ns}\n"
                      f"gateway {lab.plan.gateway_address} (its kernel has IPv6 off), "
                      f"client {lab.plan.peer_address}\n"
                      f"sixgate pid {lab.processes['sixgate'].pid} ready")

    return demo.run(f"build lab ({MODE}, {WORKERS} workers) and start sixgate",
                    f"sixgate run --config {lab.config_path}", action)


def traffic_steps(demo: Demo, lab: Lab) -> None:
    """Everything a client does through the running gateway."""
    for payload_bytes in (56, 3000):
        ping_step(demo, lab, payload_bytes)
    curl_small_step(demo, lab)
    curl_big_step(demo, lab)
    dig_steps(demo, lab)
    flows_step(demo, lab)
    drops_step(demo, lab)
    shutdown_step(demo, lab)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main() -> int:
    """Build, demonstrate, tear down; 0 if every step was OK."""
    missing = netlab.missing_requirements()
    if missing:
        print("cannot run the lab: " + "; ".join(missing), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally below still tears down
    demo = Demo()
    swept = netlab.sweep_leftovers()
    if swept:
        print(f"swept leftovers of dead runs: {swept}")
    files = netlab.make_served_files(big_mb=1, mid_mb=10)
    lab = Lab(MODE, WORKERS, files)
    try:
        built = build_step(demo, lab)
        if built:
            traffic_steps(demo, lab)
        elif "sixgate" in lab.processes:
            print(lab.diagnostics())
    finally:
        lab.close()
        shutil.rmtree(files.directory, ignore_errors=True)
    left = [n for n in netlab.list_namespaces() if n in (lab.gw_ns, lab.peer_ns)]
    demo.run("tear down", "ip netns del ...", lambda: (not left, f"namespaces left: {left}"))
    return demo.summary()


if __name__ == "__main__":
    sys.exit(main())
