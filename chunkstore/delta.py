"""Deltas against a base version: chunks stored as the XOR of their bytes and a prediction.

A tensor that also exists in the base version (same name and shape; same dtype, or a bf16/fp16
export of an fp32 tensor) is cut at the base tensor's chunk boundaries, so that chunk ``i`` of
the new tensor pairs with chunk ``i`` of the base. Each new chunk ``X`` the store lacks is then
stored either on its own or, when that is clearly smaller, as an XOR chunk ``D``::

    raw(X) = raw(D) XOR predict(raw(B), transform)

where ``B`` (the keyframe) is a chunk stored under its own id and the prediction is ``B``'s
bytes as they are (transform ``""``) or converted to the new dtype (``"bf16_from_f32"``,
``"f16_from_f32"``). Weights one optimizer step apart differ in their low mantissa bits, so
``D`` is mostly zero bits and its byte planes compress far better than the weights do.

Every stored chunk stays self-contained (its id is BLAKE3 of its own bytes), so stores and
nodes know nothing of deltas: the file manifest records ``X -> (D, B, transform)`` (see
:class:`~chunkstore.model.DeltaRef`). ``B`` is never a delta itself: a chunk whose base chunk
is delta-coded is coded against that chunk's keyframe, and once that stops paying the chunk is
stored on its own and becomes the next keyframe. Rebuilding any chunk therefore takes at most
two stored chunks.

This module holds the pieces the push pipeline (:mod:`chunkstore.ingest`) and the readers
(:mod:`chunkstore.restore`) share: the transforms, the base tensors a push cuts against, the
per-chunk encoding decision, and :func:`read_chunks`, which rebuilds chunks on read.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from chunkstore import codec, ids
from chunkstore.allocator import keep_freed_memory
from chunkstore.batching import by_size
from chunkstore.errors import CorruptChunk
from chunkstore.model import DeltaRef, Manifest, TensorInfo
from chunkstore.parallel import for_each
from chunkstore.stores.base import CHUNKS_PER_TASK, ChunkStore

Blob = bytes | memoryview

#: A delta is kept only if its blob is at most this share of the chunk's standalone blob; a
#: chunk whose delta stops paying is stored on its own and becomes the next keyframe.
KEEP_RATIO = 0.8
#: Freed memory a delta read keeps in the heap: each task decompresses into a ~1 MiB buffer,
#: which glibc would otherwise map, fault in and unmap afresh (see :mod:`chunkstore.allocator`).
KEPT_BYTES = 4 << 20

#: (new dtype, base dtype) -> transform predicting the new chunk from the base chunk.
_RELATIONS = {("BF16", "F32"): "bf16_from_f32", ("F16", "F32"): "f16_from_f32"}
#: Base bytes per predicted byte, by transform.
_SCALE = {"": 1, "bf16_from_f32": 2, "f16_from_f32": 2}


def relation(new_dtype: str, base_dtype: str) -> str | None:
    """The transform predicting a ``new_dtype`` tensor from a ``base_dtype`` one, or None."""
    if new_dtype == base_dtype:
        return ""
    return _RELATIONS.get((new_dtype, base_dtype))


def compose(first: str, then: str) -> str | None:
    """The transform equal to applying ``first`` then ``then``, or None if there is none."""
    if not first:
        return then
    if not then:
        return first
    return None


def base_length(length: int, transform: str) -> int:
    """Raw length of the base chunk that predicts a chunk of ``length`` bytes."""
    return length * _SCALE[transform]


# -- predictions and XOR ----------------------------------------------------------------------


def predict(base: bytes | memoryview, transform: str) -> np.ndarray:
    """The predicted raw bytes (uint8 array) of a chunk from its base chunk's raw bytes.

    ``bf16_from_f32`` rounds each fp32 value to bfloat16 to nearest, ties to even, NaN becoming
    0x7FC0, as torch's ``.to(torch.bfloat16)`` does; ``f16_from_f32`` is numpy's
    ``astype(float16)``. Any other conversion of the same values only costs some bits of the
    XOR chunk: the rebuilt bytes are exact whatever the prediction.
    """
    raw = np.frombuffer(base, np.uint8)
    if transform == "":
        return raw
    if len(raw) % 4:
        raise ValueError(f"a {transform} base of {len(raw)} bytes is not whole fp32 values")
    values = raw.view("<u4")
    if transform == "bf16_from_f32":
        rounded = values >> np.uint32(16)
        rounded &= np.uint32(1)
        rounded += np.uint32(0x7FFF)
        rounded += values
        rounded >>= np.uint32(16)
        out = rounded.astype("<u2")
        nan = np.isnan(values.view("<f4"))
        if nan.any():
            out[nan] = 0x7FC0
        return out.view(np.uint8)
    if transform == "f16_from_f32":
        with np.errstate(over="ignore", invalid="ignore"):
            return values.view("<f4").astype("<f2").view(np.uint8)
    raise ValueError(f"unknown delta transform {transform!r}")


def _bf16_from_f32_planes(planes: list[np.ndarray]) -> np.ndarray:
    """:func:`predict` ``bf16_from_f32`` from the 4 byte planes of fp32 values, without
    interleaving them: the high half of each value, plus one where rounding carries into it."""
    high = planes[3].astype("<u2")
    high <<= 8
    high |= planes[2]
    low = planes[1].astype("<u2")
    low <<= 8
    low |= planes[0]
    # Rounding carries into the high half if the low half is above 0x8000, or is 0x8000 and
    # the high half is odd (a tie rounds to even).
    threshold = high & 1
    np.subtract(0x8000, threshold, out=threshold)
    carry = low > threshold
    special = (high & 0x7F80) == 0x7F80  # inf or NaN: all exponent bits set
    nan = special & (((high & 0x7F) != 0) | (low != 0)) if special.any() else None
    high += carry
    if nan is not None:
        high[nan] = 0x7FC0
    return high.view(np.uint8)


def predict_blob(base_blob: bytes | memoryview, transform: str) -> np.ndarray:
    """:func:`predict` from a base chunk's stored blob (a fresh, writable array).

    A bf16 prediction from fp32 stored as byte planes is computed on the planes themselves,
    about 3x faster than decoding the fp32 values first.
    """
    if transform == "bf16_from_f32":
        parts = codec.planes_of(base_blob)
        if parts is not None and len(parts[0]) == 4 and not len(parts[1]):
            return _bf16_from_f32_planes(parts[0])
    prediction = predict(codec.decode(base_blob), transform)
    return prediction.copy() if not transform else prediction


def xor(data: bytes | memoryview, prediction: np.ndarray) -> np.ndarray:
    """``data XOR prediction`` as a new uint8 array (whole words at a time)."""
    a = np.frombuffer(data, np.uint8)
    if len(a) != len(prediction):
        raise ValueError(f"cannot XOR {len(a)} bytes with a prediction of {len(prediction)}")
    out = np.empty(len(a), np.uint8)
    if len(a) % 8 == 0:
        np.bitwise_xor(a.view("<u8"), prediction.view("<u8"), out=out.view("<u8"))
    else:
        np.bitwise_xor(a, prediction, out=out)
    return out


def rebuild(chunk_id: bytes, ref: DeltaRef, delta_raw: bytes, base_raw: bytes) -> bytes:
    """The raw bytes of a delta-coded chunk, checked against its id (CorruptChunk if not)."""
    try:
        raw = xor(delta_raw, predict(base_raw, ref.transform)).tobytes()
    except ValueError as e:
        raise CorruptChunk(chunk_id, f"cannot rebuild it from its delta: {e}") from e
    if ids.chunk_id(raw) != chunk_id:
        raise CorruptChunk(
            chunk_id,
            f"rebuilt from delta {ids.short(ref.delta)} and base {ids.short(ref.base)}, "
            "its content does not match its id",
        )
    return raw


# -- the push side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseChunk:
    """The chunk of a base version a new chunk is paired with."""

    id: bytes
    ref: DeltaRef | None  # how the base chunk itself is stored, if delta-coded
    relation: str  # transform from the base chunk's dtype to the new chunk's
    tensor: str = ""  # name of the base tensor the chunk belongs to

    def keyframe(self) -> tuple[bytes, str] | None:
        """``(stored chunk id, transform)`` to code a new chunk against, or None."""
        if self.ref is None:
            return self.id, self.relation
        transform = compose(self.ref.transform, self.relation)
        return None if transform is None else (self.ref.base, transform)


@dataclass(frozen=True)
class Encoded:
    """A chunk ready for the store: ``(store_id, blob)`` is written; ``chunk_id`` is the chunk
    of the file it stands for, ``ref`` how to rebuild it if the blob is its delta."""

    store_id: bytes
    blob: bytes
    raw_length: int
    chunk_id: bytes
    ref: DeltaRef | None = None


def encode_chunk(
    chunk_id: bytes,
    data: bytes | memoryview,
    element_size: int | None,
    base: tuple[bytes, bytes, str] | None = None,
    base_size: int | None = None,
) -> Encoded:
    """Encode one chunk, as the XOR against ``base = (id, raw bytes, transform)`` if that is
    at most :data:`KEEP_RATIO` of its standalone encoding, else on its own.

    The XOR is encoded in full. The chunk is encoded on its own too only when the XOR is not
    clearly smaller than the standalone size expected: ``base_size`` where given (the size of
    the base's own blob, a close guess for a chunk of the same dtype nudged from it), else
    an estimate from a sample of the chunk.
    """
    if base is None:
        return Encoded(chunk_id, codec.encode(data, element_size), len(data), chunk_id)
    base_id, base_raw, transform = base
    diff = xor(data, predict(base_raw, transform))
    if element_size in (2, 4):  # the planes of an XOR are mostly zero bits: no need to choose
        diff_blob = codec.encode_as(diff, codec.PLANES2 if element_size == 2 else codec.PLANES4)
    else:
        diff_blob = codec.encode(diff, element_size)
    expected = base_size if base_size is not None else codec.estimate(data, element_size)
    if len(diff_blob) > KEEP_RATIO * expected:
        blob = codec.encode(data, element_size)
        if len(diff_blob) > KEEP_RATIO * len(blob):
            return Encoded(chunk_id, blob, len(data), chunk_id)
    delta_id = ids.chunk_id(diff)
    return Encoded(delta_id, diff_blob, len(data), chunk_id, DeltaRef(delta_id, base_id, transform))


class BaseTensors:
    """The tensors of the base version(s) a push codes deltas against.

    ``versions`` are in order of preference, each a mapping path -> manifest. A new tensor is
    paired with the first base tensor of the same name and shape whose dtype predicts it (the
    same dtype, or fp32 for a bf16/fp16 tensor), looking in the file of the same path first,
    and only with one whose chunks start at its first byte and end at its last.
    """

    def __init__(self, versions: Sequence[Mapping[str, Manifest]]) -> None:
        # name -> [(rank of its version, path, manifest, tensor)]
        self._by_name: dict[str, list[tuple[int, str, Manifest, TensorInfo]]] = defaultdict(list)
        self._starts: dict[int, dict[int, int]] = {}  # id(manifest) -> offset -> chunk index
        self._manifests: list[Manifest] = []
        for rank, files in enumerate(versions):
            for path, manifest in files.items():
                if not manifest.tensors:
                    continue
                self._manifests.append(manifest)  # keeps id(manifest) valid
                for tensor in manifest.tensors:
                    self._by_name[tensor.name].append((rank, path, manifest, tensor))

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def stored_ids(self) -> set[bytes]:
        """Ids of the chunks the store holds for the base files (see
        :meth:`~chunkstore.model.Manifest.stored_ids`): a push relies on them without asking,
        since a visible version references them, and confirms them at its end."""
        return {cid for manifest in self._manifests for cid in manifest.stored_ids()}

    def match(
        self, path: str | None, tensor: TensorInfo
    ) -> list[tuple[int, int, BaseChunk]] | None:
        """Cuts for ``tensor`` at its base's chunk boundaries: ``(offset relative to the
        tensor, length, base chunk)`` for each chunk, or None if no base tensor qualifies."""
        candidates = self._by_name.get(tensor.name, [])
        for _, _, manifest, base in sorted(candidates, key=lambda c: (c[0], c[1] != path)):
            rel = relation(tensor.dtype, base.dtype)
            if rel is None or base.shape != tensor.shape:
                continue
            cuts = self._aligned(manifest, base, rel, tensor.name)
            if cuts is not None and sum(n for _, n, _ in cuts) == tensor.end - tensor.begin:
                return cuts
        return None

    def _aligned(
        self, manifest: Manifest, base: TensorInfo, rel: str, name: str
    ) -> list[tuple[int, int, BaseChunk]] | None:
        starts = self._starts.get(id(manifest))
        if starts is None:
            starts = {offset: i for i, offset in enumerate(manifest.offsets())}
            self._starts[id(manifest)] = starts
        index = starts.get(base.begin)
        if index is None or base.end == base.begin:
            return None
        scale = _SCALE[rel]
        cuts, pos = [], base.begin
        while pos < base.end:
            if index >= len(manifest.chunks):
                return None
            cid, length = manifest.chunks[index]
            if length % (4 if scale > 1 else 1):
                return None  # not whole fp32 values
            cuts.append(
                (
                    (pos - base.begin) // scale,
                    length // scale,
                    BaseChunk(cid, manifest.deltas.get(index), rel, name),
                )
            )
            pos += length
            index += 1
        return cuts if pos == base.end else None


# -- the read side ----------------------------------------------------------------------------


def read_chunks_into(
    store: ChunkStore,
    chunk_ids: Sequence[bytes],
    refs: Mapping[bytes, DeltaRef],
    consume: Callable[[bytes, codec.RawBuffer], None],
    workers: int = 2,
) -> None:
    """As :func:`read_chunks`, handing each chunk to ``consume`` on the decoding threads
    (``consume`` must be thread-safe), so writing chunks out does not funnel through one. The
    bytes handed over are bytes-like and valid only during the call."""
    wanted = list(dict.fromkeys(chunk_ids))
    if not any(cid in refs for cid in wanted):
        store.read_into(wanted, consume, workers=workers)
        return
    if store.remote:  # one fetch from every node at once, not a round trip per task
        for _ in _read_chunks(store, wanted, refs, workers, consume):
            pass
        return
    keep_freed_memory(KEPT_BYTES, KEPT_BYTES)
    tasks = (wanted[i : i + CHUNKS_PER_TASK] for i in range(0, len(wanted), CHUNKS_PER_TASK))
    for_each(partial(_fetch_and_rebuild, store, refs, consume), tasks, workers, "chunk-rebuild")


def _fetch_and_rebuild(
    store: ChunkStore,
    refs: Mapping[bytes, DeltaRef],
    consume: Callable[[bytes, codec.RawBuffer], None],
    chunk_ids: list[bytes],
) -> None:
    """Fetch the stored chunks a few chunks need in one call, rebuild and check each, and hand
    it to ``consume``: all on the calling worker, so fetching runs in parallel too. Chunks are
    consumed while their blobs are valid, so nothing is copied on the way."""
    parts: dict[bytes, None] = {}
    for cid in chunk_ids:
        ref = refs.get(cid)
        parts.update(dict.fromkeys((cid,) if ref is None else (ref.delta, ref.base)))

    def rebuild_all(blobs: Mapping[bytes, bytes | memoryview]) -> list[bytes]:
        """Consume every chunk that rebuilds; return the ones that do not."""
        failed = []
        coded = [
            (cid, refs[cid], blobs[refs[cid].delta], blobs[refs[cid].base])
            for cid in chunk_ids
            if cid in refs
        ]
        rebuilt = dict(zip([c[0] for c in coded], _rebuild_many(coded), strict=True))
        for cid in chunk_ids:
            raw = rebuilt[cid] if cid in rebuilt else codec.verified_buffer(cid, blobs[cid])
            if raw is None:
                failed.append(cid)
            else:
                consume(cid, raw)
        return failed

    for cid in store.with_blobs(list(parts), rebuild_all):
        consume(cid, _rebuild_verified(store, cid, refs[cid]))


def read_chunks(
    store: ChunkStore,
    chunk_ids: Sequence[bytes],
    refs: Mapping[bytes, DeltaRef],
    workers: int = 2,
) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(id, raw bytes)`` for every id, each checked against its id, in any order.

    Ids in ``refs`` are rebuilt from their delta and base chunks. All stored chunks needed are
    fetched in one batched call (each once); decoding, XOR and hashing run on ``workers``
    threads (all release the GIL). A rebuilt chunk is checked against its own id, which covers
    its delta and base: they are hashed on their own only if it fails, to name the culprit
    (and, on a cluster, to read them from another replica). Raises ChunkNotFound or
    CorruptChunk naming the stored chunk that is missing or damaged, or CorruptChunk naming a
    rebuilt chunk whose bytes do not match its id.
    """
    wanted = list(dict.fromkeys(chunk_ids))
    if not any(cid in refs for cid in wanted):
        yield from store.read(wanted, workers=workers)
        return
    yield from _read_chunks(store, wanted, refs, workers)


def _read_chunks(
    store: ChunkStore,
    wanted: Sequence[bytes],
    refs: Mapping[bytes, DeltaRef],
    workers: int,
    consume: Callable[[bytes, codec.RawBuffer], None] | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """:func:`read_chunks` of distinct ids some of which are delta-coded; given ``consume``,
    each chunk goes to it on the decoding threads instead (as bytes-like, valid during the
    call) and nothing is yielded."""
    keep_freed_memory(KEPT_BYTES, KEPT_BYTES)
    decode = partial(_decode_batch, store, consume=consume)
    plain: set[bytes] = set()
    fetch: dict[bytes, None] = {}
    waiting: dict[bytes, list[bytes]] = defaultdict(list)  # stored id -> chunks it rebuilds
    remaining: dict[bytes, int] = {}  # rebuilt chunk -> its stored chunks not yet arrived
    for cid in wanted:
        ref = refs.get(cid)
        if ref is None:
            plain.add(cid)
            fetch[cid] = None
            continue
        parts = list(dict.fromkeys((ref.delta, ref.base)))
        remaining[cid] = len(parts)
        for part in parts:
            waiting[part].append(cid)
            fetch[part] = None
    users = {part: len(xs) for part, xs in waiting.items()}
    held: dict[bytes, bytes] = {}  # blobs of deltas and bases until their chunks are rebuilt
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="chunk-rebuild") as pool:
        pending: deque[Future] = deque()
        batch: list[tuple] = []  # work handed to a thread at once: a future per chunk costs
        batch_bytes = 0  # more than the XOR of a small chunk
        for sid, blob in store.get(list(fetch)):
            if sid in plain:
                batch.append((sid, None, blob, None))
                batch_bytes += len(blob)
            if sid in waiting:
                held[sid] = blob
                for cid in waiting[sid]:
                    remaining[cid] -= 1
                    if remaining[cid]:
                        continue
                    ref = refs[cid]
                    batch.append((cid, ref, held[ref.delta], held[ref.base]))
                    batch_bytes += len(held[ref.delta]) + len(held[ref.base])
                    for part in dict.fromkeys((ref.delta, ref.base)):
                        users[part] -= 1
                        if not users[part]:
                            del held[part]
            if batch_bytes >= _BATCH_BYTES:
                pending.append(pool.submit(decode, batch))
                batch, batch_bytes = [], 0
            while pending and (pending[0].done() or len(pending) > 2 * workers):
                yield from pending.popleft().result()
        if batch:
            pending.append(pool.submit(decode, batch))
        while pending:
            yield from pending.popleft().result()


_BATCH_BYTES = 1 << 20  # blob bytes per decoding task


def _decode_batch(
    store: ChunkStore,
    batch: list[tuple],
    consume: Callable[[bytes, codec.RawBuffer], None] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Decode plain chunks (verified) and rebuild delta-coded ones, in order; or hand each to
    ``consume`` (without copying it into bytes) and return nothing."""
    coded = [chunk for chunk in batch if chunk[1] is not None]
    rebuilt = dict(zip([c[0] for c in coded], _rebuild_many(coded), strict=True))
    out = []
    for cid, ref, blob, _ in batch:
        raw: codec.RawBuffer
        if ref is None:
            raw = codec.verified_buffer(cid, blob)
        elif rebuilt[cid] is not None:
            raw = rebuilt[cid]
        else:
            raw = _rebuild_verified(store, cid, ref)
        if consume is not None:
            consume(cid, raw)
        else:
            out.append((cid, raw if isinstance(raw, bytes) else bytes(raw)))
    return out


def _rebuild_many(chunks: Sequence[tuple[bytes, DeltaRef, Blob, Blob]]) -> list[np.ndarray | None]:
    """Each ``(id, ref, delta blob, base blob)`` rebuilt (a uint8 array), or None where its
    blobs do not decode to bytes with its id. Chunks coded without a transform are decoded
    together (:func:`codec.decode_xor_many`)."""
    out: list[np.ndarray | None] = [None] * len(chunks)
    xors = [i for i, (_, ref, _, _) in enumerate(chunks) if not ref.transform]
    decoded = codec.decode_xor_many([chunks[i][2:] for i in xors])
    for i, raw in zip(xors, decoded, strict=True):
        out[i] = raw if raw is not None and ids.chunk_id(raw) == chunks[i][0] else None
    for i, (cid, ref, delta_blob, base_blob) in enumerate(chunks):
        if ref.transform:
            out[i] = _try_rebuild(cid, ref, delta_blob, base_blob)
    return out


def _try_rebuild(
    cid: bytes, ref: DeltaRef, delta_blob: bytes | memoryview, base_blob: bytes | memoryview
) -> np.ndarray | None:
    """Chunk ``cid`` rebuilt from the blobs of its delta and base (a uint8 array), or None if
    they do not decode to bytes with its id."""
    try:
        if ref.transform:
            raw = predict_blob(base_blob, ref.transform)
            codec.xor_into(raw, delta_blob)  # touches only the changed bytes if sparse
        else:
            raw = codec.decode_xor(delta_blob, base_blob)
    except (codec.CodecError, ValueError):
        return None
    return raw if ids.chunk_id(raw) == cid else None


def _rebuild_verified(store: ChunkStore, cid: bytes, ref: DeltaRef) -> bytes:
    """Chunk ``cid`` rebuilt from its delta and base read again verified, for a chunk whose
    blobs did not give its bytes: names the damaged part (and, on a cluster, reads the parts
    from another replica)."""
    parts = dict(store.read(list(dict.fromkeys((ref.delta, ref.base))), workers=1))
    return rebuild(cid, ref, parts[ref.delta], parts[ref.base])


def rebuild_on(
    store: ChunkStore,
    chunks: Mapping[bytes, tuple[int, int]],
    refs: Mapping[bytes, DeltaRef],
    old: Path,
    consume: Callable[[bytes, codec.RawBuffer], None],
    workers: int = 2,
) -> set[bytes]:
    """Rebuild delta-coded chunks (``chunks``: id -> (length, offset of its base's bytes in
    the file ``old``)) from their delta blobs and those bytes, fetching only the deltas; hand
    each, checked against its id, to ``consume`` (from ``workers`` threads). Returns the ids
    rebuilt: a chunk whose bytes do not check out is left for the caller to fetch whole."""
    users: dict[bytes, list[bytes]] = defaultdict(list)
    for cid in chunks:
        users[refs[cid].delta].append(cid)
    done: set[bytes] = set()
    fd = os.open(old, os.O_RDONLY)

    def rebuild(batch: list[tuple[bytes, bytes]]) -> None:
        for delta_id, blob in batch:
            for cid in users[delta_id]:
                length, offset = chunks[cid]
                raw = np.empty(length, np.uint8)
                if os.preadv(fd, [raw], offset) != length:
                    continue
                try:
                    codec.xor_into(raw, blob)
                except codec.CodecError:
                    continue
                if ids.chunk_id(raw) == cid:
                    consume(cid, raw)
                    done.add(cid)

    try:
        batches = by_size(store.get(list(users)), lambda pair: len(pair[1]), _BATCH_BYTES)
        for_each(rebuild, batches, workers, "chunk-rebase")
    finally:
        os.close(fd)
    return done


def fetch_size(length: int, ref: DeltaRef | None) -> int:
    """Raw bytes a read of a chunk of ``length`` bytes fetches: itself, or delta and base."""
    if ref is None:
        return length
    return length + base_length(length, ref.transform)
