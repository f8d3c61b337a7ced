"""CPU time of the processes of a Ray app this process started, by role, per engine iteration (bench.load --cpu)."""

from __future__ import annotations

from typing import Any

CPU_ROLES = ("TargetHost", "DrafterHost", "Router", "SpecPolicy")  # the table's CPU column, besides the total


class ProcessCpu:
    """CPU seconds of this process and its descendants (the Ray app it started: actors, proxy, GCS), by role.

    CPU time per iteration does not swing with the machine's load as wall time does, so it shows what a
    mode costs each process (e.g. the policy path at K = 0 against off) on a shared machine."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._roles: dict[int, str] = {}

    def snapshot(self) -> dict[int, float]:
        seconds: dict[int, float] = {}
        for process in [self._me, *self._me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                if process.pid not in self._roles:
                    self._roles[process.pid] = self._role(process)
            except self._psutil.Error:  # exited meanwhile
                continue
            seconds[process.pid] = times.user + times.system
        return seconds

    def per_iteration_ms(
        self, before: dict[int, float], after: dict[int, float], iterations: float
    ) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for pid, seconds in after.items():
            role = self._roles[pid]
            by_role[role] = by_role.get(role, 0.0) + (seconds - before.get(pid, 0.0)) * 1e3 / max(
                1.0, iterations
            )
        return dict(sorted(by_role.items(), key=lambda item: -item[1]))

    def _role(self, process: Any) -> str:
        if process.pid == self._me.pid:
            return "load generator"
        words = " ".join(process.cmdline()).split()
        if not words:
            return "other"
        if words[0].startswith("ray::"):  # an actor's title: ray::ServeReplica:app:Router[.method]
            return words[0][5:].split(".")[0].split(":")[-1]
        if words[0].endswith("haproxy"):  # Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY)
            return "HAProxy"
        for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "agent"):
            if any(known in word for word in words[:3]):
                return "Ray " + known.removesuffix(".py")
        return "other"
