"""A real Ray cluster for the tests: a head and more nodes on this machine, each `ray start --block` in its own
temp dir and process group, all on loopback, stopped by the process ids started here (never `ray stop`, which
would end every Ray process on the machine).

Each node's command blocks while the node lives, and Ray's processes share its fate (the kernel's parent-death
signal): killing that process group ends the node, which is also how a test loses a node mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTED_LINE = "Ray runtime started"
START_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_env() -> dict[str, str]:
    """The environment of every Ray command of the tests: token authentication, no usage reports."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated"), os.environ.get("PYTHONPATH", "")])}


@dataclass
class RayNode:
    """One `ray start --block` process (its own process group) and its temp dir."""

    process: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path

    def kill(self) -> None:
        """End the node at once: SIGKILL to its process group (Ray's processes die with it)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def pids(self) -> set[int]:
        """The node's live processes: its command and every descendant."""
        from tests.unit.test_lifeline import alive, descendants

        return {p for p in {self.process.pid, *descendants(self.process.pid)} if alive(p)}


@dataclass
class RayTestCluster:
    """A head node and added nodes; `address` is the head's GCS on loopback."""

    root: Path
    port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> RayNode:
        """The head node: GCS on `port`, no dashboard, Ray Client on a free loopback port."""
        return self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                            f"--ray-client-server-port={free_port()}"], num_cpus, resources)

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> RayNode:
        """Another node joining the head."""
        return self._start([f"--address={self.address}"], num_cpus, resources)

    def stop(self) -> None:
        """Kill every node started here, newest first, and remove their temp dirs."""
        for node in reversed(self.nodes):
            node.kill()
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def pids(self) -> set[int]:
        """Every live process of every node."""
        return set().union(*(node.pids() for node in self.nodes)) if self.nodes else set()

    def _start(self, args: list[str], num_cpus: int, resources: dict[str, float] | None) -> RayNode:
        # Short: Ray's socket paths under the temp dir must fit in sun_path.
        temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        log = self.root / f"ray-node-{len(self.nodes)}.log"
        command = [sys.executable, "-m", "tests.support.ray_node", "start", "--block", *args,
                   "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=ROOT, env=ray_env(), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = RayNode(process, temp_dir, log)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED_LINE not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        return node


def listening_sockets(pids: set[int]) -> tuple[list[str], list[str]]:
    """`ss -ltnpH` lines of sockets these processes listen on: (on loopback, anywhere else)."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    loopback, beyond = [], []
    for line in output.splitlines():
        owners = {int(item.split("=")[1].rstrip(",)")) for word in line.split() for item in word.split(",")
                  if item.startswith("pid=")}
        if not owners & pids:
            continue
        host = line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        (loopback if host.startswith("127.") or host == "::1" else beyond).append(line)
    return loopback, beyond
