"""Ansible stdout callback of ``sixgate deploy``: progress per batch and host, and the report.

Prints one line when a batch starts (its hosts) and one per host for each step that matters
(release installed, config checked, switched, restarted, /readyz, ICMPv6 echo, rolled back,
failed with the reason), then a recap. Results of the task named "sixgate report" (the report
playbook) are written as JSON to ``$SIXGATE_DEPLOY_REPORT``; ``$SIXGATE_DEPLOY_BATCHES`` (the
batch count ``sixgate deploy`` computed) makes the batch lines read "batch 2/3"; with
``$SIXGATE_DEPLOY_CHECK`` (check mode) changes are said as "would ..."; ``$SIXGATE_DEPLOY_TIMING``
prints every task's start time (monotonic seconds), to see where a rollout spends its time.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: sixgate_progress
    type: stdout
    short_description: progress of a sixgate rollout, per batch and host
    description:
      - One line per batch and per host step of the sixgate role; failures with their reason.
      - Writes the "sixgate report" results as JSON to $SIXGATE_DEPLOY_REPORT when set.
"""

# The name of site.yml's first play ends so (deploy/emit.py STAGED_PLAY).
STAGED_PLAY = "staged on every host"

# (task name prefix, said when changed, said when ok, said when it would change in check mode);
# {stdout} is the task's own words.
STEPS: tuple[tuple[str, str, str, str], ...] = (
    ("sixgate | release ", "installed {version} in its own virtualenv",
     "{version} already installed", "would install {version} in its own virtualenv"),
    ("sixgate | config rendered", "config rendered: it differs from the last one", "",
     "would render a config that differs from the last one"),
    ("sixgate | config checked", "", "config accepted by `sixgate check` of the release", ""),
    ("sixgate | switch to release ", "{stdout}", "release and config unchanged", ""),
    ("sixgate | service ", "gateway {state}", "", ""),
    ("sixgate | systemd unit ", "gateway {state} (systemd)", "", ""),
    ("sixgate | /readyz", "", "/readyz answers 200", ""),
    ("sixgate | ICMPv6 echo", "", "ICMPv6 echo answered through the gateway", ""),
    ("sixgate | back to the previous", "{stdout}", "", ""),
)


def _parts(result: Any) -> tuple[str, str, dict[str, Any]]:
    """(host name, task name without its "role : " prefix, result dict), ansible-core 2.15+."""
    if hasattr(result, "task"):
        host, task, data = result.host, result.task, result.result
    else:
        host, task, data = result._host, result._task, result._result
    return host.get_name(), task.get_name().split(" : ", 1)[-1], dict(data)


class CallbackModule(CallbackBase):  # type: ignore[misc]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "sixgate_progress"

    def __init__(self) -> None:
        super().__init__()
        self.batch = 0
        self.batch_announced = 0
        self.batches = os.environ.get("SIXGATE_DEPLOY_BATCHES", "")
        self.report: dict[str, dict[str, Any]] = {}
        self.width = 10

    def say(self, text: str, color: str | None = None) -> None:
        self._display.display(text, color=color)

    def host_line(self, host: str, text: str, color: str | None = None) -> None:
        self.width = max(self.width, len(host))
        self.say(f"  {host:<{self.width}}  {text}", color)

    # -- plays and batches

    def v2_playbook_on_play_start(self, play: Any) -> None:
        if play.get_name().endswith(STAGED_PLAY):
            self.say("stage: the release installed on every host before the first batch",
                     "bright blue")
            return
        self.batch += 1

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        if os.environ.get("SIXGATE_DEPLOY_TIMING"):
            import time
            self.say(f"{time.monotonic():.2f} task {task.get_name()}")

    def v2_playbook_on_no_hosts_matched(self) -> None:
        self.say("no hosts matched", "red")

    # -- results

    def v2_runner_on_ok(self, result: Any) -> None:
        host, task, data = _parts(result)
        facts = data.get("ansible_facts", {})
        if task == "sixgate | batch" and self.batch_announced < self.batch:
            self.batch_announced = self.batch
            total = f"/{self.batches}" if self.batches else ""
            hosts = ", ".join(facts.get("sixgate_batch", [host]))
            self.say(f"batch {self.batch}{total}: {hosts}", "bright blue")
        elif task == "sixgate report":
            self.report[host] = dict(facts.get("sixgate_report", {}))
        else:
            self.step(host, task, data)

    def step(self, host: str, task: str, data: dict[str, Any]) -> None:
        check_mode = bool(os.environ.get("SIXGATE_DEPLOY_CHECK"))
        for prefix, when_changed, when_ok, would in STEPS:
            if task.startswith(prefix):
                words = task[len(prefix):].split()
                fields = {"version": words[0] if words else "",
                          "state": words[-1] if words else "",
                          "stdout": str(data.get("stdout", "")).strip()}
                changed = bool(data.get("changed"))
                text = (would if check_mode else when_changed) if changed else when_ok
                if text:
                    self.host_line(host, text.format(**fields), "yellow" if changed else "green")
                return

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        host, task, data = _parts(result)
        if ignore_errors:
            return
        reason = data.get("stderr") or data.get("msg") or ""
        text = str(reason).strip().splitlines()
        detail = " | ".join(text[-3:])[:400]
        if task == "sixgate | result":
            self.host_line(host, f"FAILED: {detail}", "red")
        else:
            self.host_line(host, f"{task.removeprefix('sixgate | ')}: failed: {detail}", "red")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        host, _task, data = _parts(result)
        self.host_line(host, f"UNREACHABLE: {str(data.get('msg', '')).strip()[:400]}", "red")
        self.report.setdefault(host, {"unreachable": str(data.get("msg", "")).strip()})

    def v2_runner_retry(self, result: Any) -> None:
        host, task, data = _parts(result)
        attempt, retries = data.get("attempts", 0), data.get("retries", 0)
        if attempt == 1 or attempt % 10 == 0:
            self.host_line(host, f"waiting: {task.removeprefix('sixgate | ')} "
                           f"(try {attempt}/{retries})")

    # -- the end

    def v2_playbook_on_stats(self, stats: Any) -> None:
        hosts = sorted(stats.processed.keys())
        if hosts and not self.report:
            self.say("recap:")
            for host in hosts:
                s = stats.summarize(host)
                state = "FAILED" if s["failures"] or s["unreachable"] else "ok"
                self.host_line(host, f"{state} (changed {s['changed']}, failed "
                               f"{s['failures']}, unreachable {s['unreachable']}, rescued "
                               f"{s.get('rescued', 0)})", "red" if state != "ok" else None)
        path = os.environ.get("SIXGATE_DEPLOY_REPORT")
        if path:
            with open(path, "w", encoding="utf-8") as out:
                json.dump(self.report, out, indent=1, sort_keys=True)
