"""Chunk codec speed and size on model weights, against plain zstd level 1 in the same run.

    python benchmarks/bench_codec.py [--mb N]

Each data kind (fp32 and bf16 normal weights, random bytes) is cut into 64 KiB chunks, which are
encoded and decoded one at a time on one thread: the figures are per core.
"""

import argparse
import resource
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import zstandard

from chunkstore import codec

CHUNK = 64 * 1024


def normal_weights(rng: np.random.Generator, count: int) -> np.ndarray:
    w = rng.standard_normal(count, np.float32)
    w *= 0.02
    return w


def make_data(mb: int) -> Iterator[tuple[str, bytes | memoryview]]:
    """Yield each data kind in turn, made only when it is needed."""
    n = mb << 20
    rng = np.random.default_rng(0)
    yield "fp32", memoryview(normal_weights(rng, n // 4)).cast("B")
    yield "bf16", normal_weights(rng, n // 2).view(np.uint16)[1::2].tobytes()  # top 2 bytes
    yield "random", rng.bytes(n)


def mb_per_s(fn, items: list, size: int) -> float:
    """Throughput of ``fn`` over ``items``; results are dropped, as a pipeline would."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return size / (time.perf_counter() - start) / 1e6


def measure(encode, decode, chunks: list[memoryview]) -> tuple[list[bytes], float, float, float]:
    """Return the blobs, stored/raw ratio, encode MB/s and decode MB/s."""
    size = sum(len(c) for c in chunks)
    blobs = [encode(c) for c in chunks]
    enc, dec = mb_per_s(encode, chunks, size), mb_per_s(decode, blobs, size)
    return blobs, sum(len(b) for b in blobs) / size, enc, dec


def row(kind: str, data: bytes | memoryview) -> str:
    view = memoryview(data)
    chunks = [view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]
    blobs, ratio, enc, dec = measure(codec.encode, codec.decode, chunks)
    chosen = Counter(codec.codec_name(b) for b in blobs).most_common()
    del blobs
    chosen_text = " ".join(f"{name} {count / len(chunks):.0%}" for name, count in chosen)
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    _, base_ratio, base_enc, base_dec = measure(zc.compress, zd.decompress, chunks)
    return (
        f"{kind:<7}{chosen_text:<22}{ratio:>7.3f}{enc:>10.0f}{dec:>10.0f}"
        f" | {base_ratio:>12.3f}{base_enc:>10.0f}{base_dec:>10.0f}"
        f" | {enc / base_enc:>6.2f}{dec / base_dec:>6.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="MB of each data kind (default 64)")
    args = parser.parse_args()

    print(f"{args.mb} MB per kind, {CHUNK // 1024} KiB chunks, one thread")
    print(
        f"{'data':<7}{'codec chosen':<22}{'ratio':>7}{'enc MB/s':>10}{'dec MB/s':>10}"
        f" | {'zstd-1 ratio':>12}{'enc MB/s':>10}{'dec MB/s':>10}"
        f" | {'enc x':>6}{'dec x':>6}"
    )
    for kind, data in make_data(args.mb):
        print(row(kind, data))
        del data
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
