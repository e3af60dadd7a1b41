"""A cluster of N hosts on this machine: network namespaces on a bridge, each host with its own sshd.

    with Cluster(2) as cluster:                 # hosts h1, h2 at 198.18.0.11, 198.18.0.12
        cluster.run("h1", ["hostname"])         # -> "h1"
        cluster.popen("h1", [hvdclip_run, "-np", "4", "-H", "h1:2,h2:2", *cluster.ssh_flags(), ...])

Layout (root only; nothing touches the root namespace's network):

- a "switch" namespace holds a bridge; each host's veth pair is created inside the switch and its
  peer is moved straight into the host's namespace as `eth0`;
- addresses only inside the namespaces, from 198.18.0.0/24 (benchmarking range, RFC 2544); no default
  route, so nothing can leave;
- each host runs `sshd -D` on port 2222 with a configuration, host key and authorized key of its own
  under a temporary directory (never /etc/ssh or ~/.ssh), `UsePAM no`, `StrictModes no`;
- every command on a host runs as `ip netns exec H unshare --uts -- sh -c 'hostname H; mount --bind
  HOSTS /etc/hosts; exec "$@"'`: `ip netns exec` gives it a mount namespace of its own, so the bind
  mount and the host name stay inside.

`down()` (also on leaving the `with`) kills every process in the namespaces, deletes them, and
removes the directory: it leaves nothing behind, even after a failed `up()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["Cluster", "ClusterError", "SSH_PORT", "require_root_tools"]

SSH_PORT = 2222
SUBNET = "198.18.0"
TOOLS = ("/usr/sbin/sshd", "ssh", "ssh-keygen", "ip", "unshare", "tc")
# On each host, before the command: its name, and the cluster's hosts file over /etc/hosts.
_ON_HOST = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


class ClusterError(RuntimeError):
    """The cluster could not be built (the message says which step and why)."""


def require_root_tools() -> str | None:
    """None when this process can build a cluster, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: run tests/cluster/install_cluster_tools.sh"
    return None


def _run(argv: list[str], timeout: float = 30) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if result.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class Cluster:
    """N hosts h1..hN; see the module docstring. Not thread-safe; one `up()`/`down()` per object."""

    def __init__(self, hosts: int = 2) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"`hosts` must be between 1 and 200. Received: hosts={hosts}")
        tag = uuid.uuid4().hex[:6]
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.address = {host: f"{SUBNET}.{10 + i}" for i, host in enumerate(self.hosts, start=1)}
        self._netns = {host: f"hvdclip-{tag}-{host}" for host in self.hosts}
        self._switch = f"hvdclip-{tag}-sw"
        self.dir = Path(tempfile.mkdtemp(prefix=f"hvdclip-cluster-{tag}-"))
        self.identity = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.hosts_file = self.dir / "hosts"
        self._sshd: dict[str, subprocess.Popen] = {}
        self._created: list[str] = []

    # ------------------------------------------------------------------ up and down

    def __enter__(self) -> Cluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self, ready_timeout_s: float = 30) -> None:
        self._network()
        self._keys()
        for host in self.hosts:
            self._start_sshd(host)
        deadline = time.monotonic() + ready_timeout_s
        for host in self.hosts:
            self._wait_for_ssh(host, deadline, ready_timeout_s)

    def _network(self) -> None:
        sw = self._switch
        _run(["ip", "netns", "add", sw])
        self._created.append(sw)
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for host in self.hosts:
            ns = self._netns[host]
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", sw, "link", "add", f"{host}p", "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", sw, "link", "set", f"{host}p", "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        lines = ["127.0.0.1 localhost"] + [f"{self.address[h]} {h}" for h in self.hosts]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def _keys(self) -> None:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hvdclip-cluster", "-f", str(self.identity)])
        (self.dir / "authorized_keys").write_text(Path(f"{self.identity}.pub").read_text())
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hvdclip-cluster-host", "-f", str(self.dir / "host_key")])
        host_key = (self.dir / "host_key.pub").read_text().split()[:2]
        names = ",".join(f"[{n}]:{SSH_PORT}" for h in self.hosts for n in (h, self.address[h]))
        self.known_hosts.write_text(f"{names} {' '.join(host_key)}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory

    def _start_sshd(self, host: str) -> None:
        config = self.dir / f"sshd_{host}.conf"
        config.write_text(
            "\n".join(
                [
                    f"Port {SSH_PORT}",
                    f"ListenAddress {self.address[host]}",
                    f"HostKey {self.dir / 'host_key'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    f"PidFile {self.dir / f'sshd_{host}.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PrintMotd no",
                    "AcceptEnv *",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "",
                ]
            )
        )
        log = open(self.dir / f"sshd_{host}.log", "w")
        self._sshd[host] = subprocess.Popen(
            self.on_host(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def _wait_for_ssh(self, host: str, deadline: float, timeout_s: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            if self._sshd[host].poll() is not None:
                raise ClusterError(f"sshd on {host} exited: {self.log(host)[-2000:]}")
            probe = subprocess.run(
                self.on_host(self.hosts[0], ["ssh", *self.ssh_args(), "-o", "ConnectTimeout=2", host, "true"]),
                capture_output=True, text=True, timeout=timeout_s,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            last = probe.stderr.strip()
            time.sleep(0.2)
        raise ClusterError(f"ssh to {host} did not work within the {timeout_s:g} s ready bound: {last}\n{self.log(host)[-2000:]}")

    def log(self, host: str) -> str:
        path = self.dir / f"sshd_{host}.log"
        return path.read_text() if path.exists() else ""

    def pids(self, host: str) -> list[int]:
        """Every process in the host's network namespace (its sshd too)."""
        ns = self._netns[host]
        result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
        return [int(pid) for pid in result.stdout.split()]

    def job_pids(self, host: str) -> list[int]:
        """The host's processes other than its sshd daemon: a job's ranks, daemons and ssh sessions."""
        sshd = self._sshd.get(host)
        return [pid for pid in self.pids(host) if sshd is None or pid != sshd.pid]

    def down(self) -> None:
        for proc in self._sshd.values():
            if proc.poll() is None:
                proc.terminate()
        for ns in self._created:
            if ns == self._switch:
                continue
            host = next(h for h, name in self._netns.items() if name == ns)
            for _ in range(50):  # bounded: a process in uninterruptible sleep may take a moment
                pids = self.pids(host)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        for proc in self._sshd.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()
        self._sshd.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ using it

    def netns(self, host: str) -> str:
        return self._netns[host]

    def on_host(self, host: str, argv: list[str]) -> list[str]:
        """`argv` as a command that runs on `host` (its network, name and hosts file)."""
        return ["ip", "netns", "exec", self._netns[host], "unshare", "--uts", "--", "sh", "-c", _ON_HOST, "sh",
                host, str(self.hosts_file), *argv]  # fmt: skip

    def run(self, host: str, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.on_host(host, argv), capture_output=True, text=True, timeout=timeout, **kwargs)

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.on_host(host, argv), **kwargs)

    def ssh_args(self) -> list[str]:
        """ssh's arguments for logging in to a host of this cluster (for the fixture's own checks)."""
        return ["-p", str(SSH_PORT), "-i", str(self.identity), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]  # fmt: skip

    def ssh_flags(self, interface: bool = True) -> list[str]:
        """The `hvdclip-run` flags that reach this cluster's hosts.

        `interface=False` leaves out `--network-interface eth0`, which horovodrun refuses for a job on
        one host (it then looks for the interface holding 127.0.0.1).
        """
        flags = ["--ssh-port", str(SSH_PORT), "--ssh-identity-file", str(self.identity),
                 "--ssh-option", f"UserKnownHostsFile={self.known_hosts}"]  # fmt: skip
        return flags + (["--network-interface", "eth0"] if interface else [])

    def ssh_clients(self, host: str) -> list[list[str]]:
        """The argument vectors of the ssh clients running on `host`, found by their executable (a
        wrapper script would not be one)."""
        ssh = os.path.realpath(shutil.which("ssh") or "ssh")
        found = []
        for pid in self.pids(host):
            try:
                if os.readlink(f"/proc/{pid}/exe") == ssh:
                    found.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1])
            except OSError:
                continue  # it ended meanwhile
        return found

    def missing_ssh_settings(self, argv: list[str], options: dict[str, str]) -> list[tuple[str, str]]:
        """What an ssh client's `argv` lacks of `ssh_flags()`' port, key and known-hosts file and of
        `options` (`-o KEY=VALUE`), as (flag, value) pairs; [] when it has them all."""
        wanted = [("-p", str(SSH_PORT)), ("-i", str(self.identity)), ("-o", f"UserKnownHostsFile={self.known_hosts}")]
        wanted += [("-o", f"{key}={value}") for key, value in options.items()]
        pairs = set(zip(argv, argv[1:]))
        return [pair for pair in wanted if pair not in pairs]

    def link(self, host: str, up: bool) -> None:
        """Cuts (or restores) `host`'s cable at the switch."""
        _run(["ip", "-n", self._switch, "link", "set", f"{host}p", "up" if up else "down"])

    def limit_rate(self, host: str, rate: str) -> None:
        """Shapes `host`'s outgoing traffic to `rate` (e.g. "1gbit") with a token bucket."""
        _run(["ip", "netns", "exec", self._netns[host], "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
              "rate", rate, "burst", "1mb", "latency", "50ms"])  # fmt: skip
