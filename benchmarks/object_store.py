"""Benchmark the streaming loader on a feature store in S3 (moto on 127.0.0.1) against the same store on disk.

    python benchmarks/object_store.py [--encoder uni2h] [--samples 2] [--bins 256] [--batch-size 16]
        [--epochs 5] [--workdir /tmp/featcache-bench-s3] [--out benchmarks/results/object-store-cpu.jsonl]

Builds (once, cached in --workdir) the synthetic dataset and store of benchmarks/streaming.py, starts
``moto_server`` on 127.0.0.1 (an S3 server in one Python process, keeping objects in memory), copies the
store into a bucket and times, interleaved on the same patches, shuffled epochs of train.data.Batches
(not in memory: every chunk decoded through Dask each epoch) reading

* local: ``<workspace>/features/`` as usual;
* s3: the same store through ``--features-root s3://bench/features`` (s3fs, zarr's FsspecStore).

The server runs on the same cores as the loader, so the s3 rate is a lower bound of what a real
object store (its own machines, the network between) gives: it measures our side of the protocol.
Reports the median tiles/s of each over epochs, their ratio, and the CPU the server itself used
while the s3 epochs ran (core-seconds per second of wall time): the share of the gap that is moto's.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit  # noqa: E402
from streaming import build  # noqa: E402

from featcache.stores import Workspace  # noqa: E402
from train.data import Batches, FoldInputs, TargetTransform, load_targets  # noqa: E402

BUCKET = "bench"


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("moto_server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def epoch_rate(inputs, every, transform, batch_size, seed) -> float:
    t = time.perf_counter()
    n = sum(len(b[0]) for b in Batches(inputs, every, transform, batch_size, in_memory=False).epoch(True, seed))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="uni2h")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--bins", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featcache-bench-s3"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ws = build(args.workdir, args.samples, args.bins, args.encoder)
    local = ws.feature_store("stream", args.encoder, random=True)
    proc, url = start_s3()
    try:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_ENDPOINT_URL=url,
            AWS_DEFAULT_REGION="us-east-1",
        )
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        remote_ws = Workspace.resolve(ws.root, f"s3://{BUCKET}/features")
        remote = remote_ws.feature_store("stream", args.encoder, random=True)
        t = time.perf_counter()
        fs.put(str(local.path), remote.loc.root, recursive=True)
        upload_s = time.perf_counter() - t
        ds = ws.open_dataset("stream")
        local_in, remote_in = FoldInputs(ds, local), FoldInputs(ds, remote)
        assert remote.status().complete and remote.identity == local.identity
        every = {s: np.arange(len(local_in.arrays[s].origin)) for s in local_in.samples}
        transform = TargetTransform.fit(load_targets(local_in.arrays[s], every[s]) for s in local_in.samples)
        rates, server_cpu, s3_wall = {"local": [], "s3": []}, 0.0, 0.0
        for epoch in range(args.epochs):  # interleaved, so that both see the same machine load
            rates["local"].append(epoch_rate(local_in, every, transform, args.batch_size, epoch))
            cpu, t = cpu_seconds(proc.pid), time.perf_counter()
            rates["s3"].append(epoch_rate(remote_in, every, transform, args.batch_size, epoch))
            server_cpu, s3_wall = server_cpu + cpu_seconds(proc.pid) - cpu, s3_wall + time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait()
    per_patch = int(np.prod(local_in.arrays[local_in.samples[0]].tokens.shape[1:])) * 2
    size = local.status().size_bytes
    emit(
        {
            "benchmark": "object-store-streaming",
            "encoder_shape": args.encoder,
            "patches": int(sum(len(v) for v in every.values())),
            "token_mb_per_patch": round(per_patch / 2**20, 2),
            "store_mb": round(size / 2**20, 1),
            "token_chunk_patches": local_in.arrays[local_in.samples[0]].chunk,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "local_tiles_s": round(float(np.median(rates["local"])), 1),
            "s3_tiles_s": round(float(np.median(rates["s3"])), 1),
            "s3_vs_local": round(float(np.median(np.array(rates["s3"]) / np.array(rates["local"]))), 3),
            "s3_mb_s": round(float(np.median(rates["s3"])) * size / sum(len(v) for v in every.values()) / 2**20, 1),
            "upload_mb_s": round(size / 2**20 / upload_s, 1),
            "server_cpu_share_of_s3_wall": round(server_cpu / s3_wall, 2),  # core-seconds the server used per second
            "load_average": round(os.getloadavg()[0], 1),
            "server": "moto_server on 127.0.0.1 (same cores)",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
