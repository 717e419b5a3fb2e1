"""Describe the machine a measurement was taken on.

Only the standard library is used, so the device-side runner can call it on an edge
board without torch. GPU facts come from ``nvidia-smi`` when it is on the PATH.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id(text: str | None = None) -> str:
    """The CPU's identity below its marketing name, from ``/proc/cpuinfo`` (or ``text``):
    x86 family/model/stepping and microcode, or the ARM implementer/part/revision. A virtual
    CPU often reports only "AMD EPYC" as its name; these numbers, and the L3 size, tell two
    generations apart (they cannot tell how busy the host is: see ``hwprune table check``)."""
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""

    def field(key: str) -> str | None:
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        return m.group(1).strip() if m else None

    x86 = [(k, field(k)) for k in ("cpu family", "model", "stepping", "microcode")]
    arm = [(k, field(k)) for k in ("CPU implementer", "CPU part", "CPU revision")]
    for keys in (x86, arm):
        if keys[0][1] is not None:
            return " ".join(f"{k.split()[-1]} {v}" for k, v in keys if v is not None)
    return ""


def l3_cache() -> str:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            m = re.search(r"^(flags|Features)\s*:\s*(.+)$", f.read(), re.M)
        if m:
            have = set(m.group(2).split())
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "neon",
                      "sve", "fp16", "asimddp", "i8mm", "bf16")
            return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpus() -> list[dict]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    result = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            result.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return result


def fingerprint() -> dict:
    """The facts that make two measurements comparable: same CPU, cores and GPU."""
    return {
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_l3": l3_cache(),
        "cpu_cores": cpu_count(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "system": platform.system(),
        "gpus": gpus(),
        "hostname": platform.node(),
        "python": platform.python_version(),
    }


#: Fingerprint fields that must agree for two tables to describe the same device. The vector
#: extensions are among them: two virtual CPUs that both report "AMD EPYC" ran one table's
#: kernels on AVX-512 and the other's on AVX2, at different speeds and with different
#: blocked-layout widths. (Fingerprints recorded without flags are not compared on them.)
DEVICE_IDENTITY = ("cpu_model", "cpu_cores", "cpu_flags", "machine", "gpus")


def machine_line(fp: dict) -> str:
    """A CPU as results name it: model, cpu id, cores and the vector extensions that set its
    kernels (two hosts that both report "AMD EPYC" can differ in all of them)."""
    flags = fp.get("cpu_flags")
    wide = [f for f in flags or [] if f.startswith(("avx512", "amx"))]
    ext = "vector extensions not recorded" if flags is None else ", ".join(wide) or "no AVX-512"
    cpu_id_ = f" ({fp['cpu_id']})" if fp.get("cpu_id") else ""
    return f"{fp.get('cpu_model')}{cpu_id_}, {fp.get('cpu_cores')} cores, {ext}"


def device_identity(fp: dict) -> dict:
    ident = {k: fp.get(k) for k in DEVICE_IDENTITY}
    ident["gpus"] = [g.get("name") for g in (fp.get("gpus") or [])]
    ident["cpu_flags"] = sorted(fp["cpu_flags"]) if fp.get("cpu_flags") is not None else None
    return ident
