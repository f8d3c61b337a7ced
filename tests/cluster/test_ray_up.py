"""`ray up` for real: a one-node copy of cluster/ray-up/on-prem-cpu.yaml over SSH on localhost, the CPU demo
deployed with the README's commands on a head that already holds a Ray token, a completion from the `openai`
client, then `ray down`, leaving no Ray process behind.

    pytest -m slow -s tests/cluster/test_ray_up.py      (-s prints the time of each step; about 10 minutes)

Needs root (it starts its own sshd on 127.0.0.1:22), `unshare`, sshd and rsync (installed with apt-get where
missing), Python 3.11 on the system's default PATH, and a pip configuration that finds the CPU build of torch;
skipped elsewhere, with the reason. Isolation from other Ray instances on the machine:
- sshd runs in its own PID and mount namespaces: `ray stop` and `ray start` over ssh see only that namespace,
  and ending the namespace ends every process the cluster started;
- the ssh user (root) gets a throwaway home (bind-mounted over /root: ~/.ray, ~/.bashrc and the environment of
  the machine stay untouched) and a private /tmp (Ray's /tmp/ray/ray_current_cluster would otherwise make
  other processes' `ray.init()` join this cluster);
- the copy moves Ray's fixed ports (GCS, dashboard, client server, agent) and Serve's HTTP port to free ones,
  and pins the node to 2 logical CPUs, the smallest machine the demo is offered for.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import REPO_ROOT
from tests.cluster.serving_app import free_port

CLUSTER_FILE = REPO_ROOT / "cluster" / "ray-up" / "on-prem-cpu.yaml"
SERVE_CONFIG = REPO_ROOT / "cluster" / "configs" / "demo-cpu.yaml"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's default PATH
RAY = Path(sys.executable).parent / "ray"  # the `ray` of this environment: the version setup pins
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray's colours
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "ray-dashboard", "monitor.py", "dashboard")

SSHD_CONFIG = """\
Port 22
ListenAddress 127.0.0.1
HostKey {work}/host_key
PidFile {work}/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
"""

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]  # new PID and mount namespaces
# Inside them: private mounts, the throwaway home and /tmp, then sshd as the namespace's PID 1.
NAMESPACE_INIT = """\
set -e
mount --make-rprivate /
mount --bind {work}/home /root
mount --bind {work}/tmp /tmp
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -f {work}/sshd_config
"""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def missing_requirement() -> str | None:
    """Why this machine cannot run the test, or None; installs sshd and rsync where apt-get can."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux: it starts its own sshd in new PID and mount namespaces"
    if shutil.which("unshare") is None:
        return "needs `unshare` (util-linux)"
    if shutil.which("python3.11", path=NODE_PATH) is None:
        return "the node needs python3.11 on the default PATH of an ssh login"
    if shutil.which("sshd", path=NODE_PATH) is None or shutil.which("rsync") is None:
        if shutil.which("apt-get") is None:
            return "needs sshd and rsync (no apt-get to install them)"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        installed = subprocess.run(
            ["apt-get", "install", "-y", "-q", "openssh-server", "rsync"], env=env, capture_output=True
        )
        if installed.returncode != 0:
            return f"could not install openssh-server and rsync: {installed.stderr.decode()[-300:]}"
    if not port_is_free(22):
        return "something already listens on 127.0.0.1:22 (this test starts its own sshd there)"
    return None


@dataclass
class Node:
    """The localhost node: sshd in its own namespaces, the ssh user's throwaway home, the client's home."""

    work: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def key(self) -> Path:
        return self.work / "key"

    @property
    def home(self) -> Path:  # /root inside the namespace
        return self.work / "home"

    @property
    def client_home(self) -> Path:  # HOME of the `ray` commands run here (the user's machine)
        return self.work / "client-home"

    def ssh(self, command: str) -> str:
        options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        options += ["-o", "LogLevel=ERROR", "-o", "BatchMode=yes"]
        done = subprocess.run(
            ["ssh", "-i", str(self.key), *options, "root@127.0.0.1", command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"ssh {command!r}: {done.stderr}"
        return done.stdout

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process in the node's PID namespace."""
        lines = self.ssh("ps -eo pid=,args=").splitlines()
        return [(int(pid), args) for pid, _, args in (line.strip().partition(" ") for line in lines)]


def make_node(work: Path) -> Node:
    node = Node(work)
    for folder in (node.home / ".ssh", work / "tmp", node.client_home):
        folder.mkdir(parents=True)
    (work / "tmp").chmod(0o1777)
    node.home.chmod(0o700)
    for name in (".bashrc", ".profile"):  # what a new account gets
        if (Path("/etc/skel") / name).exists():
            shutil.copy(Path("/etc/skel") / name, node.home / name)
    # This machine's pip configuration (where it finds packages, the CPU torch build among them).
    for config in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
        if config.exists():
            (node.home / config.parent.relative_to(Path.home())).mkdir(parents=True, exist_ok=True)
            shutil.copy(config, node.home / config.relative_to(Path.home()))
    for key in (node.key, work / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(node.key.with_suffix(".pub"), node.home / ".ssh" / "authorized_keys")
    (work / "sshd_config").write_text(SSHD_CONFIG.format(work=work))
    (work / "init.sh").write_text(NAMESPACE_INIT.format(work=work))
    return node


@pytest.fixture
def localhost_node() -> Iterator[Node]:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    node = make_node(Path(tempfile.mkdtemp(prefix="moespec-ray-up-", dir="/var/tmp")))  # not under /tmp
    with open(node.work / "sshd.log", "wb") as log:
        node.process = subprocess.Popen(
            [*UNSHARE, "bash", str(node.work / "init.sh")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while port_is_free(22):
            assert node.process.poll() is None, (node.work / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not start listening within 15 s"
            time.sleep(0.1)
        yield node
    finally:
        node.process.kill()  # (unshare ignores SIGTERM) --kill-child: sshd, the namespace's PID 1, dies
        node.process.wait(timeout=30)
        shutil.rmtree(node.work, ignore_errors=True)


@dataclass
class Steps:
    """The time of each step, printed as it ends."""

    times: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.times.append((name, time.monotonic() - start))
        print(f"[ray up test] {name}: {self.times[-1][1]:.1f} s", flush=True)

    def table(self) -> str:
        return "\n".join(f"  {seconds:7.1f} s  {name}" for name, seconds in self.times)


def localhost_copy(node: Node, name: str, ports: dict[str, int]) -> Path:
    """The cluster file for this machine: the three fields its comments say to change, free ports, 2 CPUs."""
    config: dict[str, Any] = yaml.safe_load(CLUSTER_FILE.read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(node.key)}
    flags = " ".join(f"--{flag}={port}" for flag, port in ports.items() if flag != "port")
    flags += " --num-cpus=2 --object-store-memory=300000000"
    old = "--port=6379"
    assert any(old in command for command in config["head_start_ray_commands"])
    config["head_start_ray_commands"] = [
        command.replace(old, f"--port={ports['port']} {flags}")
        for command in config["head_start_ray_commands"]
    ]
    path = node.work / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ray(node: Node, *args: str, timeout: float = 300, check: bool = True) -> str:
    """A `ray` command run here, as the user runs it: from the repository root, with the user's home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["HOME"] = str(node.client_home)
    done = subprocess.run(
        [str(RAY), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = f"$ ray {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    with open(node.work / "ray.log", "a") as file:
        file.write(log)
    assert done.returncode == 0 or not check, log[-4000:]
    return ANSI_ESCAPE.sub("", done.stdout)


def serve_status(output: str) -> dict[str, Any]:
    """The YAML that `serve status` prints, from the output of `ray exec` (ssh adds a line of its own)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("proxies:", "applications:")))
    status = yaml.safe_load("\n".join(line for line in lines[start:] if not line.startswith("Shared ")))
    assert isinstance(status, dict), output
    return status


def wait_running(node: Node, cluster: Path, app_name: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve_status(ray(node, "exec", str(cluster), "serve status"))["applications"].get(app_name, {})
        deployments = app.get("deployments", {})
        if app.get("status") == "RUNNING" and all(d["status"] == "HEALTHY" for d in deployments.values()):
            return dict(app)
        assert app.get("status") != "DEPLOY_FAILED", app
        assert time.monotonic() < deadline, f"not RUNNING within {timeout_s:.0f} s: {app}"
        time.sleep(5)


def ray_processes(node: Node) -> list[str]:
    return [args for _, args in node.processes() if any(name in args for name in RAY_PROCESSES)]


def forget_cluster(name: str) -> None:
    """Removes what `ray up` keeps about the cluster on this side: the local provider's state, the config
    cache, the ssh control sockets' folder."""
    tmp = Path(tempfile.gettempdir())
    paths = [*Path("/tmp/ray").glob(f"cluster-{name}.*"), *tmp.glob("ray_ssh_*/" + sha256(name)[:10])]
    paths += [path for path in tmp.glob("ray-config-*") if f'"cluster_name": "{name}"' in path.read_text()]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_ray_up_serves_the_cpu_demo_on_localhost(localhost_node: Node) -> None:
    import openai

    node, steps = localhost_node, Steps()
    with steps.step("sshd isolated: its namespace holds only sshd and this ssh session"):
        processes = node.processes()
        assert processes[0][0] == 1 and "sshd" in processes[0][1], processes
        assert all(args.split()[0].endswith(("sshd", "sshd:", "bash", "ps")) for _, args in processes), (
            processes
        )
    with steps.step("tokens: a stale one on the head (as a local ray.init() leaves it), the user's own"):
        stale = secrets.token_hex(32)
        node.ssh(f"mkdir -p ~/.ray && printf %s {stale} > ~/.ray/auth_token")
        ray(node, "get-auth-token", "--generate")  # the user's own token, which the cluster file mounts
        token = (node.client_home / ".ray" / "auth_token").read_text().strip()

    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port")}
    ports["dashboard-agent-listen-port"] = free_port()
    name = f"moespec-ray-up-test-{os.getpid()}"
    cluster = localhost_copy(node, name, ports)
    # `serve` finds the dashboard on its default port unless told (the copy moved it).
    with open(node.home / ".bashrc", "a") as bashrc:
        bashrc.write(f"export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:{ports['dashboard-port']}\n")
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    serve_config["http_options"]["port"] = http_port = free_port()
    (node.work / "demo-cpu.yaml").write_text(yaml.safe_dump(serve_config, sort_keys=False))
    app_args = serve_config["applications"][0]

    succeeded = False
    try:
        with steps.step("ray up -y (setup: venv, CPU torch, the project)"):
            up = ray(node, "up", "-y", str(cluster), timeout=1500)
        assert "cannot modify limit" not in up  # the ulimit of the start commands stays quiet
        torch_version = ray(node, "exec", str(cluster), "python -c 'import torch; print(torch.__version__)'")
        assert "+cpu" in torch_version, torch_version
        with steps.step("serve deploy (the demo config, its HTTP port moved)"):
            ray(node, "rsync-up", str(cluster), str(node.work / "demo-cpu.yaml"), "~/demo-cpu.yaml")
            ray(node, "exec", str(cluster), "serve deploy ~/demo-cpu.yaml")
        with steps.step("serve status until RUNNING, every deployment HEALTHY"):
            app = wait_running(node, cluster, app_args["name"], timeout_s=300)
        print(yaml.safe_dump({app_args["name"]: app}, sort_keys=False), flush=True)
        on_head = ray(node, "exec", str(cluster), "cat ~/.ray/auth_token")
        assert token in on_head and stale not in on_head  # the cluster's token replaced the stale one

        with steps.step("completion from the openai client"):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none")
            completion = client.completions.create(
                model=app_args["args"]["model"]["served_name"],
                prompt="def fibonacci(n):",
                max_tokens=48,
                temperature=0,
            )
        text = completion.choices[0].text
        print(f"[ray up test] completion: {text!r}", flush=True)
        assert text.strip() and completion.usage is not None and completion.usage.completion_tokens > 0
        succeeded = True
    finally:  # after a failure too (the fixture's end of the namespace is the last resort)
        with steps.step("ray down -y"):
            ray(node, "down", "-y", str(cluster), check=succeeded)
        forget_cluster(name)
        print("[ray up test] steps:\n" + steps.table(), flush=True)
    assert ray_processes(node) == [], node.processes()
