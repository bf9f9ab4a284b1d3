"""Where a process runs and which one it is, for judging from another process whether it still lives (the
registry lease's holder, a run's owner)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def where() -> dict:
    """This process's address: host, boot and pid namespace (containers on the host network share its name,
    not its pids; VMs cloned from one image share a name and the root namespace's number, not a boot id)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        namespace = boot = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace, "boot": boot}


def started(pid: int | str) -> str:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names one
    process, where a pid alone may be reused; "" where it cannot be read (no such process, no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
