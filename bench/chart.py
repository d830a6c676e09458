"""The benchmark's PNG: packets/s against sixgate's worker count, TAYGA and the kernel as lines.

One panel per payload size (forward direction): sixgate's loss-free rate and its throughput at
overload for each worker count, TAYGA's and the kernel's loss-free rates as horizontal
reference lines. Log scale: the kernel is far above both translators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], path: Path) -> str | None:
    """Write the chart; None when written, else why not (matplotlib missing, no figures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is missing (pip install -e '.[bench]')"
    systems = results["systems"]
    payloads = results["plan"]["forward_payloads"]
    sixgate = sorted(((int(key.split()[1].rstrip("w")), system)
                      for key, system in systems.items()
                      if key.startswith("sixgate") and "forward" in system), key=lambda p: p[0])
    if not sixgate:
        return "not drawn: no sixgate figures"
    figure, axes = plt.subplots(1, len(payloads) + 1, figsize=(5 * (len(payloads) + 1), 4.2),
                                squeeze=False)
    for ax, payload in zip(axes[0], payloads, strict=False):
        workers = [count for count, _ in sixgate]
        for which, style, label in (("loss_free", "o-", "sixgate, < 0.1% loss"),
                                    ("overload", "s--", "sixgate at overload")):
            values = [_pps(system, payload, which) for _, system in sixgate]
            ax.plot(workers, [v or float("nan") for v in values], style, label=label,
                    color="tab:blue" if which == "loss_free" else "tab:cyan")
        for name, color in (("TAYGA", "tab:orange"), ("kernel", "tab:green")):
            value = _pps(systems.get(name, {}), payload, "loss_free")
            if value:
                ax.axhline(value, color=color, linestyle=":",
                           label=f"{name} (forwarding)" if name == "kernel" else f"{name} NAT64")
        ax.set_yscale("log")
        ax.set_xticks(workers)
        ax.set_xlabel("sixgate workers")
        ax.set_ylabel("packets/s delivered")
        ax.set_title(f"{payload}-byte UDP payload, forward")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    efficiency(axes[0][-1], systems, sixgate)
    machine = results["machine"]
    pins = machine["pinning"]
    figure.suptitle(f"sixgate vs TAYGA vs kernel: {machine['cores']} cores, gateways on CPU "
                    f"{pins['gateway_cpus'] or 'any'}, commit {machine['commit']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def efficiency(ax: Any, systems: dict[str, Any], sixgate: list[tuple[int, Any]]) -> None:
    """Delivered packets per CPU-second, 64 B forward, saturated: sixgate per worker count."""
    workers = [count for count, _ in sixgate]
    values = [_pps(system, 64, "overload", "per_core_pps") for _, system in sixgate]
    ax.plot(workers, [v or float("nan") for v in values], "o-", color="tab:blue",
            label="sixgate (all its processes)")
    tayga = _pps(systems.get("TAYGA", {}), 64, "overload", "per_core_pps")
    if tayga:
        ax.axhline(tayga, color="tab:orange", linestyle=":", label="TAYGA")
    top = max([v for v in [*values, tayga] if v] or [1.0])
    ax.set_ylim(0, top * 1.2)
    ax.set_xticks(workers)
    ax.set_xlabel("sixgate workers")
    ax.set_ylabel("packets per CPU-second")
    ax.set_title("per-core efficiency, 64 B, saturated")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _pps(system: dict[str, Any], payload: int, which: str,
         key: str | None = None) -> float | None:
    figures = system.get("forward", {}).get(str(payload), {}).get(which)
    if not figures:
        return None
    value = figures[key or ("offered_pps" if which == "loss_free" else "delivered_pps")]
    return None if value is None else float(value)
