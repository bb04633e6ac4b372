#!/usr/bin/env python3
"""Helpers for bench/qemu.sh: QMP (guest writes through QEMU, ferry's tracking bitmaps),
disk content, monotonic timing and the Markdown report. Standard library only; sizes, JSON
field extraction and number formatting come from bench/failback_helpers.py.

  qemu_helpers.py fill RAW SIZE SEED                 RAW := SIZE bytes of incompressible data
  qemu_helpers.py guest-write QMP DEVICE SIZE PCT SEED SCRATCH
        the running guest overwrites PCT% of the disk's 64 KiB blocks (distinct, at random
        offsets chosen with SEED, each with fresh random bytes) with `qemu-io write -s` through
        QMP `human-monitor-command`; prints the number of bytes written
  qemu_helpers.py bitmaps QMP NODE                   names of ferry's bitmaps (ferry-*) on NODE, one a line
  qemu_helpers.py remove-bitmaps QMP NODE            removes them from the running VM; prints the names
  qemu_helpers.py image-bitmaps IMAGE                ferry's bitmaps in a stopped qcow2 image (qemu-img info)
  qemu_helpers.py timed OUTFILE CMD...               runs CMD (stdout to OUTFILE, stderr inherited) and
                                                     prints "SECONDS CPU_SECONDS" (monotonic clock;
                                                     user + system CPU of CMD and its reaped children);
                                                     exits with CMD's status
  qemu_helpers.py evict FILE...                      drops FILEs' (clean) pages from the page cache
                                                     (posix_fadvise DONTNEED; sync first)
  qemu_helpers.py notes < job.json                   the job's notes, joined with " | "
  qemu_helpers.py steps < job.json                   "step=elapsed_ms;..." (steps that report a time)
  qemu_helpers.py json PATH < doc.json               a field, as in failback_helpers.py
  qemu_helpers.py report MEASUREMENTS_FILE           Markdown report + target checks on stdout
"""

import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from failback_helpers import (  # noqa: E402  (after the path set-up)
    BLOCK,
    fmt_bytes,
    json_get,
    load_runs,
    num,
    parse_size,
    verdict,
)

PREFIX = "ferry-"
QMP_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# QMP
# ---------------------------------------------------------------------------
class QmpError(Exception):
    pass


class Qmp:
    """A minimal QMP client: one connection, synchronous commands, events skipped."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(QMP_TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError as e:
            raise QmpError(f"cannot connect to the QMP socket {path}: {e} (is the VM running?)")
        self.buf = b""
        greeting = self._message()
        if "QMP" not in greeting:
            raise QmpError(f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _message(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the QMP connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if not line.strip():
            return self._message()
        return json.loads(line)

    def execute(self, command: str, arguments=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._message()
            if "event" in reply:
                continue
            if "error" in reply:
                e = reply["error"]
                raise QmpError(f"QMP {command}: {e.get('class', '?')}: {e.get('desc', e)}")
            if "return" in reply:
                return reply["return"]
            raise QmpError(f"QMP {command}: unexpected reply {reply}")

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line})


def guest_write(qmp_path: str, device: str, size: int, pct: float, seed: int, scratch: str) -> int:
    """Overwrite pct% of the disk's 64 KiB blocks through the running guest's virtio device."""
    nblocks = size // BLOCK
    n = max(1, round(nblocks * pct / 100.0))
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(nblocks), n))
    # QEMU opens the source files itself (from its own working folder): absolute paths.
    scratch = os.path.abspath(scratch)
    os.makedirs(scratch, exist_ok=True)
    # A few source files, rewritten with fresh bytes before each use, so every block differs.
    files = [os.path.join(scratch, f"block{i}.bin") for i in range(4)]
    # qemu-io prints its results (and its errors, e.g. an unreadable source file) on QEMU's
    # stdout, not on the monitor: ferry's qemu driver keeps that in qemu.log next to qmp.sock.
    # Count the "wrote" lines the writes add there to know that every one landed.
    log = os.path.join(os.path.dirname(os.path.abspath(qmp_path)), "qemu.log")
    log_start = os.path.getsize(log) if os.path.exists(log) else None
    with Qmp(qmp_path) as q:
        for i, idx in enumerate(picks):
            src = files[i % len(files)]
            with open(src, "wb") as f:
                f.write(rng.randbytes(BLOCK))
            cmd = f'qemu-io -d {device}/virtio-backend "write -s {src} {idx * BLOCK} 64k"'
            out = q.hmp(cmd)
            if out != "":
                raise QmpError(f"guest write at block {idx} ({cmd}) failed: {out.strip()}")
        # Make the writes durable in the image the way a guest's flush would.
        out = q.hmp(f'qemu-io -d {device}/virtio-backend "flush"')
        if out != "":
            raise QmpError(f"guest flush failed: {out.strip()}")
    for src in files:
        if os.path.exists(src):
            os.unlink(src)
    if log_start is None:
        print(f"warning: no {log}: cannot confirm that the guest writes landed", file=sys.stderr)
    else:
        with open(log, "rb") as f:
            f.seek(log_start)
            text = f.read().decode(errors="replace")
        wrote = {int(o) for o in re.findall(r"^wrote 65536/65536 bytes at offset (\d+)$", text, re.M)}
        lost = [idx for idx in picks if idx * BLOCK not in wrote]
        if lost:
            errors = [l for l in text.splitlines() if l and not l.startswith(("wrote ", "64 KiB, "))]
            raise QmpError(
                f"{len(lost)} of {n} guest writes did not land (QEMU's output in {log}: "
                f"{' / '.join(errors[:3]) or 'no wrote line'})"
            )
    return n * BLOCK


def node_bitmaps(qmp_path: str, node: str) -> list:
    with Qmp(qmp_path) as q:
        nodes = q.execute("query-named-block-nodes", {"flat": True})
    names = []
    found = False
    for n in nodes:
        if n.get("node-name") != node:
            continue
        found = True
        for b in n.get("dirty-bitmaps", []) or []:
            name = b.get("name", "")
            if name.startswith(PREFIX) and name not in names:
                names.append(name)
    if not found:
        raise QmpError(f"{qmp_path}: no block node named {node!r}")
    return names


def remove_bitmaps(qmp_path: str, node: str) -> list:
    names = node_bitmaps(qmp_path, node)
    with Qmp(qmp_path) as q:
        for name in names:
            q.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    return names


def image_bitmaps(image: str) -> list:
    p = subprocess.run(["qemu-img", "info", "--output=json", "-U", image], capture_output=True, text=True)
    if p.returncode != 0:
        raise QmpError(f"qemu-img info {image} failed: {p.stderr.strip()}")
    info = json.loads(p.stdout)
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", []) or []
    return [b["name"] for b in bitmaps if b.get("name", "").startswith(PREFIX)]


# ---------------------------------------------------------------------------
# disk content, timing
# ---------------------------------------------------------------------------
def fill(path: str, size: int, seed: int) -> None:
    """SIZE bytes of incompressible (seeded pseudo-random) data, written in 4 MiB chunks."""
    if size % BLOCK:
        raise SystemExit(f"error: size {size} is not a multiple of {BLOCK}")
    rng = random.Random(seed)
    chunk = 4 << 20
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n


def evict(paths: list) -> None:
    """Drops the files' pages from the page cache (they must be clean: sync first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(outfile: str, cmd: list) -> int:
    with open(outfile, "wb") as out:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=out)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.monotonic()
    p.returncode = os.waitstatus_to_exitcode(status)
    print(f"{t1 - t0:.3f} {ru.ru_utime + ru.ru_stime:.2f}")
    return p.returncode if p.returncode >= 0 else 128 - p.returncode


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def fmt_s(s):
    return "–" if s is None else f"{s:.2f}"


def fmt_ms(v):
    return "–" if v is None else f"{v:.0f}"


def pct_of(a, b):
    if a is None or not b:
        return "–"
    return f"{100 * a / b:.2f}%"


def load_medians(path: str) -> tuple:
    """(values, runs): each key's median when every value recorded under it is a number (one
    per round), else its value when all agree, else all of them joined with " / "; and every
    key's list of values."""
    runs = load_runs(path)
    m = {}
    for k, vs in runs.items():
        try:
            nums = [float(v) for v in vs]
        except ValueError:
            m[k] = vs[-1] if len(set(vs)) == 1 else " / ".join(vs)
            continue
        m[k] = vs[-1] if len(vs) == 1 else repr(statistics.median(nums))
    return m, runs


def report(path: str) -> str:
    m, runs = load_medians(path)
    size = num(m, "size_bytes")
    out = []
    out.append(f"### Change-tracked failback on QEMU — {m.get('size_label', '?')} disk")
    out.append("")
    out.append(f"- command: `{m.get('command', '?')}`")
    out.append(
        f"- when: {m.get('date', '?')}; machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('mem', '?')} RAM; kernel {m.get('kernel', '?')}; filesystem {m.get('fstype', '?')}; "
        f"load average at start {m.get('loadavg', '?')}"
    )
    out.append(
        f"- ferry: {m.get('ferry_version', '?')}; {m.get('qemu_version', '?')} "
        f"(accel {m.get('accel', '?')}); {m.get('rsync_version', '?')}"
    )
    out.append(
        f"- disk: one qcow2 disk of {fmt_bytes(size)} filled with incompressible data "
        f"({int(size // BLOCK) if size else '?'} blocks of 64 KiB); each round, the running recovery "
        f"guest overwrites {m.get('change_pct', '?')}% of the blocks "
        f"(= {fmt_bytes(num(m, 'tracked_changed'))}) at random offsets through QEMU "
        f"(QMP `human-monitor-command` + `qemu-io write`)"
    )
    out.append(
        f"- page cache: {m.get('cache', 'warm')} before every timed run"
        + {
            "cold": " (both disk images evicted with posix_fadvise DONTNEED; programs stay cached)",
            "drop": " (dropped with /proc/sys/vm/drop_caches, programs too)",
        }.get(m.get("cache"), " (both files read once)")
    )
    out.append(
        f"- wall-clock seconds (monotonic clock); each ferry mode ran {m.get('rounds', '1')} time(s) "
        "(its own failover and guest writes each time, the two modes alternating which goes first): "
        "the table shows medians; phase 1 = `ferry failback db` "
        "(recovery VM running), phase 2 = `ferry complete db` (recovery VM stopped, last changes, "
        "primary started); bytes read = the job's `bytes_read` over both phases"
    )
    out.append(
        f"- not timed: protect (initial full replication) {fmt_s(num(m, 'protect_s'))} s, "
        f"planned failover {fmt_s(num(m, 'failovert1_s'))} s"
    )
    out.append("")

    tt = num(m, "tracked_total_s")
    st = num(m, "scan_total_s")
    rs = num(m, "rsync_s")
    out.append("| run | phase 1 (s) | phase 2 (s) | total (s) | bytes read | read ÷ disk size | downtime (ms) | bit-identical |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for key, label in (
        ("tracked", "ferry failback, change-tracked (dirty bitmaps)"),
        ("scan", "ferry failback, hash scan (bitmaps removed)"),
    ):
        if num(m, f"{key}_total_s") is None:
            continue
        read = num(m, f"{key}_read")
        out.append(
            f"| {label} | {fmt_s(num(m, f'{key}_p1_s'))} | {fmt_s(num(m, f'{key}_p2_s'))} | "
            f"{fmt_s(num(m, f'{key}_total_s'))} | {fmt_bytes(read)} | {pct_of(read, size)} | "
            f"{fmt_ms(num(m, f'{key}_downtime_ms'))} | {m.get(f'{key}_identical', '–')} |"
        )
    for key, label in (("tracked", "change-tracked"), ("scan", "hash scan")):
        every = runs.get(f"{key}_total_s", [])
        if len(every) > 1:
            out.append(f"| (every round: {label}) | | | {' '.join(every)} | | | | |")
    if rs is not None:
        runs_rs = m.get("rsync_runs", "")
        note = f" (median of {m.get('repeat', '1')}: {runs_rs} s)" if runs_rs and int(m.get("repeat", "1")) > 1 else ""
        out.append(
            f"| `rsync --inplace --no-whole-file` recovery qcow2 → copy of primary qcow2 (VMs stopped){note} | – | – | "
            f"{fmt_s(rs)} | all of both files | ≈ 200% | – | "
            f"{m.get('rsync_identical', '–')} |"
        )
    out.append("")
    details = []
    for key, label in (("tracked", "tracked"), ("scan", "hash scan")):
        r1, r = num(m, f"{key}_read_p1"), num(m, f"{key}_read")
        if r1 is not None and r is not None:
            details.append(
                f"{label}: phase 1 read {fmt_bytes(r1)}, phase 2 {fmt_bytes(r - r1)} "
                f"(final delta written by the guest between the phases: "
                f"{fmt_bytes(num(m, f'{key}_final_delta'))}); "
                f"{fmt_bytes(num(m, f'{key}_written'))} written to the primary disk "
                f"({fmt_bytes(num(m, f'{key}_changed'))} changed by the guest)"
            )
    if num(m, "rsync_literal") is not None:
        details.append(
            f"rsync: {fmt_bytes(num(m, 'rsync_literal'))} of literal data "
            f"for {fmt_bytes(num(m, 'rsync_changed'))} changed by the guest: the two qcow2 files place "
            f"clusters differently (ferry restored the recovery disk in its own order) and `--inplace` "
            f"cannot reuse basis data it has already overwritten"
        )
    if details:
        out.append("Bytes: " + "; ".join(details) + ".")
        out.append("")
    steps = []
    for key, label in (("tracked", "tracked"), ("scan", "hash scan")):
        text = (runs.get(f"{key}_steps") or [""])[-1].strip()
        if text:
            parts = [p.rsplit("=", 1) for p in text.split(";") if "=" in p]
            steps.append(f"{label}: " + ", ".join(f"{name} {ms} ms" for name, ms in parts))
    if steps:
        out.append("Job steps (`ferry job show`, wall time, the last round): " + "; ".join(steps) + ".")
        out.append("")
        sync_ms = {}
        for key in ("tracked", "scan"):
            text = (runs.get(f"{key}_steps") or [""])[-1].strip()
            parts = [p.rsplit("=", 1) for p in text.split(";") if "=" in p]
            vals = [float(ms) for name, ms in parts if "sync" in name or "prepare" in name]
            if vals:
                sync_ms[key] = sum(vals)
        if "tracked" in sync_ms and sync_ms.get("scan"):
            out.append(
                f"Data steps only (prepare + both syncs, without VM stop/start and process start-up): "
                f"tracked {sync_ms['tracked']:.0f} ms, hash scan {sync_ms['scan']:.0f} ms = "
                f"{100 * sync_ms['tracked'] / sync_ms['scan']:.1f}%."
            )
            out.append("")
    for key, label in (("tracked", "Change-tracked"), ("scan", "Hash-scan")):
        note = (runs.get(f"{key}_notes") or [""])[-1]
        if note:
            out.append(f"{label} run (the last round), ferry's job note: “{note}”")
            out.append("")
    cpu_bits = []
    for key, label in (("tracked", "tracked"), ("scan", "hash scan")):
        c1, c2 = num(m, f"{key}_p1_cpu"), num(m, f"{key}_p2_cpu")
        if c1 is not None and c2 is not None:
            cpu_bits.append(f"{label} {c1:.2f} + {c2:.2f} s")
    if num(m, "rsync_cpu") is not None:
        cpu_bits.append(f"rsync {num(m, 'rsync_cpu'):.2f} s")
    if cpu_bits:
        out.append("CPU time (user + system, phase 1 + phase 2): " + "; ".join(cpu_bits) + ".")
        out.append("")

    out.append("| target | measured | result |")
    out.append("|---|---|---|")
    rows = []
    rows.append((
        "tracked total ≤ 5% of hash-scan total",
        "–" if tt is None or not st else f"tracked ÷ scan = {100 * tt / st:.1f}%",
        None if tt is None or not st else tt / st <= 0.05,
    ))
    rows.append((
        "rsync ≥ 20× tracked total",
        "–" if tt is None or rs is None or not tt else f"rsync ÷ tracked = {rs / tt:.1f}×",
        None if tt is None or rs is None or not tt else rs / tt >= 20,
    ))
    tr = num(m, "tracked_read")
    rows.append((
        "tracked bytes read ≤ 2% of the disk",
        "–" if tr is None or not size else f"{fmt_bytes(tr)} = {100 * tr / size:.2f}%",
        None if tr is None or not size else tr / size <= 0.02,
    ))
    dt = num(m, "tracked_downtime_ms")
    rows.append((
        f"phase 2 downtime < 3 s (tracked, {fmt_bytes(num(m, 'tracked_final_delta'))} final delta)",
        "–" if dt is None else f"{dt:.0f} ms",
        None if dt is None else dt < 3000,
    ))
    for key, label in (("tracked", "tracked"), ("scan", "hash scan")):
        ident = m.get(f"{key}_identical")
        if ident:
            rows.append((f"{label}: primary disk bit-identical to the recovery disk", ident, ident == "yes"))
    for name, meas, ok in rows:
        out.append(f"| {name} | {meas} | {verdict(ok)} |")
    out.append("")
    return "\n".join(out)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    try:
        if cmd == "fill" and len(args) == 3:
            fill(args[0], parse_size(args[1]), int(args[2]))
        elif cmd == "guest-write" and len(args) == 6:
            print(guest_write(args[0], args[1], parse_size(args[2]), float(args[3]), int(args[4]), args[5]))
        elif cmd == "bitmaps" and len(args) == 2:
            print("\n".join(node_bitmaps(args[0], args[1])))
        elif cmd == "remove-bitmaps" and len(args) == 2:
            print("\n".join(remove_bitmaps(args[0], args[1])))
        elif cmd == "image-bitmaps" and len(args) == 1:
            print("\n".join(image_bitmaps(args[0])))
        elif cmd == "timed" and len(args) >= 2:
            return timed(args[0], args[1:])
        elif cmd == "evict" and args:
            evict(args)
        elif cmd == "notes" and not args:
            print(" | ".join(json.load(sys.stdin).get("notes") or []))
        elif cmd == "steps" and not args:
            steps = json.load(sys.stdin).get("steps") or []
            print(";".join(f"{s['name']}={s['elapsed_ms']}" for s in steps if s.get("elapsed_ms") is not None))
        elif cmd == "json" and len(args) == 1:
            print(json_get(args[0]))
        elif cmd == "report" and len(args) == 1:
            print(report(args[0]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (QmpError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
