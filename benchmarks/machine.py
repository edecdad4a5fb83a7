"""Facts about the machine and checkout that every benchmark report records."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone


def machine_info() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else ""), "load_avg_1m": round(os.getloadavg()[0], 2)}


def cpu_vendor() -> str:
    """'intel', 'amd' or 'cpu': names per-CPU-kind benchmark reports (the two kinds of this project's machines)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                v = line.split(":", 1)[1].strip()
                return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(v, "cpu")
    except OSError:
        pass
    return "cpu"


def header(title: str, command: str, info: dict) -> str:
    return (f"# {title}\n\n- date: {info['date']}\n- machine: {info['cores']} cores, {info['cpu']}, "
            f"{info['memory_gib']} GiB RAM, Python {info['python']}\n- commit: {info['commit']}\n"
            f"- load average when started: {info['load_avg_1m']} (other work on the machine slows every number)\n"
            f"- command: `{command}`\n")
