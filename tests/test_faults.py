"""Faults of concurrency and resources: one writer per run folder (a second is refused with the holder named; a
dead holder's lock is cleared), and images too large to decode refused before decoding (a Pillow image decoded
whole, a TIFF whose strip is)."""

from __future__ import annotations

import json
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
from conftest import run_fold
from processes import left_behind

from featcache.errors import FeatcacheError

TRAIN = ["train.cli", "decoder", "--fold", "P2", "--encoder", "tiny-cnn", "--mode", "random", "--dataset", "tiny"]
TRAIN += ["--decoder", "linear", "--val-fraction", "0", "--batch-size", "4", "--device", "cpu"]


def run_folder(ws, **settings):
    from train.config import TrainConfig

    cfg = TrainConfig(dataset="tiny", encoder="tiny-cnn", fold="P2", mode="random", val_fraction=0.0, **settings)
    return ws / "runs" / "tiny" / "tiny-cnn" / cfg.run_name / "fold-P2"


def test_one_writer_per_run_folder(tiny_cnn_features, tmp_path):
    ws, _ = tiny_cnn_features
    args = [sys.executable, "-m", *TRAIN, "--epochs", "6", "--name", "lock", "--workspace", str(ws)]
    fold = run_folder(ws, decoder="linear", batch_size=4, name="lock")
    first = subprocess.Popen([*args, "--seed", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (fold / ".writer.lock").exists():
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # it holds the folder, mid-run, for as long as the second one takes
        assert (fold / ".writer.lock").exists(), first.stderr.read() if first.poll() is not None else "no lock"
        second = subprocess.run([*args, "--seed", "0"], capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    said = " ".join(second.stderr.split())
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"is being written by another featcache process (pid {first.pid} on this host" in said, said
    assert f"kill {first.pid}" in said
    epochs = [json.loads(line)["epoch"] for line in (fold / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(6))  # one writer's log, not two interleaved
    assert not (fold / ".writer.lock").exists()
    assert left_behind(ws) == [] and left_behind(tmp_path) == []


def test_a_dead_holders_lock_is_cleared_and_another_hosts_is_named(tiny_cnn_features):
    ws, _ = tiny_cnn_features
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    settings = dict(decoder="linear", epochs=2, batch_size=4, name="stale")
    fold = run_folder(ws, **settings)
    fold.mkdir(parents=True)
    lock = {"pid": gone.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+0000"}
    (fold / ".writer.lock").write_text(json.dumps(lock))  # a killed run's lock
    assert run_fold("tiny", "tiny-cnn", "P2", mode="random", workspace=ws, **settings).metrics
    assert not (fold / ".writer.lock").exists() and (fold / "metrics.json").is_file()
    (fold / ".writer.lock").write_text(json.dumps({**lock, "host": "node-17"}))
    with pytest.raises(FeatcacheError, match=f"pid {gone.pid} on host node-17.*delete {fold / '.writer.lock'}"):
        run_fold("tiny", "tiny-cnn", "P2", mode="random", workspace=ws, **settings)


def bomb_png(path, side: int = 45_000) -> None:
    """A real, valid palette PNG of side × side white pixels in ~2 MB: every row compresses to the same bytes."""
    row = b"\0" * (side + 1)  # filter 0, palette index 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(row) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(row) + deflate.flush(zlib.Z_FULL_FLUSH)  # history reset: each further row is this
    adler = (side * len(row) % 65521) << 16 | 1  # Adler-32 of zero bytes: A stays 1, B counts them
    idat = b"\x78\xda" + first + again * (side - 1) + deflate.flush(zlib.Z_FINISH) + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"PLTE", b"\xff\xff\xff")
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def predict_in_8_gib(ws, tmp_path, image, *extra):
    """`featcache predict` of a one-epoch run on ``image``, the process limited to mapping 8 GiB (ulimit -v): far
    less than a bomb image decoded. Returns (what it said on one line, the process, its --output folder)."""
    run = run_fold(
        "tiny", "tiny-cnn", "P2", mode="random", workspace=ws, decoder="linear", epochs=1, batch_size=4, name="bomb"
    )
    limit = 8 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "pred"
    args = [sys.executable, "-m", "featcache", "predict", "--run", str(run.run_dir), "--image", str(image)]
    p = subprocess.run(
        [*args, "--output", str(out), "--workspace", str(ws), "--device", "cpu", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "MemoryError" not in p.stderr, p.stderr[-2000:]
    return " ".join(p.stderr.split()), p, out


def test_an_image_too_large_to_decode_is_refused_before_decoding(tiny_cnn_features, tmp_path):
    image = tmp_path / "huge.png"
    bomb_png(image)
    assert image.stat().st_size < 4 << 20
    said, _, out = predict_in_8_gib(tiny_cnn_features[0], tmp_path, image)  # decoded: ~12 GiB
    assert f"{image} is 45,000 × 45,000 px" in said and "GiB of memory" in said and "tiled pyramidal TIFF" in said
    assert not out.exists() and left_behind(tmp_path) == []


def bomb_tiff(path, side: int = 45_000) -> None:
    """A real, valid RGB TIFF of side × side black pixels in ~6 MB, stored as ONE deflate strip (RowsPerStrip =
    height, as some converters write): read region by region, yet its only strip is decoded whole."""
    row = b"\0" * (3 * side)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(row) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(row) + deflate.flush(zlib.Z_FULL_FLUSH)  # history reset: each further row is this
    adler = (3 * side * side % 65521) << 16 | 1
    strip = b"\x78\xda" + first + again * (side - 1) + deflate.flush(zlib.Z_FINISH) + struct.pack(">I", adler)
    short, long_ = 3, 4
    tags = [  # (tag, type, count, value or offset)
        (256, long_, 1, side),  # ImageWidth
        (257, long_, 1, side),  # ImageLength
        (258, short, 3, None),  # BitsPerSample 8, 8, 8 (stored after the IFD)
        (259, short, 1, 8),  # Compression: deflate
        (262, short, 1, 2),  # PhotometricInterpretation: RGB
        (273, long_, 1, None),  # StripOffsets
        (277, short, 1, 3),  # SamplesPerPixel
        (278, long_, 1, side),  # RowsPerStrip: the whole image
        (279, long_, 1, len(strip)),  # StripByteCounts
        (284, short, 1, 1),  # PlanarConfiguration: chunky
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    bits_at = 8 + ifd_size
    strip_at = bits_at + 6
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        packed = struct.pack("<HI", value, 0)[:4] if kind == short and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 8, 8, 8) + strip)


def test_a_tiff_strip_too_large_to_decode_is_refused_before_decoding(tiny_cnn_features, tmp_path):
    """Only Pillow's images were checked: a TIFF whose one strip decodes to ~6 GiB ended in a MemoryError."""
    import tifffile

    image = tmp_path / "one-strip.tif"
    bomb_tiff(image)
    assert image.stat().st_size < 8 << 20
    with tifffile.TiffFile(image) as tif:  # a valid TIFF, as tifffile reads it: one strip of the whole image
        page = tif.pages[0]
        assert page.shape == (45_000, 45_000, 3) and len(page.dataoffsets) == 1 and not page.is_tiled
    said, _, out = predict_in_8_gib(tiny_cnn_features[0], tmp_path, image, "--mpp", "0.25")  # decoded twice: ~11 GiB
    assert f"{image} stores level 0 (45,000 × 45,000 px) in strips of 45,000 × 45,000 px" in said, said
    assert "decoded whole" in said and "GiB of memory" in said and "tiled pyramidal TIFF" in said
    assert not out.exists() and left_behind(tmp_path) == []


def test_a_build_that_finishes_second_never_replaces_the_first(tmp_path):
    """Two `featcache prepare` of one new dataset at once: the one that finishes second keeps the first's folder
    (it did not ask for --overwrite) and says so; with replace (--overwrite) it replaces it whole."""
    from featcache.errors import FeatcacheError
    from featcache.stores.files import staged_dir

    target = tmp_path / "datasets" / "cc"
    second = staged_dir(target, replace=False)
    (second.path / "dataset.json").write_text("second")
    with staged_dir(target, replace=False) as first:  # starts later, finishes first
        (first / "dataset.json").write_text("first")
    with pytest.raises(FeatcacheError, match="created by another process.*--overwrite"):
        second.commit()
    assert (target / "dataset.json").read_text() == "first" and not second.path.exists()
    with staged_dir(target, replace=True) as again:
        (again / "dataset.json").write_text("overwritten")
    assert (target / "dataset.json").read_text() == "overwritten"
    assert sorted(p.name for p in target.parent.iterdir()) == ["cc"]  # no hidden folder left behind
