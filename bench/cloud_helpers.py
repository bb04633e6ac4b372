#!/usr/bin/env python3
"""Helpers for bench/cloud.sh: incompressible disk content, the plain Azure Blob client
(put/get of the same bytes in fixed-size objects), stored-object sizes and the Markdown report.

The `plain`, `stored` and `clear` commands need `azure-storage-blob` (cloud.sh installs it
into a venv under bench/out); everything else is standard library only.

  cloud_helpers.py rand FILE SIZE SEED
        fill FILE with SIZE deterministic random (incompressible) bytes, fsync
  cloud_helpers.py plain ENDPOINT CONTAINER FILE OBJ_SIZE THREADS [PREFIX [SERVER_PID]]
        upload FILE in OBJ_SIZE objects with THREADS parallel workers (one Put Blob per object),
        then download them all (one GET per object, data discarded after a length check), then
        download them all again into a new file next to FILE (each object written at its offset,
        then one fsync: what a restore must do before a VM may start from it, like ferry's);
        prints put_s=, get_s=, getfile_s=, objects=, bytes= (seconds measured inside Python,
        after imports), put_cpu=, get_cpu=, getfile_cpu= (this process's CPU seconds) and, given
        the server's PID, put_server_cpu=, get_server_cpu=, getfile_server_cpu=
  cloud_helpers.py stored ENDPOINT CONTAINER PREFIX     -> bytes=, objects= of blobs under PREFIX
  cloud_helpers.py clear ENDPOINT CONTAINER             delete the container (ignore if missing)
  cloud_helpers.py report MEASUREMENTS_FILE             Markdown report on stdout

ENDPOINT is Azurite's blob URL, e.g. http://127.0.0.1:10471 (the well-known dev account is used).
"""

import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing the sibling module
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from failback_helpers import fmt_bytes, fmt_rss, load, load_runs, num, parse_size, verdict  # noqa: E402

# Azurite's well-known development account (public, documented by Microsoft).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MiB = 1024 * 1024


def rand(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    step = 4 * MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = min(step, left)
            os.write(fd, rng.randbytes(n))
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"generated {path}: {size} random bytes (incompressible)", file=sys.stderr)


# ---------------------------------------------------------------------------
# plain client
# ---------------------------------------------------------------------------
def conn_str(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint={endpoint}/{DEV_ACCOUNT};"
    )


def service(endpoint: str):
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(conn_str(endpoint))


def proc_cpu(pid):
    """User + system CPU seconds of process pid (all its threads), or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain(endpoint: str, container: str, path: str, obj: int, threads: int, prefix: str,
          server_pid: int = 0) -> None:
    size = os.path.getsize(path)
    offsets = list(range(0, size, obj))
    svc = service(endpoint)
    cc = svc.get_container_client(container)
    try:
        cc.create_container()
    except Exception as e:  # ResourceExistsError
        if "ContainerAlreadyExists" not in str(e):
            raise
    # One client (and so one HTTP connection pool) per worker thread.
    local = threading.local()

    def client():
        c = getattr(local, "cc", None)
        if c is None:
            c = service(endpoint).get_container_client(container)
            local.cc = c
        return c

    fd = os.open(path, os.O_RDONLY)

    def name(off):
        return f"{prefix}obj-{off // obj:06d}"

    def put(off):
        n = min(obj, size - off)
        data = os.pread(fd, n, off)
        # 16 MiB < max_single_put_size (64 MiB): one Put Blob request per object.
        client().upload_blob(name(off), data, overwrite=True, max_concurrency=1)
        return n

    def get(off):
        n = min(obj, size - off)
        # 16 MiB < max_single_get_size (32 MiB): one GET per object.
        data = client().download_blob(name(off), max_concurrency=1).readall()
        if len(data) != n:
            raise SystemExit(f"error: {name(off)}: got {len(data)} bytes, expected {n}")
        return n

    out_path = path + ".plain-get"
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def getfile(off):
        n = min(obj, size - off)
        data = client().download_blob(name(off), max_concurrency=1).readall()
        if len(data) != n:
            raise SystemExit(f"error: {name(off)}: got {len(data)} bytes, expected {n}")
        os.pwrite(out_fd, data, off)
        return n

    try:
        with ThreadPoolExecutor(max_workers=threads, initializer=client) as ex:
            s0, c0, t0 = proc_cpu(server_pid), time.process_time(), time.perf_counter()
            put_bytes = sum(ex.map(put, offsets))
            s1, c1, t1 = proc_cpu(server_pid), time.process_time(), time.perf_counter()
            get_bytes = sum(ex.map(get, offsets))
            s2, c2, t2 = proc_cpu(server_pid), time.process_time(), time.perf_counter()
            os.ftruncate(out_fd, size)
            file_bytes = sum(ex.map(getfile, offsets))
            os.fsync(out_fd)
            s3, c3, t3 = proc_cpu(server_pid), time.process_time(), time.perf_counter()
    finally:
        os.close(fd)
        os.close(out_fd)
        os.unlink(out_path)
    assert put_bytes == get_bytes == file_bytes == size
    for off in offsets:
        cc.delete_blob(name(off))
    print(f"put_s={t1 - t0:.3f}")
    print(f"get_s={t2 - t1:.3f}")
    print(f"getfile_s={t3 - t2:.3f}")
    print(f"put_cpu={c1 - c0:.2f}")
    print(f"get_cpu={c2 - c1:.2f}")
    print(f"getfile_cpu={c3 - c2:.2f}")
    if s0 is not None and s2 is not None:
        print(f"put_server_cpu={s1 - s0:.2f}")
        print(f"get_server_cpu={s2 - s1:.2f}")
        print(f"getfile_server_cpu={s3 - s2:.2f}")
    print(f"objects={len(offsets)}")
    print(f"bytes={size}")


def stored(endpoint: str, container: str, prefix: str) -> None:
    cc = service(endpoint).get_container_client(container)
    total = count = 0
    for b in cc.list_blobs(name_starts_with=prefix):
        total += b.size
        count += 1
    print(f"bytes={total}")
    print(f"objects={count}")


def clear(endpoint: str, container: str) -> None:
    try:
        service(endpoint).get_container_client(container).delete_container()
    except Exception as e:  # ResourceNotFoundError
        if "ContainerNotFound" not in str(e):
            raise


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def mibs(nbytes, s):
    if nbytes is None or not s:
        return None
    return nbytes / s / MiB


def fmt_mibs(v):
    return "–" if v is None else f"{v:.0f} MiB/s"


def fmt_s(s):
    return "–" if s is None else f"{s:.2f}"


def fmt_cpu(s):
    return "–" if s is None else f"{s:.2f} s"


def median_of(m, key):
    vals = [float(v) for v in m.get(key, "").split() if v]
    return statistics.median(vals) if vals else None


DATASETS = {
    "mixed": "mixed (~55% random, ~30% text-like, ~15% zero blocks)",
    "random": "random (incompressible)",
}


def med(runs, key):
    """The median of the numbers recorded under key (one per round), or None."""
    vals = []
    for v in runs.get(key, []):
        try:
            vals.append(float(v))
        except ValueError:
            pass
    return statistics.median(vals) if vals else None


def fmt_runs(runs, key):
    vals = [v for v in runs.get(key, []) if v]
    return " ".join(f"{float(v):.2f}" for v in vals) if len(vals) > 1 else "–"


def report(path: str) -> str:
    m = load(path)
    runs = load_runs(path)
    size = num(m, "size_bytes")
    threads = m.get("plain_threads", "1 8").split()
    datasets = [d for d in m.get("datasets", "mixed random").split() if d in DATASETS]
    out = []
    out.append(f"### Cloud stores and encryption — {m.get('size_label', '?')} disk")
    out.append("")
    out.append(
        f"- when: {m.get('date', '?')}; measured: {m.get('ferry_version', '?')}; machine: {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, {m.get('mem', '?')} RAM; kernel {m.get('kernel', '?')}; "
        f"filesystem {m.get('fstype', '?')}; load average at start {m.get('loadavg', '?')}, "
        f"at end {m.get('loadavg_end', '?')}"
    )
    out.append(
        f"- server: Azurite {m.get('azurite_version', '?')} (in-memory, 127.0.0.1, its own port); "
        f"plain client: Python {m.get('python_version', '?')} azure-storage-blob "
        f"{m.get('sdk_version', '?')}, {fmt_bytes(num(m, 'obj_bytes'))} objects (one Put Blob / one GET "
        f"each), {' and '.join(threads)} threads; ferry: `--threads` {m.get('ferry_threads', '?')} "
        f"(its default: one per core); {m.get('az_repeat', '1')} rounds through Azurite, each "
        f"contender (ferry's protect + restore, the plain client at each thread count) on its own "
        f"fresh Azurite, who goes first alternating; the table shows medians and every round's seconds"
    )
    out.append(
        "- throughput: *effective* = disk size ÷ seconds; *wire* = bytes that crossed the HTTP "
        "connection ÷ seconds (ferry protect: `bytes_transferred` of its job; ferry restore: the pack "
        "bytes stored in the container, which the restore reads back; plain client: the object bytes); "
        "CPU = user + system seconds used during the step by the client (ferry's process, or the Python "
        "client's) and by the Azurite server process"
    )
    out.append("")

    out.append("#### Through Azurite: ferry vs a plain client on the same server and the same bytes")
    out.append("")
    out.append(
        "| data | what | seconds (median) | wire bytes | effective | wire | client CPU | Azurite CPU | "
        "peak RSS | every round (s) |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    targets = []
    for d in datasets:
        p = f"az_{d}_"
        ps, fs = med(runs, p + "protect_s"), med(runs, p + "restore_s")
        pt, stored_b = med(runs, p + "protect_transferred"), med(runs, p + "stored_pack_bytes")
        if ps is None and fs is None:
            continue
        out.append(
            f"| {d} | ferry `protect` → az:// | {fmt_s(ps)} | {fmt_bytes(pt)} | "
            f"{fmt_mibs(mibs(size, ps))} | {fmt_mibs(mibs(pt, ps))} | {fmt_cpu(med(runs, p + 'protect_cpu'))} | "
            f"{fmt_cpu(med(runs, p + 'protect_server_cpu'))} | {fmt_rss(med(runs, p + 'protect_rss'))} | "
            f"{fmt_runs(runs, p + 'protect_s')} |"
        )
        out.append(
            f"| {d} | ferry `failover --unplanned` (restore) | {fmt_s(fs)} | {fmt_bytes(stored_b)} | "
            f"{fmt_mibs(mibs(size, fs))} | {fmt_mibs(mibs(stored_b, fs))} | {fmt_cpu(med(runs, p + 'restore_cpu'))} | "
            f"{fmt_cpu(med(runs, p + 'restore_server_cpu'))} | {fmt_rss(med(runs, p + 'restore_rss'))} | "
            f"{fmt_runs(runs, p + 'restore_s')} |"
        )
        best_put = best_get = best_file = None
        labels = {"put": "put", "get": "get (data discarded)", "getfile": "get → file + fsync"}
        for t in threads:
            b = med(runs, f"{p}plain{t}_bytes")
            for op in ("put", "get", "getfile"):
                s = med(runs, f"{p}plain{t}_{op}_s")
                v = mibs(b, s)
                if s is None:
                    continue
                out.append(
                    f"| {d} | plain {labels[op]}, {t} thread{'s' if t != '1' else ''} | {fmt_s(s)} | {fmt_bytes(b)} | "
                    f"{fmt_mibs(v)} | {fmt_mibs(v)} | {fmt_cpu(med(runs, f'{p}plain{t}_{op}_cpu'))} | "
                    f"{fmt_cpu(med(runs, f'{p}plain{t}_{op}_server_cpu'))} | – | "
                    f"{fmt_runs(runs, f'{p}plain{t}_{op}_s')} |"
                )
                if v is not None:
                    if op == "put" and (best_put is None or v > best_put[0]):
                        best_put = (v, t)
                    if op == "get" and (best_get is None or v > best_get[0]):
                        best_get = (v, t)
                    if op == "getfile" and (best_file is None or v > best_file[0]):
                        best_file = (v, t)
        # The target compares moving the same disk: ferry's disk bytes per second against the
        # plain client's (which sends the disk's bytes as they are). On incompressible data the two
        # sides put the same bytes on the wire; on compressible data ferry sends fewer, and its
        # wire rate (shown for context) also pays for the compression on the shared cores.
        fe, re_ = mibs(size, ps), mibs(size, fs)
        fw, rw = mibs(pt, ps), mibs(stored_b, fs)
        if fe is not None and best_put:
            targets.append((
                f"replication through Azurite ≥ 80% of the plain client's put ({d})",
                f"ferry {fe:.0f} MiB/s of disk ÷ plain put {best_put[0]:.0f} MiB/s ({best_put[1]} thr.) = "
                f"{100 * fe / best_put[0]:.0f}%",
                fe / best_put[0] >= 0.8,
            ))
        if fw is not None and best_put and pt != size:
            targets.append((
                f"(context) replication, wire bytes per second ({d})",
                f"ferry wire {fw:.0f} MiB/s ÷ plain put {best_put[0]:.0f} MiB/s = {100 * fw / best_put[0]:.0f}%",
                None,
            ))
        if re_ is not None and best_file:
            targets.append((
                f"full download through Azurite ≥ 80% of the plain client's get into a file ({d})",
                f"ferry restore {re_:.0f} MiB/s of disk ÷ plain get → file + fsync {best_file[0]:.0f} MiB/s "
                f"({best_file[1]} thr.) = {100 * re_ / best_file[0]:.0f}%",
                re_ / best_file[0] >= 0.8,
            ))
        if rw is not None and best_file and stored_b != size:
            targets.append((
                f"(context) full download, wire bytes per second ({d})",
                f"ferry restore wire {rw:.0f} MiB/s ÷ plain get → file + fsync {best_file[0]:.0f} MiB/s = "
                f"{100 * rw / best_file[0]:.0f}%",
                None,
            ))
        if re_ is not None and best_get:
            targets.append((
                f"(context) full download vs the plain client's get with the data discarded ({d})",
                f"ferry restore {re_:.0f} MiB/s ÷ plain get {best_get[0]:.0f} MiB/s ({best_get[1]} thr.) = "
                f"{100 * re_ / best_get[0]:.0f}%",
                None,
            ))
        idents = runs.get(p + "identical", [])
        if idents:
            ident = "yes" if all(i == "yes" for i in idents) else "no"
            targets.append((
                f"restored disk bit-identical to the source ({d}, Azurite, every round)",
                f"{ident} ({len(idents)} of {len(idents)} checked)" if ident == "yes" else " ".join(idents),
                ident == "yes",
            ))
    out.append("")

    out.append(
        f"#### Encryption on the local store (file://): median of {m.get('enc_repeat', '?')} runs each, "
        "fresh home per run, with and without `--key` alternating"
    )
    out.append("")
    out.append(
        "Wall seconds decide the target; the CPU seconds (medians, from GNU time) show the cipher's "
        "own cost, which other work on the machine does not blur."
    )
    out.append("")
    out.append(
        "| data | what | without key | with key | with ÷ without | CPU without / with (user + sys) | "
        "runs without / with (s) |"
    )
    out.append("|---|---|---:|---:|---:|---:|---|")
    for d in datasets:
        for step, label in (("protect", "`protect`"), ("restore", "`failover --unplanned` (restore)")):
            a = median_of(m, f"enc_{d}_plain_{step}_runs")
            b = median_of(m, f"enc_{d}_key_{step}_runs")
            if a is None and b is None:
                continue
            ratio = b / a if (a and b) else None
            ca = median_of(m, f"enc_{d}_plain_{step}_cpus")
            cb = median_of(m, f"enc_{d}_key_{step}_cpus")
            cpu = "–" if (ca is None or cb is None) else f"{ca:.2f} / {cb:.2f} s ({cb / ca:.2f}×)" if ca else "–"
            out.append(
                f"| {d} | {label} | {fmt_s(a)} s | {fmt_s(b)} s | {'–' if ratio is None else f'{ratio:.2f}×'} | "
                f"{cpu} | {m.get(f'enc_{d}_plain_{step}_runs', '–')} / {m.get(f'enc_{d}_key_{step}_runs', '–')} |"
            )
            if ratio is not None:
                targets.append((
                    f"encryption ≤ 1.15× on the local store: {step} ({d})",
                    f"{b:.3f} s ÷ {a:.3f} s = {ratio:.3f}×",
                    ratio <= 1.15,
                ))
        ident = m.get(f"enc_{d}_identical")
        if ident:
            targets.append((f"restored disks bit-identical ({d}, local, with and without key)", ident, ident == "yes"))
    out.append("")

    out.append("#### Targets (issue 4)")
    out.append("")
    out.append("| target | measured | result |")
    out.append("|---|---|---|")
    if not targets:
        targets.append(("(nothing measured)", "–", None))
    for name, meas, ok in targets:
        out.append(f"| {name} | {meas} | {verdict(ok)} |")
    out.append("")
    return "\n".join(out)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "rand":
        rand(argv[2], parse_size(argv[3]), int(argv[4]))
    elif cmd == "plain":
        prefix = argv[7] if len(argv) > 7 else ""
        server_pid = int(argv[8]) if len(argv) > 8 and argv[8] else 0
        plain(argv[2], argv[3], argv[4], parse_size(argv[5]), int(argv[6]), prefix, server_pid)
    elif cmd == "stored":
        stored(argv[2], argv[3], argv[4])
    elif cmd == "clear":
        clear(argv[2], argv[3])
    elif cmd == "report":
        print(report(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
