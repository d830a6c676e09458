"""``sixgate deploy plan|apply|rollback|emit|build``: rollouts of sixgate to a fleet with Ansible.

plan      validate inventory + rollout (and every host's gateway config), show the batches and
          each host's settings; run ansible-playbook --syntax-check on the generated playbook
          (--check: then also apply --check, which asks the hosts what would change)
apply     generate the Ansible directory and run site.yml with ansible-playbook (--check: Ansible's
          check mode, nothing changes), then report which host runs which release
rollback  put hosts back on their previous release and config (same batches and health gate)
emit DIR  write the generated inventory, playbooks and role for teams that run Ansible themselves
build     pip wheel of this checkout and its dependencies into a wheelhouse

Exit codes as everywhere in sixgate: 0 ok, 2 bad inventory/rollout file, 1 the rollout failed.
This module is imported by ``coordinator.cli`` to build its parser: it imports nothing heavy
(Ansible, Jinja2, YAML) until a command runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sixgate.coordinator.config import ConfigError

if TYPE_CHECKING:
    from sixgate.deploy.inventory import Host, Inventory
    from sixgate.deploy.rollout import Rollout
    from sixgate.deploy.runner import Workspace

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
DEFAULT_INVENTORY = "deploy/inventory.toml"
DEFAULT_ROLLOUT = "deploy/rollout.toml"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    """Add ``deploy`` and its commands to the ``sixgate`` parser; returns the deploy parser
    (its ``func`` default is the caller's: ``run`` dispatches to ``deploy_func``)."""
    deploy = sub.add_parser("deploy", help="roll sixgate out to many hosts with Ansible "
                            "(plan, apply, rollback, emit, build)",
                            description=__doc__.split("\n\n")[1] if __doc__ else None,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = deploy.add_subparsers(dest="deploy_command", required=True)
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--inventory", "-i", default=DEFAULT_INVENTORY,
                       help=f"the fleet (default {DEFAULT_INVENTORY})")
    files.add_argument("--rollout", "-r", default=DEFAULT_ROLLOUT,
                       help=f"the rollout plan (default {DEFAULT_ROLLOUT})")
    limit = argparse.ArgumentParser(add_help=False)
    limit.add_argument("--limit", "-l", help="only these hosts or groups (comma-separated)")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--check", action="store_true",
                     help="Ansible's check mode: show what would change, change nothing")
    run.add_argument("--workdir", help="generate the Ansible directory here and keep it "
                     "(default: a temporary one, kept only when the run fails)")
    run.add_argument("--report-json", help="also write the report (what each host runs) here")
    p = commands.add_parser("plan", parents=[files, limit],
                            help="validate, show batches and per-host settings; touch nothing")
    p.add_argument("--check", action="store_true", help="also run the rollout in Ansible's "
                   "check mode on the hosts (what would change; nothing changes)")
    p.set_defaults(deploy_func=cmd_plan)
    p = commands.add_parser("apply", parents=[files, limit, run],
                            help="roll the release and configs out, batch by batch")
    p.set_defaults(deploy_func=cmd_apply)
    p = commands.add_parser("rollback", parents=[files, limit, run],
                            help="back to each host's previous release and config")
    p.set_defaults(deploy_func=cmd_rollback)
    p = commands.add_parser("emit", parents=[files],
                            help="write the generated Ansible inventory, playbooks and role")
    p.add_argument("directory")
    p.set_defaults(deploy_func=cmd_emit)
    p = commands.add_parser("build", help="wheelhouse: this checkout's wheel + dependencies")
    p.add_argument("--out", required=True, help="directory for the wheels")
    p.add_argument("--local-version", help="build as <version>+THIS (PEP 440 local version)")
    p.add_argument("--no-deps", action="store_true", help="only the sixgate wheel")
    p.set_defaults(deploy_func=cmd_build)
    return deploy


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed ``sixgate deploy ...`` command; bad files exit 2."""
    from sixgate.deploy.runner import AnsibleMissing
    try:
        result: int = args.deploy_func(args)
    except ConfigError as exc:
        print(f"sixgate deploy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AnsibleMissing as exc:
        print(f"sixgate deploy: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return result


def load(args: argparse.Namespace, need_release: bool = True) -> tuple[
        Inventory, Rollout, list[Host]]:
    """Inventory, rollout and the selected hosts, every host's gateway config validated."""
    from sixgate.deploy.inventory import load_inventory
    from sixgate.deploy.render import check_gateway_config
    from sixgate.deploy.rollout import load_rollout
    inventory = load_inventory(args.inventory)
    rollout = load_rollout(args.rollout, need_release=need_release)
    hosts = inventory.select(getattr(args, "limit", None))
    if not hosts:
        raise ConfigError("--limit", "", None, "selects no host")
    for host in inventory.hosts:
        check_gateway_config(inventory, host)
        if rollout.readyz and not host.vars["metrics_listen"]:
            raise inventory.source.error(host.origin.get("metrics_listen", ("hosts", host.name)),
                                         f"host {host.name!r}: the health gate asks /readyz, "
                                         "but metrics are off; set metrics_listen or "
                                         "health.readyz = false")
        if rollout.ping and host.vars["ping_target"] is None:
            raise inventory.source.error(("hosts", host.name, "ping_target"),
                                         f"host {host.name!r} has no ping_target, which the "
                                         "health gate pings (health.ping = true); set it on "
                                         "the host, a group or [defaults]")
    return inventory, rollout, hosts


def describe(inventory: Inventory, rollout: Rollout, hosts: list[Host], release: bool) -> None:
    """What a rollout will do: release, batches, health gate, failure policy."""
    from sixgate.deploy.rollout import batches
    plan = batches([h.name for h in hosts], rollout.serial)
    if release:
        print(f"release     sixgate {rollout.version} ({rollout.wheel}, dependencies from "
              f"{rollout.wheelhouse})")
    serial = json.dumps(list(rollout.serial))
    print(f"batches     serial {serial}, max_fail_percentage {rollout.max_fail_percentage}: "
          f"{len(hosts)} hosts in {len(plan)} batches")
    for number, batch in enumerate(plan, 1):
        print(f"  batch {number}: {', '.join(batch)}")
    gate = []
    if rollout.readyz:
        gate.append("/readyz answers 200")
    if rollout.ping:
        gate.append(f"`sixgate ping <ping_target>` gets a reply (of {rollout.ping_count}; an "
                    "IPv4 target through the NAT64)")
    print(f"health      {' and '.join(gate) or 'none'}, within {rollout.timeout_s} s")
    print(f"on failure  roll back the {rollout.on_failure} (previous release and config); "
          f"more than {rollout.max_fail_percentage}% failed in a batch stops the rollout"
          if rollout.on_failure != "none" else
          "on failure  leave failed hosts as they are; max_fail_percentage decides whether "
          "the rollout stops")


def cmd_plan(args: argparse.Namespace) -> int:
    import hashlib

    from sixgate.deploy.inventory import has_nat64
    from sixgate.deploy.render import render_gateway_config
    from sixgate.deploy.runner import AnsibleMissing
    from sixgate.workers.engine.nat64 import WELL_KNOWN_PREFIX
    inventory, rollout, hosts = load(args)
    print(f"inventory   {inventory.file}: {len(inventory.hosts)} hosts, groups "
          f"{', '.join(inventory.groups) or '(none)'}; rollout {rollout.file}: OK")
    describe(inventory, rollout, hosts, release=True)
    print("hosts")
    for host in hosts:
        v = host.vars
        config = render_gateway_config(host)
        digest = hashlib.sha1(config.encode()).hexdigest()[:12]
        tunnel = "no tunnel" if v["mode"] == "nat64" else f"{v['mode']} local {v['local_ipv4']}"
        tunnel += f" relay {v['relay_ipv4']}" if v["relay_ipv4"] else ""
        tunnel += f" remote {v['remote_ipv4']} prefix {v['prefix']}" if v["remote_ipv4"] else ""
        if has_nat64(v):
            pool4 = ", ".join(row["address"] for row in v["nat64_pool4"] or ())
            tunnel += (f"; nat64 {v['nat64_prefix'] or WELL_KNOWN_PREFIX} pool4 "
                       f"{pool4 or '(none)'}")
        rules = ", ".join(f"{r['proto']} {r['port']}->{r['to']}" for r in host.forward)
        print(f"  {host.name}: ssh {v['ssh_user']}@{v['ssh']}:{v['ssh_port']}, {v['service']}, "
              f"root {v['install_root']}; {tunnel}; workers {v['workers'] or 'CPUs'}; "
              f"forward {rules or '(none)'}; ping {v['ping_target']}; config {digest}")
    with tempfile.TemporaryDirectory(prefix="sixgate-deploy-") as tmp:
        try:
            code = _workspace(Path(tmp), inventory, rollout).run(
                "site.yml", limit=args.limit, extra=("--syntax-check",), quiet=True)
        except AnsibleMissing as exc:
            print(f"ansible     not checked: {exc}")
            return EXIT_OK
    print(f"ansible     ansible-playbook --syntax-check: {'OK' if code == 0 else 'FAILED'}")
    if code == 0 and args.check:
        args.workdir = args.report_json = None
        print("check mode on the hosts:")
        return _run_and_report(args, "site.yml", need_release=True, describe_plan=False)
    return EXIT_OK if code == 0 else EXIT_RUNTIME


def _workspace(directory: Path, inventory: Inventory, rollout: Rollout) -> Workspace:
    from sixgate.deploy.emit import emit
    from sixgate.deploy.runner import Workspace
    emit(directory, inventory, rollout)
    return Workspace(directory)


def _run_and_report(args: argparse.Namespace, playbook: str, need_release: bool,
                    describe_plan: bool = True) -> int:
    from sixgate.deploy.rollout import batches
    from sixgate.deploy.runner import format_report
    inventory, rollout, hosts = load(args, need_release=need_release)
    if describe_plan:
        describe(inventory, rollout, hosts, release=need_release)
    keep = args.workdir is not None
    directory = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="sixgate-deploy-"))
    workspace = _workspace(directory, inventory, rollout)
    try:
        code = workspace.run(playbook, limit=args.limit, check=args.check,
                             batches=len(batches([h.name for h in hosts], rollout.serial)))
        report = workspace.report(args.limit)
    finally:
        workspace.close_connections()
    names = [h.name for h in hosts]
    print("check mode: nothing was changed; the hosts run:" if args.check else
          "the hosts run:")
    for line in format_report(report, names, rollout.version if need_release else None):
        print(line)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=1, sort_keys=True))
    if code != 0:
        print(f"sixgate deploy: ansible-playbook {playbook} exited {code}: the rollout stopped "
              f"(generated files kept in {directory})", file=sys.stderr)
        return EXIT_RUNTIME
    if not keep:
        shutil.rmtree(directory, ignore_errors=True)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    return _run_and_report(args, "site.yml", need_release=True)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _run_and_report(args, "rollback.yml", need_release=False)


def cmd_emit(args: argparse.Namespace) -> int:
    from sixgate.deploy.emit import emit
    inventory, rollout, _hosts = load(args)
    directory = Path(args.directory)
    written = emit(directory, inventory, rollout)
    print(f"wrote {directory}: {', '.join(written)}")
    print(f"run it: cd {directory} && ansible-playbook site.yml [--limit HOSTS] [--check]")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    from sixgate.deploy.build import BuildError, build
    try:
        wheel = build(Path(args.out), args.local_version, with_dependencies=not args.no_deps)
    except BuildError as exc:
        print(f"sixgate deploy build: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    wheels = sorted(p.name for p in Path(args.out).glob("*.whl"))
    print(f"built {wheel}")
    print(f"wheelhouse {args.out}: {len(wheels)} wheels ({', '.join(wheels)})")
    return EXIT_OK
