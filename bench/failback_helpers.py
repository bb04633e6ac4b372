#!/usr/bin/env python3
"""Helpers for bench/failback.sh: deterministic disk content, block mutation, JSON
field extraction and the Markdown report. Standard library only.

  failback_helpers.py size 4GiB                      -> bytes
  failback_helpers.py gen FILE SIZE SEED             fill FILE (created/overwritten in place)
  failback_helpers.py mutate FILE PCT SEED [BLOCK]   change PCT% of BLOCK-sized blocks; prints changed bytes
  failback_helpers.py json PATH < doc.json           e.g. disks.0.path ; prints "" for a missing key
  failback_helpers.py report MEASUREMENTS_FILE       Markdown table + target checks on stdout
  failback_helpers.py splice-docs DOC RESULTS MARKER [SECTION]
        replace the block between <!-- MARKER --> and <!-- /MARKER --> in DOC with RESULTS;
        without the markers: append "## SECTION" holding them when SECTION is given, else fail
"""

import json
import os
import random
import re
import sys

BLOCK = 64 * 1024

UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise SystemExit(f"error: cannot parse size '{text}' (use e.g. 512MiB, 4GiB, 65536)")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


# ---------------------------------------------------------------------------
# content generator
# ---------------------------------------------------------------------------
WORDS = (
    "the of and to in is for on that with as by at from this be or are an it not "
    "kernel systemd journal block inode extent page cache write read sync flush "
    "nginx GET POST /api/v1/items 200 404 500 user session token request response "
    "INFO WARN ERROR DEBUG database table index row column commit rollback vacuum "
    "config yaml json true false null value key name id timestamp 2024-05-17T10:22:31Z"
).split()


def text_pool(rng: random.Random, n: int) -> list:
    """n text-like 64 KiB blocks (log lines / config files): compress ~3-5x with zstd."""
    pool = []
    for _ in range(n):
        parts = []
        size = 0
        while size < BLOCK:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
            line = f"{rng.randint(0, 10**9):010d} {line}\n"
            parts.append(line)
            size += len(line)
        pool.append("".join(parts).encode()[:BLOCK])
    return pool


def gen(path: str, size: int, seed: int) -> None:
    """Deterministic 'realistic' disk: runs of random (incompressible) blocks, text-like
    blocks (compressible, each made unique so content-addressing cannot dedup them),
    and zero blocks (holes). Roughly 55% random, 30% text, 15% zero by block count.
    The file is written in full (no sparse regions), overwriting in place."""
    if size % BLOCK:
        raise SystemExit(f"error: size {size} is not a multiple of {BLOCK}")
    rng = random.Random(seed)
    pool = text_pool(rng, 64)
    zero = bytes(BLOCK)
    nblocks = size // BLOCK
    counts = {"random": 0, "text": 0, "zero": 0}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        buf = []
        i = 0
        while i < nblocks:
            r = rng.random()
            kind = "random" if r < 0.55 else ("text" if r < 0.85 else "zero")
            run = min(rng.randint(1, 256), nblocks - i)
            for _ in range(run):
                if kind == "random":
                    buf.append(rng.randbytes(BLOCK))
                elif kind == "text":
                    b = bytearray(rng.choice(pool))
                    b[:24] = f"@block {i:016d}\n".encode()
                    buf.append(bytes(b))
                else:
                    buf.append(zero)
                counts[kind] += 1
                i += 1
                if len(buf) == 64:  # 4 MiB writes
                    os.write(fd, b"".join(buf))
                    buf.clear()
        if buf:
            os.write(fd, b"".join(buf))
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    total = max(nblocks, 1)
    print(
        f"generated {path}: {nblocks} blocks, "
        + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in counts.items()),
        file=sys.stderr,
    )


def mutate(path: str, pct: float, seed: int, block: int = BLOCK) -> int:
    """Overwrite pct% of the file's block-aligned blocks (distinct, chosen at random)
    with fresh random data, in place. Returns the number of bytes changed."""
    size = os.path.getsize(path)
    nblocks = size // block
    n = max(1, round(nblocks * pct / 100.0))
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(nblocks), n))
    fd = os.open(path, os.O_WRONLY)
    try:
        for idx in picks:
            os.pwrite(fd, rng.randbytes(block), idx * block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return n * block


def json_get(path: str) -> str:
    doc = json.load(sys.stdin)
    cur = doc
    for part in path.split("."):
        if part == "":
            continue
        if isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                return ""
        elif isinstance(cur, dict):
            if part not in cur:
                return ""
            cur = cur[part]
        else:
            return ""
    if cur is None:
        return ""
    if isinstance(cur, (dict, list)):
        return json.dumps(cur)
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def load_runs(path: str) -> dict:
    """Every value recorded under each key of a KEY=VALUE file, in order."""
    runs = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                runs.setdefault(k, []).append(v)
    return runs


def load(path: str) -> dict:
    """The last value recorded under each key."""
    return {k: v[-1] for k, v in load_runs(path).items()}


def num(m, key):
    v = m.get(key, "")
    try:
        return float(v)
    except ValueError:
        return None


def fmt_bytes(b):
    if b is None:
        return "–"
    b = float(b)
    if b >= 1024**3:
        return f"{b / 1024**3:.2f} GiB"
    if b >= 1024**2:
        return f"{b / 1024**2:.1f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{int(b)} B"


def fmt_rss(kib):
    return "–" if kib is None else f"{kib / 1024:.0f} MiB"


def fmt_s(s):
    return "–" if s is None else f"{s:.2f}"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "PASS" if ok else "FAIL"


def report(path: str) -> str:
    m = load(path)
    out = []
    size = num(m, "size_bytes")
    mode = m.get("mode", "full")
    out.append(f"### Failback benchmark — {m.get('size_label', '?')} disk ({mode})")
    out.append("")
    out.append(
        f"- when: {m.get('date', '?')}; machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('mem', '?')} RAM; kernel {m.get('kernel', '?')}; filesystem {m.get('fstype', '?')}"
    )
    out.append(
        f"- ferry: {m.get('ferry_version', '–')}; peers: {m.get('rsync_version', '?')}, "
        f"{m.get('b3sum_version', '?')}, {m.get('cp_version', '?')}"
    )
    out.append(
        f"- disk: {fmt_bytes(size)} in {int(size // BLOCK) if size else '?'} blocks of 64 KiB "
        f"(~55% random, ~30% text-like, ~15% zero); "
        f"{m.get('change_pct', '1')}% of blocks changed = {fmt_bytes(num(m, 'changed_bytes'))}"
    )
    out.append(
        f"- page cache warm for every run; wall-clock seconds; peers: median of REPEAT={m.get('repeat', '1')} runs, "
        f"ferry: one run per mode; peak RSS from GNU time (b3sum's includes its mmap of both files); "
        f"load average at start {m.get('loadavg', '?')}"
    )
    if num(m, "protect_s") is not None:
        out.append(
            f"- other ferry steps (not targets): protect (initial full replication) {fmt_s(num(m, 'protect_s'))} s, "
            f"planned failover {fmt_s(num(m, 'failover_s'))} s"
        )
    out.append("")

    fd = num(m, "ferry_delta_s")
    rs = num(m, "rsync_s")
    b3 = num(m, "b3sum_s")
    changed = num(m, "changed_bytes")

    out.append("#### Delta failback (1% of blocks changed, full scan)")
    out.append("")
    out.append("| tool | seconds | time ÷ ferry delta | bytes moved | peak RSS |")
    out.append("|---|---:|---:|---:|---:|")
    ref = fd
    if fd is not None:
        moved = (
            f"{fmt_bytes(num(m, 'ferry_delta_transferred'))} transferred, "
            f"{fmt_bytes(num(m, 'ferry_delta_written'))} written, "
            f"{fmt_bytes(num(m, 'ferry_delta_read'))} read"
        )
        out.append(
            f"| `ferry failback --sync delta --auto-complete` | {fmt_s(fd)} | 1.00× | {moved} | "
            f"{fmt_rss(num(m, 'ferry_delta_rss'))} |"
        )
    if rs is not None:
        out.append(
            f"| `rsync --inplace --no-whole-file` | {fmt_s(rs)} | {fmt_ratio(rs, ref)} | "
            f"{fmt_bytes(num(m, 'rsync_literal'))} literal | {fmt_rss(num(m, 'rsync_rss'))} |"
        )
    if b3 is not None:
        out.append(
            f"| `b3sum` both disks (hashing floor) | {fmt_s(b3)} | {fmt_ratio(b3, ref)} | 0 | "
            f"{fmt_rss(num(m, 'b3sum_rss'))} |"
        )
    out.append("")
    if m.get("rsync_identical"):
        out.append(f"rsync result bit-identical to the source: {m['rsync_identical']}.")
        out.append("")
    if fd is None and rs is not None and b3 is not None:
        out.append(f"Peers only: rsync takes {rs / b3:.2f}× the b3sum time here.")
        out.append("")
    if m.get("ferry_delta_downtime_ms"):
        out.append(f"Phase 2 downtime (delta): {m['ferry_delta_downtime_ms']} ms.")
        out.append("")

    ff = num(m, "ferry_full_s")
    cp = num(m, "cp_s")
    cps = num(m, "cpsync_s")
    if ff is not None or cp is not None:
        out.append("#### Full download")
        out.append("")
        out.append("| tool | seconds | throughput | time ÷ ferry full | bytes moved | peak RSS |")
        out.append("|---|---:|---:|---:|---:|---:|")

        def tput(s):
            return "–" if (s is None or not size) else f"{size / s / 1024**2:.0f} MiB/s"

        if ff is not None:
            moved = (
                f"{fmt_bytes(num(m, 'ferry_full_transferred'))} transferred, "
                f"{fmt_bytes(num(m, 'ferry_full_written'))} written"
            )
            out.append(
                f"| `ferry failback --sync full --auto-complete` | {fmt_s(ff)} | {tput(ff)} | 1.00× | "
                f"{moved} | {fmt_rss(num(m, 'ferry_full_rss'))} |"
            )
        if cp is not None:
            out.append(
                f"| `cp` | {fmt_s(cp)} | {tput(cp)} | {fmt_ratio(cp, ff)} | {fmt_bytes(size)} | "
                f"{fmt_rss(num(m, 'cp_rss'))} |"
            )
        if cps is not None:
            out.append(
                f"| `cp` + `sync FILE` (durable, for context) | {fmt_s(cps)} | {tput(cps)} | "
                f"{fmt_ratio(cps, ff)} | {fmt_bytes(size)} | – |"
            )
        out.append("")
        if m.get("ferry_full_downtime_ms"):
            out.append(f"Downtime (full): {m['ferry_full_downtime_ms']} ms.")
            out.append("")

    rss_big = num(m, "ferry_delta_rss")
    rss_small = num(m, "mem_ferry_delta_rss")
    if rss_small is not None:
        out.append("#### Memory: ferry delta failback peak RSS by disk size")
        out.append("")
        out.append("| disk | seconds | peak RSS |")
        out.append("|---|---:|---:|")
        out.append(
            f"| {m.get('mem_size_label', '?')} | {fmt_s(num(m, 'mem_ferry_delta_s'))} | {fmt_rss(rss_small)} |"
        )
        out.append(f"| {m.get('size_label', '?')} | {fmt_s(fd)} | {fmt_rss(rss_big)} |")
        out.append("")

    # targets (DESIGN.md §7)
    out.append("#### Targets (DESIGN.md §7)")
    out.append("")
    out.append("| target | measured | result |")
    out.append("|---|---|---|")
    rows = []
    if fd is not None:
        rows.append((
            "delta ≥ 2× faster than rsync",
            "–" if rs is None else f"rsync ÷ ferry = {rs / fd:.2f}×",
            None if rs is None else rs / fd >= 2.0,
        ))
        rows.append((
            "delta ≤ 1.3× b3sum time (both disks)",
            "–" if b3 is None else f"ferry ÷ b3sum = {fd / b3:.2f}×",
            None if b3 is None else fd / b3 <= 1.3,
        ))
        tr = num(m, "ferry_delta_transferred")
        wr = num(m, "ferry_delta_written")
        if changed and tr is not None and wr is not None:
            moved = max(tr, wr)
            rows.append((
                "delta bytes moved ≤ 1.1× changed bytes",
                f"max(transferred, written) ÷ changed = {moved / changed:.3f}×",
                moved <= 1.1 * changed,
            ))
        else:
            rows.append(("delta bytes moved ≤ 1.1× changed bytes", "counters missing", None))
        if m.get("ferry_delta_identical"):
            rows.append((
                "delta: primary disk bit-identical to recovery disk",
                m["ferry_delta_identical"],
                m["ferry_delta_identical"] == "yes",
            ))
    if ff is not None:
        rows.append((
            "full download ≥ 80% of cp throughput",
            "–" if cp is None else f"ferry ÷ cp throughput = {100 * cp / ff:.0f}%",
            None if cp is None else cp / ff >= 0.8,
        ))
        if m.get("ferry_full_identical"):
            rows.append((
                "full: primary disk bit-identical to recovery disk",
                m["ferry_full_identical"],
                m["ferry_full_identical"] == "yes",
            ))
    if rss_small is not None and rss_big is not None:
        # "independent of disk size": allow 25% or 16 MiB of noise, whichever is larger
        limit = max(rss_small * 1.25, rss_small + 16 * 1024)
        rows.append((
            f"peak RSS independent of disk size ({m.get('size_label')} ≤ max(1.25×, +16 MiB) of "
            f"{m.get('mem_size_label')})",
            f"{fmt_rss(rss_big)} vs {fmt_rss(rss_small)}",
            rss_big <= limit,
        ))
    if not rows:
        rows.append(("(ferry not run: peers only)", "–", None))
    for name, meas, ok in rows:
        out.append(f"| {name} | {meas} | {verdict(ok)} |")
    out.append("")
    return "\n".join(out)


def splice_docs(doc: str, results: str, marker: str, section: str = "") -> None:
    text = open(doc).read()
    body = open(results).read().rstrip("\n")
    block = f"<!-- {marker} -->\n{body}\n<!-- /{marker} -->"
    pattern = f"<!-- {re.escape(marker)} -->.*?<!-- /{re.escape(marker)} -->"
    new, n = re.subn(pattern, lambda _: block, text, flags=re.S)
    if n == 0 and section:
        new = text.rstrip("\n") + f"\n\n## {section}\n\n" + block + "\n"
    elif n != 1:
        sys.exit(f"error: {doc} has {n} <!-- {marker} --> ... <!-- /{marker} --> blocks, expected one")
    open(doc, "w").write(new)
    print(f"updated {doc}", file=sys.stderr)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "size":
        print(parse_size(argv[2]))
    elif cmd == "gen":
        gen(argv[2], parse_size(argv[3]), int(argv[4]))
    elif cmd == "mutate":
        block = parse_size(argv[5]) if len(argv) > 5 else BLOCK
        print(mutate(argv[2], float(argv[3]), int(argv[4]), block))
    elif cmd == "json":
        print(json_get(argv[2]))
    elif cmd == "report":
        print(report(argv[2]))
    elif cmd == "splice-docs" and len(argv) in (5, 6):
        splice_docs(argv[2], argv[3], argv[4], argv[5] if len(argv) == 6 else "")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
