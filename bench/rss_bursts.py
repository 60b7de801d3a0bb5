"""Is the RSS a burst leaves behind a leak, or a high-water mark? ``python -m bench.rss_bursts``.

One embeddings server (the bundled MiniLM, ``max_queue_items`` 256 as in the soak), a closed-loop
warm-up at 64 connections, then ``--bursts`` wrk runs of ``--connections`` connections each
(``--seconds`` long; with more connections than ``--queue`` items, most requests are refused
with 429). The server's RSS (``VmRSS``,
median of 5 reads once idle) is printed after the warm-up and after each burst. Growth that
stops after the first bursts is the memory of the peak number of connections (buffers, objects
and allocator pools sized for it, reused by the next burst), not a leak, which would grow with
every burst.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.http_load import EMBEDDINGS_PATH, run_wrk, tidegate_from_toml, write_bodies
from bench.serving import raise_fd_limit, rss_kib, server_pid
from bench.workload import embedding_bodies, make_sentences

MODEL = "all-minilm-l6-v2"
CONFIG = """[server]
host = "127.0.0.1"
log_level = "warning"

[[models]]
id = "{model}"
runtime = "embedding"
[models.batching]
max_queue_items = {queue}
"""


def _settled_rss(pid: int) -> int:
    samples = []
    for _ in range(5):
        time.sleep(0.2)
        samples.append(rss_kib(pid))
    return int(statistics.median(samples))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rss_bursts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--queue", type=int, default=256, help="max_queue_items")
    args = parser.parse_args(argv)
    raise_fd_limit(args.connections * 2 + 1024)
    with tempfile.TemporaryDirectory(prefix="tidegate-rss-") as work:
        workdir = Path(work)
        bodies = write_bodies(workdir / "bodies.txt",
                              embedding_bodies(MODEL, make_sentences(256)))
        config = CONFIG.format(model=MODEL, queue=args.queue)
        with tidegate_from_toml(config, workdir=workdir, name="rss-bursts") as server:
            pid = server_pid(server)
            url = server.base_url + EMBEDDINGS_PATH
            run_wrk(url, bodies, connections=64, duration_s=5)
            before = previous = _settled_rss(pid)
            print(f"after warm-up (64 connections): RSS {before} KiB", flush=True)
            for burst in range(1, args.bursts + 1):
                result = run_wrk(url, bodies, connections=args.connections,
                                 duration_s=args.seconds)
                rss = _settled_rss(pid)
                print(f"after burst {burst} ({args.connections} connections, "
                      f"{result.requests} requests, {result.non_2xx} refused): RSS {rss} KiB "
                      f"({(rss - previous) / 1024:+.1f} MiB; {rss / before:.3f}x the warm-up)",
                      flush=True)
                previous = rss
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
