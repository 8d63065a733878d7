"""Deltas against a base version: tensors stored as the XOR against the base's bytes (or a
prediction from them), rebuilt exactly on every read path, kept alive by GC, checked by verify."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from cluster_fixtures import LocalCluster
from conftest import random_bytes, tree_bytes, write
from test_cli import run

from chunkstore import codec, delta, ids, ingest
from chunkstore.client.cluster_store import ClusterStore
from chunkstore.errors import ChunkNotFound, CorruptChunk, CorruptRecord, InvalidInput
from chunkstore.model import DeltaRef, Manifest
from chunkstore.repository import Repository
from chunkstore.stores.memory import MemoryStore
from chunkstore.synthetic import (
    bf16_from_f32,
    f32_from_bf16,
    optimizer_step,
    weights,
    write_safetensors,
)

KB = 1024
F32_SPECIALS = np.array(
    [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38, 1.0],
    np.float32,
)


def model(seed: int = 0, dtype: str = "bf16", n: int = 3, kb: int = 256) -> dict:
    """``n`` weight tensors of ``kb`` KiB plus a small one, as safetensors specs."""
    rng = np.random.default_rng(seed)
    st, size = {"bf16": ("BF16", 2), "fp32": ("F32", 4), "fp16": ("F16", 2)}[dtype]
    count = kb * KB // size
    out = {f"layers.{i}.w": (st, (count // 64, 64), weights(rng, count, dtype)) for i in range(n)}
    out["norm"] = (st, (64,), weights(rng, 64, dtype))
    return out


def stepped(tensors: dict, seed: int, lr: float = 1e-4) -> dict:
    """Every weight of every tensor one optimizer step further."""
    rng = np.random.default_rng(seed)
    names = {"BF16": "bf16", "F32": "fp32", "F16": "fp16"}
    return {
        k: (d, s, optimizer_step(rng, f, names[d]) if d in names else f)
        for k, (d, s, f) in tensors.items()
    }


def save(root: Path, name: str, tensors: dict) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors)
    return path


def the_manifest(repo: Repository, ref: str) -> Manifest:
    return repo.manifest(repo.resolve(ref).file("model.safetensors"))


def assert_pulls(repo: Repository, ref: str, source: Path, dest: Path) -> None:
    repo.pull(ref, dest)
    assert tree_bytes(dest) == tree_bytes(source)


# -- round trips -------------------------------------------------------------------------------


def test_optimizer_step_round_trips_and_stores_far_less(repo: Repository, tmp_path):
    v1 = model()
    p1, p2 = save(tmp_path, "v1", v1), save(tmp_path, "v2", stepped(v1, 1))
    repo.push(p1, "m", tags=["v1"])
    with_deltas = repo.push(p2, "m", tags=["v2"])
    assert with_deltas.stats.delta_chunks > 0
    manifest = the_manifest(repo, "m@v2")
    assert manifest.deltas and all(ref.transform == "" for ref in manifest.deltas.values())

    other = Repository(MemoryStore())
    other.push(p1, "m")
    without = other.push(p2, "m", delta=False)
    assert without.stats.delta_chunks == 0 and not the_manifest(other, "m").deltas
    assert with_deltas.stats.new_stored_bytes < 0.6 * without.stats.new_stored_bytes
    # The file digest depends on the chunks only, not on how they are stored.
    assert with_deltas.version.files[0].digest == the_manifest(repo, "m@v2").digest

    assert_pulls(repo, "m@v1", p1, tmp_path / "out1")
    assert_pulls(repo, "m@v2", p2, tmp_path / "out2")
    assert_pulls(other, "m", p2, tmp_path / "out3")
    result = repo.verify()
    assert result.ok and result.deltas == len(set(manifest.delta_refs()))


def test_deltas_on_a_cluster(tmp_path):
    v1 = model(seed=40)
    p1, p2 = save(tmp_path, "v1", v1), save(tmp_path, "v2", stepped(v1, 41))
    with LocalCluster(tmp_path / "c", nodes=3, replicas=2) as cluster:
        repo = Repository(ClusterStore.connect(cluster.url))
        try:
            repo.push(p1, "m")
            assert repo.push(p2, "m").stats.delta_chunks > 0
            assert_pulls(repo, "m", p2, tmp_path / "out")
            assert repo.verify().ok
        finally:
            repo.close()


def test_fp32_and_fp16_steps_round_trip(repo: Repository, tmp_path):
    for dtype in ("fp32", "fp16"):
        v1 = model(seed=3, dtype=dtype, n=2)
        p1, p2 = save(tmp_path, f"{dtype}1", v1), save(tmp_path, f"{dtype}2", stepped(v1, 4))
        repo.push(p1, dtype)
        assert repo.push(p2, dtype).stats.delta_chunks > 0
        assert_pulls(repo, dtype, p2, tmp_path / f"out-{dtype}")


def test_special_values_and_odd_sizes_round_trip(repo: Repository, tmp_path):
    rng = np.random.default_rng(7)
    f32 = weights(rng, 40_001, "fp32")  # an odd number of elements
    f32[::97] = np.resize(F32_SPECIALS, f32[::97].shape)
    bf16 = bf16_from_f32(weights(rng, 30_001, "fp32"))
    bf16[::89] = bf16_from_f32(np.resize(F32_SPECIALS, bf16[::89].shape))
    raw = rng.integers(0, 256, 50_001, dtype=np.uint8)  # odd bytes, element size 1
    v1 = {
        "f32": ("F32", (40_001,), f32),
        "bf16": ("BF16", (30_001,), bf16),
        "bytes": ("U8", (50_001,), raw),
    }
    f32b = f32.copy()
    f32b[1::3] = np.nextafter(f32b[1::3], np.float32(np.inf))  # NaN stays NaN, inf stays inf
    bf16b = bf16.copy()
    bf16b[::2] ^= 1  # flips the lowest mantissa bit, also of NaN and inf patterns
    rawb = raw.copy()
    rawb[::5] ^= 0x80
    v2 = {
        "f32": ("F32", (40_001,), f32b),
        "bf16": ("BF16", (30_001,), bf16b),
        "bytes": ("U8", (50_001,), rawb),
    }
    p1, p2 = save(tmp_path, "v1", v1), save(tmp_path, "v2", v2)
    repo.push(p1, "m")
    assert repo.push(p2, "m").stats.delta_chunks > 0
    assert_pulls(repo, "m", p2, tmp_path / "out")
    got = repo.load_tensors("m", ["f32", "bf16", "bytes"])
    assert got["f32"].tobytes() == f32b.tobytes()
    assert got["bf16"].tobytes() == f32_from_bf16(bf16b).tobytes()
    assert got["bytes"].tobytes() == rawb.tobytes()


def test_load_tensors_and_open_read_delta_coded_tensors_exactly(repo: Repository, tmp_path):
    v1 = model(seed=1)
    v2 = stepped(v1, 2)
    repo.push(save(tmp_path, "v1", v1), "m")
    repo.push(save(tmp_path, "v2", v2), "m")
    assert the_manifest(repo, "m").deltas
    got = repo.load_tensors("m", "layers.*")
    for name, array in got.items():
        assert array.tobytes() == f32_from_bf16(v2[name][2]).tobytes()
    lazy = repo.open_safetensors("m", "model.safetensors")
    assert lazy.raw("layers.1.w") == v2["layers.1.w"][2].tobytes()
    data = (tmp_path / "v2" / "model.safetensors").read_bytes()
    with repo.open("m", "model.safetensors") as f:
        f.seek(100_003)
        assert f.read(300_001) == data[100_003:400_004]


def test_tensor_diff_of_delta_coded_versions(repo: Repository, tmp_path):
    v1 = model(seed=2)
    v2 = dict(v1)
    v2["layers.0.w"] = stepped(v1, 3)["layers.0.w"]
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"])
    repo.push(save(tmp_path, "v2", v2), "m", tags=["v2"])
    (diff,) = repo.tensor_diff("m@v1", "m@v2", stats=True)
    assert [c.name for c in diff.changed] == ["layers.0.w"] and diff.unchanged == 3
    assert diff.changed[0].bytes_changed > 0 and 0 < diff.changed[0].relative_l2 < 0.05


def test_status_of_pushed_files_is_unchanged(repo: Repository, tmp_path):
    v1 = model(seed=4)
    repo.push(save(tmp_path, "v1", v1), "m")
    p2 = save(tmp_path, "v2", stepped(v1, 5))
    repo.push(p2, "m")
    assert repo.status(p2, "m").unchanged == 1
    write_safetensors(p2 / "model.safetensors", stepped(v1, 6))
    assert [c.path for c in repo.status(p2, "m").modified] == ["model.safetensors"]


# -- chains, bases, exports ---------------------------------------------------------------------


def test_chain_depth_stays_one_over_five_versions(repo: Repository, tmp_path):
    tensors = model(seed=5)
    paths = []
    for k in range(5):
        if k:
            tensors = stepped(tensors, 10 + k)
        paths.append(save(tmp_path, f"v{k}", tensors))
        repo.push(paths[-1], "m", tags=[f"v{k}"])
    delta_coded: set[bytes] = set()
    manifests = [the_manifest(repo, f"m@v{k}") for k in range(5)]
    for m in manifests:
        delta_coded.update(m.delta_refs())
    plain = {cid for m in manifests for i, (cid, _) in enumerate(m.chunks) if i not in m.deltas}
    for m in manifests[1:]:
        assert m.deltas
        for ref in m.deltas.values():
            assert ref.base in plain and ref.base not in delta_coded  # bases are keyframes
    # Every version codes against the first one's chunks (the keyframes) while that pays.
    first = {cid for cid, _ in manifests[0].chunks}
    assert {ref.base for ref in manifests[4].deltas.values()} <= first
    assert repo.store.missing(list(plain)) == set()
    assert_pulls(repo, "m@v4", paths[4], tmp_path / "out")


def test_a_delta_that_stops_paying_makes_a_new_keyframe(repo: Repository, tmp_path):
    v1 = model(seed=6)
    repo.push(save(tmp_path, "v1", v1), "m")
    v2 = model(seed=7)  # other weights: the XOR is no smaller than the weights themselves
    v2["layers.0.w"] = stepped(v1, 8)["layers.0.w"]
    repo.push(save(tmp_path, "v2", v2), "m")
    m2 = the_manifest(repo, "m")
    tensor = {t.name: t for t in m2.tensors}["layers.1.w"]
    offsets = m2.offsets()
    inside = [i for i, o in enumerate(offsets) if tensor.begin <= o < tensor.end]
    assert inside and not any(i in m2.deltas for i in inside)
    assert repo.store.missing([m2.chunks[i][0] for i in inside]) == set()
    # v3 one step after v2 codes against v2's new keyframes.
    p3 = save(tmp_path, "v3", stepped(v2, 9))
    repo.push(p3, "m")
    m3 = the_manifest(repo, "m")
    keyframes = {m2.chunks[i][0] for i in inside}
    assert {m3.deltas[i].base for i in inside if i in m3.deltas} <= keyframes
    assert any(i in m3.deltas for i in inside)
    assert_pulls(repo, "m", p3, tmp_path / "out")


def test_unchanged_tensor_reuses_the_base_delta(repo: Repository, tmp_path):
    v1 = model(seed=8)
    v2 = stepped(v1, 9)
    repo.push(save(tmp_path, "v1", v1), "m")
    repo.push(save(tmp_path, "v2", v2), "m")
    p3 = save(tmp_path, "v3", v2)  # the same tensors again, pushed after v2
    result = repo.push(p3, "m")
    assert result.stats.new_chunks == 0
    m2, m3 = the_manifest(repo, "m@" + repo.log("m")[1].short_id), the_manifest(repo, "m")
    assert m3.chunks == m2.chunks and m3.deltas == m2.deltas
    assert_pulls(repo, "m", p3, tmp_path / "out")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_export_of_stored_fp32_costs_almost_nothing(
    repo: Repository, tmp_path, dtype
):
    fp32 = model(seed=9, dtype="fp32", n=4)
    fp32["layers.0.w"][2][::101] = np.resize(F32_SPECIALS, fp32["layers.0.w"][2][::101].shape)
    repo.push(save(tmp_path, "fp32", fp32), "m")
    half = {}
    for name, (_, shape, flat) in fp32.items():
        if dtype == "bf16":
            half[name] = ("BF16", shape, bf16_from_f32(flat))
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                half[name] = ("F16", shape, flat.astype(np.float16))
    p2 = save(tmp_path, dtype, half)
    result = repo.push(p2, "m")
    size = result.version.size
    assert result.stats.new_stored_bytes < 0.05 * size, result.stats
    transforms = {ref.transform for ref in the_manifest(repo, "m").deltas.values()}
    assert transforms == {"bf16_from_f32" if dtype == "bf16" else "f16_from_f32"}
    assert_pulls(repo, "m", p2, tmp_path / "out")
    assert repo.verify().ok


def test_fine_tune_codes_against_its_input_model(repo: Repository, tmp_path):
    base = model(seed=10)
    repo.push(save(tmp_path, "base", base), "llama", tags=["v1"])
    tuned = save(tmp_path, "ft", stepped(base, 11))
    result = repo.push(tuned, "llama-ft", inputs=["llama@v1"])  # a new repo: no latest
    assert result.stats.delta_chunks > 0
    assert_pulls(repo, "llama-ft", tuned, tmp_path / "out")


def test_delta_base_and_no_delta(repo: Repository, tmp_path):
    v1 = model(seed=12)
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"])
    repo.push(save(tmp_path, "other", model(seed=13)), "m", tags=["other"])
    p3 = save(tmp_path, "v3", stepped(v1, 14))
    # The latest version is unrelated: only the named base finds anything to code against.
    assert repo.push(p3, "m", delta_base="m@v1").stats.delta_chunks > 0
    assert repo.push(p3, "m", delta=False, tags=["plain"]).stats.delta_chunks == 0
    assert not the_manifest(repo, "m@plain").deltas
    with pytest.raises(InvalidInput, match="contradict"):
        repo.push(p3, "m", delta_base="m@v1", delta=False)


def test_stages_code_deltas_and_commit(repo: Repository, tmp_path):
    v1 = model(seed=15)
    repo.push(save(tmp_path, "v1", v1), "m")
    p2 = save(tmp_path, "v2", stepped(v1, 16))
    stage = repo.stage("m", message="rank save")
    stage.add(p2 / "model.safetensors")
    version = stage.commit()
    assert the_manifest(repo, f"m@{version.short_id}").deltas
    assert_pulls(repo, "m", p2, tmp_path / "out")


# -- damage, gc, verify -------------------------------------------------------------------------


def _pushed_pair(repo: Repository, tmp_path: Path) -> tuple[Path, Manifest]:
    v1 = model(seed=20)
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"])
    p2 = save(tmp_path, "v2", stepped(v1, 21))
    repo.push(p2, "m", tags=["v2"])
    return p2, the_manifest(repo, "m@v2")


def test_a_remote_store_hands_rebuilt_chunks_over_on_the_decoding_threads(tmp_path):
    """A store across the network is read in one fetch; the chunks go to ``consume`` on the
    threads that rebuild them, each once, and an error there ends the read."""
    store = MemoryStore()
    store.remote = True
    p2, manifest = _pushed_pair(Repository(store), tmp_path)
    data = p2.joinpath("model.safetensors").read_bytes()
    offsets = dict(zip([cid for cid, _ in manifest.chunks], manifest.offsets(), strict=False))
    got: dict[bytes, bytes] = {}
    threads = set()

    def keep(cid: bytes, raw: codec.RawBuffer) -> None:
        assert cid not in got
        got[cid] = bytes(raw)
        threads.add(threading.current_thread())

    chunk_ids = [cid for cid, _ in manifest.chunks]
    delta.read_chunks_into(store, chunk_ids, manifest.delta_refs(), keep)
    assert got.keys() == set(chunk_ids)
    assert all(data[offsets[cid] : offsets[cid] + len(raw)] == raw for cid, raw in got.items())
    assert threading.current_thread() not in threads

    def disk_full(cid: bytes, raw: codec.RawBuffer) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        delta.read_chunks_into(store, chunk_ids, manifest.delta_refs(), disk_full)


def test_push_asks_the_store_only_about_chunks_its_base_does_not_hold(repo: Repository, tmp_path):
    v1 = model(seed=50, n=4)
    repo.push(save(tmp_path, "v1", v1), "m")
    base_ids = set(the_manifest(repo, "m").stored_ids())
    v2 = dict(v1, **{"layers.1.w": model(seed=51, n=2)["layers.1.w"]})  # one tensor rewritten
    p2 = save(tmp_path, "v2", v2)
    asked: list[bytes] = []
    real = repo.store.lacking
    repo.store.lacking = lambda chunk_ids: asked.extend(chunk_ids) or real(chunk_ids)
    result = repo.push(p2, "m")
    assert asked and not set(asked) & base_ids
    assert len(asked) <= result.stats.new_chunks + 2  # the rewritten tensor, the header
    assert_pulls(repo, "m", p2, tmp_path / "out")


def test_a_push_of_plain_files_reads_no_base_manifest(repo: Repository, tmp_path):
    tree = tmp_path / "logs"
    for i in range(5):
        write(tree / f"rank{i}.log", random_bytes(40_000, seed=i))
    repo.push(tree, "m")
    write(tree / "rank0.log", random_bytes(40_000, seed=9))
    read: list[bytes] = []
    real = repo.store.get_manifests
    repo.store.get_manifests = lambda manifest_ids: read.extend(manifest_ids) or real(manifest_ids)
    repo.push(tree, "m")
    assert read == []
    # A file with tensors among them reads the base's manifests, once.
    save(tree, "ckpt", model(seed=53, n=1))
    repo.push(tree, "m")
    assert len(read) == len(repo.resolve("m~").files)
    assert_pulls(repo, "m", tree, tmp_path / "out")


def test_push_stores_again_base_chunks_lost_from_the_store(repo: Repository, tmp_path):
    v1 = model(seed=52, n=3)
    repo.push(save(tmp_path, "v1", v1), "m", tags=["v1"])
    base = the_manifest(repo, "m@v1")
    v2 = dict(v1, **{"layers.0.w": stepped(v1, 53)["layers.0.w"]})  # coded against v1
    p2 = save(tmp_path, "v2", v2)
    offsets = base.offsets()
    tensor = {t.name: t for t in base.tensors}
    stepped_chunks = [
        cid
        for (cid, _), at in zip(base.chunks, offsets, strict=True)
        if tensor["layers.0.w"].begin <= at < tensor["layers.0.w"].end
    ]
    kept_chunks = [
        cid
        for (cid, _), at in zip(base.chunks, offsets, strict=True)
        if tensor["layers.2.w"].begin <= at < tensor["layers.2.w"].end
    ]
    lost = [stepped_chunks[0], kept_chunks[0]]  # a keyframe, and a chunk v2 shares with v1
    assert repo.store.delete(lost[1:]) == 1  # lost before the push
    real_put, real_mark = repo.store.put, repo.store.mark_wanted
    coded = threading.Event()

    def put_then_collect(chunks):  # the deltas were coded: then the keyframe is taken
        added = real_put(chunks)
        if not coded.is_set():
            assert repo.store.delete(lost[:1]) == 1
            coded.set()
        return added

    def mark_once_collected(chunk_ids):  # the marks go out beside the writer: let them wait
        assert coded.wait(timeout=10)
        return real_mark(chunk_ids)

    repo.store.put, repo.store.mark_wanted = put_then_collect, mark_once_collected
    result = repo.push(p2, "m", tags=["v2"])
    assert repo.store.missing([kept_chunks[0]]) == set()  # stored again from the file
    manifest = the_manifest(repo, "m@v2")
    assert all(ref.base not in lost for ref in manifest.deltas.values())
    assert result.stats.delta_chunks > 0
    assert_pulls(repo, "m@v2", p2, tmp_path / "out")
    assert repo.verify("m@v2").ok


def test_missing_base_fails_pull_naming_it_and_verify_reports_it(repo: Repository, tmp_path):
    _, manifest = _pushed_pair(repo, tmp_path)
    ref = next(iter(manifest.deltas.values()))
    assert repo.store.delete([ref.base]) == 1
    with pytest.raises(ChunkNotFound) as info:
        repo.pull("m@v2", tmp_path / "out")
    assert info.value.chunk_id == ref.base
    assert not (tmp_path / "out" / "model.safetensors").exists()
    result = repo.verify("m@v2")
    assert not result.ok and result.missing == [ref.base]


def test_damaged_delta_is_named_and_reported(tmp_path):
    store = MemoryStore()
    repo = Repository(store)
    _, manifest = _pushed_pair(repo, tmp_path)
    x, ref = next(iter(manifest.delta_refs().items()))
    raw = codec.decode(store._chunks[ref.delta])
    store._chunks[ref.delta] = codec.encode(bytes([raw[0] ^ 1]) + raw[1:])  # bit rot
    with pytest.raises(CorruptChunk) as info:
        repo.pull("m@v2", tmp_path / "out")
    assert info.value.chunk_id == ref.delta
    result = repo.verify()
    assert ref.delta in result.corrupt and x not in result.corrupt


def test_rebuilt_chunk_that_does_not_match_is_named():
    store = MemoryStore()
    data, base = b"\x01" * 4096, b"\x03" * 4096
    diff = delta.xor(data, delta.predict(base, "")).tobytes()
    store.put([(ids.chunk_id(diff), codec.encode(diff)), (ids.chunk_id(base), codec.encode(base))])
    wrong = ids.chunk_id(b"\x00" * 4096)
    refs = {wrong: DeltaRef(ids.chunk_id(diff), ids.chunk_id(base))}
    with pytest.raises(CorruptChunk) as info:
        list(delta.read_chunks(store, [wrong], refs))
    assert info.value.chunk_id == wrong
    right = ids.chunk_id(data)
    got = dict(delta.read_chunks(store, [right], {right: refs[wrong]}))
    assert got == {right: data}


def test_gc_keeps_the_bases_deltas_need(repo: Repository, tmp_path, capsys):
    p2, manifest = _pushed_pair(repo, tmp_path)
    repo.rm("m@v1")
    result = repo.gc(grace_seconds=0)
    assert result.deleted_chunks > 0  # v1's chunk of small tensors, which nothing needs
    needed = manifest.stored_ids()
    assert repo.store.missing(needed) == set()
    assert_pulls(repo, "m", p2, tmp_path / "out")
    assert repo.verify().ok


# -- units --------------------------------------------------------------------------------------


def test_bf16_prediction_rounds_like_torch():
    bits = np.array(
        [
            0x3F800000,  # 1.0
            0x3F808000,  # tie, even: stays
            0x3F818000,  # tie, odd: rounds up
            0x3F80C000,  # above half: up
            0x7F7FFFFF,  # max float: overflows to inf
            0x7F800000,  # inf
            0xFF800000,  # -inf
            0x7FC00001,  # NaN
            0xFFFFFFFF,  # negative NaN with all payload bits
            0x00000001,  # smallest denormal: rounds to +0
            0x807FFFFF,  # largest negative denormal: rounds to the bf16 denormal
        ],
        np.uint32,
    )
    want = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7F80, 0xFF80, 0x7FC0, 0x7FC0, 0x0000, 0x8080]
    got = delta.predict(bits.tobytes(), "bf16_from_f32").view("<u2").tolist()
    assert got == want
    assert bf16_from_f32(bits.view(np.float32)).tolist() == want


def test_bf16_prediction_from_byte_planes_matches():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, 50_000, dtype=np.uint64).astype(np.uint32)
    bits[::7] = (bits[::7] & 0xFFFF0000) | 0x8000  # ties, odd and even
    bits[::11] = np.resize(F32_SPECIALS, bits[::11].shape).view(np.uint32)
    bits[::13] |= 0x7F800000  # inf and NaN patterns with all kinds of payloads
    raw = bits.tobytes()
    want = delta.predict(raw, "bf16_from_f32").tobytes()
    blob = codec.encode_as(raw, codec.PLANES4)
    assert delta.predict_blob(blob, "bf16_from_f32").tobytes() == want
    assert delta.predict_blob(codec.encode_as(raw, codec.ZSTD), "bf16_from_f32").tobytes() == want


def test_f16_prediction_is_numpy_astype():
    values = np.concatenate([F32_SPECIALS, np.float32([70000.0, 1e-8, 0.1])])
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(np.float16).tobytes()
    assert delta.predict(values.tobytes(), "f16_from_f32").tobytes() == want


def test_relations_and_composition():
    assert delta.relation("BF16", "BF16") == "" and delta.relation("F32", "BF16") is None
    assert delta.relation("BF16", "F32") == "bf16_from_f32"
    assert delta.compose("", "bf16_from_f32") == "bf16_from_f32"
    assert delta.compose("bf16_from_f32", "") == "bf16_from_f32"
    assert delta.compose("bf16_from_f32", "f16_from_f32") is None


def test_manifest_keeps_deltas_and_rejects_malformed_ones():
    a, b, c = (ids.chunk_id(bytes([i])) for i in range(3))
    manifest = Manifest(8, [(a, 4), (b, 4)], deltas={1: DeltaRef(c, a, "bf16_from_f32")})
    mid, data = manifest.encode()
    back = Manifest.decode(mid, data)
    assert back == manifest and back.stored_ids() == [a, c]
    assert back.digest == Manifest(8, [(a, 4), (b, 4)]).digest
    bad = Manifest(8, [(a, 4), (b, 4)], deltas={1: DeltaRef(c, a, "rot13")})
    with pytest.raises(CorruptRecord, match="unknown delta transform"):
        Manifest.decode(*bad.encode())
    short = Manifest(8, [(a, 4), (b, 4)], deltas={1: DeltaRef(c[:5], a)})
    with pytest.raises(CorruptRecord, match="malformed delta"):
        Manifest.decode(*short.encode())
    with pytest.raises(CorruptRecord, match="does not match its id"):
        Manifest.decode(mid, data + b"\0")
    with pytest.raises(CorruptRecord, match="does not parse"):
        Manifest.decode(ids.record_id(b"\xff\xff"), b"\xff\xff")


@pytest.mark.parametrize("length", [0, 1, 7, 4096, 65_537, 200_001])
def test_decode_xor_matches_xor_of_decodes(length):
    rng = np.random.default_rng(length)
    base = bf16_from_f32(weights(rng, length // 2 + 1, "fp32")).tobytes()[:length]
    near = bytearray(base)
    for i in range(0, length, 37):
        near[i] ^= 1
    sparse = bytes(a ^ b for a, b in zip(near, base, strict=True))
    for x, y in [(sparse, base), (base, sparse), (sparse, sparse), (near, base)]:
        for size in (None, 2, 4):
            bx, by = codec.encode(x, size), codec.encode(y, size)
            want = bytes(p ^ q for p, q in zip(x, y, strict=True))
            assert codec.decode_xor(bx, by).tobytes() == want
            target = np.frombuffer(bytearray(y), np.uint8)
            codec.xor_into(target, bx)
            assert target.tobytes() == want
    with pytest.raises(codec.CodecError):
        codec.decode_xor(codec.encode(base), codec.encode(base + b"x"))


def _xor_pair_cases() -> list[tuple[bytes, bytes]]:
    """Raw (x, y) pairs whose blobs take every path of decode_xor_many."""
    rng = np.random.default_rng(9)
    base = bf16_from_f32(weights(rng, 20_000, "fp32")).tobytes()
    near = bytearray(base)
    near[::37] = bytes(b ^ 1 for b in near[::37])
    diff = bytes(a ^ b for a, b in zip(near, base, strict=True))
    return [(diff, base), (base, diff), (diff[:-1], base[:-1]), (near, base), (diff, diff)]


def _frame_damaged(blob: bytes) -> bytes:
    """``blob`` with the magic number of its first zstd frame broken."""
    at = blob.index(b"\x28\xb5\x2f\xfd")
    return blob[:at] + b"\0" + blob[at + 1 :]


def test_decode_xor_many_matches_decode_xor():
    pairs, wants = [], []
    for x, y in _xor_pair_cases():
        want = bytes(p ^ q for p, q in zip(x, y, strict=True))
        for bx, by in [
            (codec.encode(x, 2), codec.encode(y, 2)),  # planes of both: decoded in one call
            (codec.encode_as(x, codec.PLANES4), codec.encode(y, 2)),  # planes of two sizes
            (codec.encode_as(x, codec.ZSTD), codec.encode_as(y, codec.RAW)),  # no planes
        ]:
            pairs.append((bx, by))
            wants.append(want)
    assert [out.tobytes() for out in codec.decode_xor_many(pairs)] == wants
    assert codec.decode_xor_many([]) == []


def test_decode_xor_many_gives_none_for_bad_pairs_only():
    (x, y), (u, v) = _xor_pair_cases()[:2]
    good, other = (codec.encode(x, 2), codec.encode(y, 2)), (codec.encode(u, 2), codec.encode(v, 2))
    assert b"\x28\xb5\x2f\xfd" in good[1]  # the base's exponent plane is zstd
    bad = [
        (good[0], _frame_damaged(good[1])),  # fails the one call for all: pairs decode alone
        (good[0], codec.encode(y + b"xy", 2)),  # raw lengths differ
        (b"\x09" + good[0][1:], good[1]),  # unknown codec
        (good[0], good[1][:-1]),  # truncated
    ]
    got = codec.decode_xor_many([good, *bad, other])
    assert got[0].tobytes() == bytes(p ^ q for p, q in zip(x, y, strict=True))
    assert got[-1].tobytes() == bytes(p ^ q for p, q in zip(u, v, strict=True))
    assert got[1:-1] == [None] * len(bad)
    for pair in bad:
        with pytest.raises(codec.CodecError):
            codec.decode_xor(*pair)


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda repo, tmp_path: repo.pull("m@v2", tmp_path / "out"), id="pull"),
        pytest.param(lambda repo, tmp_path: repo.load_tensors("m@v2", "*"), id="load_tensors"),
    ],
)
def test_reads_name_a_delta_whose_frame_is_damaged(tmp_path, read):
    store = MemoryStore()
    repo = Repository(store)
    _, manifest = _pushed_pair(repo, tmp_path)
    ref = next(
        r for r in manifest.delta_refs().values() if b"\x28\xb5\x2f\xfd" in store._chunks[r.delta]
    )
    store._chunks[ref.delta] = _frame_damaged(store._chunks[ref.delta])
    with pytest.raises(CorruptChunk) as info:
        read(repo, tmp_path)
    assert info.value.chunk_id == ref.delta


def _special_values(dtype: str, n: int, seed: int) -> bytes:
    """``n`` floats mixing NaN (quiet and signalling), inf, denormals, zeros of both signs
    and normal values, as little-endian bytes."""
    rng = np.random.default_rng(seed)
    size = 2 if dtype == "bf16" else 4
    values = rng.normal(0, 0.02, n).astype("<f4")
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 3e38], "<f4")
    values[rng.integers(0, n, n // 8)] = rng.choice(specials, n // 8)
    words = values.view("<u4")
    words[rng.integers(0, n, n // 64)] = 0x7F800001  # a signalling NaN
    return (words >> 16).astype("<u2").tobytes() if size == 2 else words.tobytes()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_decode_xor_many_is_exact_on_special_values_and_odd_slices(dtype):
    size = 2 if dtype == "bf16" else 4
    old = _special_values(dtype, 30_001, 1)
    new = bytearray(old)
    new[::7] = bytes(b ^ 3 for b in new[::7])  # low bits nudged, like a step
    new[size - 1 :: 97] = bytes(b ^ 0x80 for b in new[size - 1 :: 97])  # some signs flipped
    diff = bytes(a ^ b for a, b in zip(new, old, strict=True))
    pairs, wants = [], []
    for start, end in [(0, len(old)), (1, len(old)), (3, len(old) - 2), (5, 5 + 3 * size + 1)]:
        x, y = diff[start:end], old[start:end]  # odd lengths and odd alignment
        pairs.append((codec.encode(x, size), codec.encode(y, size)))
        wants.append(bytes(p ^ q for p, q in zip(x, y, strict=True)))
    assert [out.tobytes() for out in codec.decode_xor_many(pairs)] == wants
    assert [codec.decode_xor(*pair).tobytes() for pair in pairs] == wants


def test_sparse_planes_round_trip_and_reject_damage():
    plane = np.zeros(70_000 * 2, np.uint8)  # planes above 65536 bytes use 4-byte positions
    plane[3::1001] = 7
    for raw in (plane.tobytes(), plane[: 2 * 30_000 + 1].tobytes()):
        blob = codec.encode(raw, 2)
        assert codec.codec_name(blob) == "planes2" and len(blob) < len(raw) // 20
        assert codec.decode(blob) == raw
    blob = bytearray(codec.encode(plane[:4096].tobytes(), 2))
    assert blob[5] == codec.PLANE_SPARSE or blob[10] == codec.PLANE_SPARSE
    for i in range(15, len(blob)):
        damaged = bytes(blob[:i]) + bytes([blob[i] ^ 0xFF]) + bytes(blob[i + 1 :])
        try:
            out = codec.decode(damaged)
        except codec.CodecError:
            continue
        assert len(out) == 4096  # decodable garbage is caught by the id check


def test_cli_delta_flags(env_store, tmp_path, capsys):
    v1 = model(seed=30)
    p1 = save(tmp_path, "v1", v1)
    assert run(capsys, "push", str(p1), "--repo", "m", "--tag", "v1", "-q")[0] == 0
    p2 = save(tmp_path, "other", model(seed=31))
    assert run(capsys, "push", str(p2), "--repo", "m", "-q")[0] == 0
    p3 = save(tmp_path, "v3", stepped(v1, 32))
    code, out, _ = run(capsys, "push", str(p3), "--repo", "m", "--delta-base", "m@v1", "--json")
    assert code == 0 and json.loads(out)["delta_chunks"] > 0
    code, out, _ = run(capsys, "push", str(p3), "--repo", "m", "--no-delta", "--json")
    assert code == 0 and json.loads(out)["delta_chunks"] == 0
    code, out, _ = run(capsys, "push", str(p3), "--repo", "m", "--delta-base", "m@v1")
    assert code == 0 and "as deltas" in out
    with pytest.raises(SystemExit) as info:
        run(capsys, "push", str(p3), "--repo", "m", "--delta-base", "m@v1", "--no-delta")
    assert info.value.code == 2
    code, _, err = run(capsys, "push", str(p3), "--repo", "m", "--delta-base", "m@nope")
    assert code == 3 and "nope" in err
    code, out, _ = run(capsys, "verify", "--json")
    assert code == 0 and json.loads(out)["deltas"] > 0
    code, _, _ = run(capsys, "pull", "m", str(tmp_path / "out"), "-q")
    assert code == 0 and tree_bytes(tmp_path / "out") == tree_bytes(p3)


def _group(store: MemoryStore, new: list[bytes], bases: list[bytes], tensor: str) -> list:
    """An encoding task's chunks, each paired with the stored base chunk at the same index."""
    group = []
    for data, base in zip(new, bases, strict=True):
        base_id = ids.chunk_id(base)
        store.put([(base_id, codec.encode(base, 2))])
        key = ingest._Keyframe(base_id, "", len(base), tensor)
        group.append((ids.chunk_id(data), memoryview(data), 2, key))
    return group


def _encoded_bytes(store: MemoryStore, encoded: list[delta.Encoded]) -> list[bytes]:
    store.put([(e.store_id, e.blob) for e in encoded])
    refs = {e.chunk_id: e.ref for e in encoded if e.ref is not None}
    out = dict(delta.read_chunks(store, [e.chunk_id for e in encoded], refs))
    return [out[e.chunk_id] for e in encoded]


def test_delta_beating_the_base_blob_size_is_kept_without_encoding_the_chunk_alone(monkeypatch):
    rng = np.random.default_rng(44)
    base = weights(rng, 32 * KB, "bf16").tobytes()
    new = optimizer_step(rng, np.frombuffer(base, "<u2"), "bf16").tobytes()
    base_blob = codec.encode(base, 2)
    expected = delta.encode_chunk(ids.chunk_id(new), new, 2, (ids.chunk_id(base), base, ""))
    assert expected.ref is not None  # a nudged chunk pays as a delta
    calls = []
    monkeypatch.setattr(codec, "estimate", lambda *a: calls.append("estimate"))
    monkeypatch.setattr(codec, "encode", lambda *a: calls.append("encode"))
    hinted = delta.encode_chunk(
        ids.chunk_id(new), new, 2, (ids.chunk_id(base), base, ""), len(base_blob)
    )
    assert calls == [] and hinted == expected


def test_delta_not_beating_the_chunk_alone_is_dropped_whatever_the_base_blob_size():
    rng = np.random.default_rng(45)
    base = rng.bytes(64 * KB)  # incompressible: its blob is as large as it
    new = bytes(64 * KB)  # zeros: the XOR is the base's bytes, the chunk alone is tiny
    encoded = delta.encode_chunk(
        ids.chunk_id(new), new, 2, (ids.chunk_id(base), base, ""), len(codec.encode(base, 2))
    )
    assert encoded.ref is None and encoded.blob == codec.encode(new, 2)


def _reads(store: MemoryStore, monkeypatch) -> list[list[bytes]]:
    """The ids of each keyframe read the store is asked for, in order."""
    calls: list[list[bytes]] = []
    real = store.with_blobs
    monkeypatch.setattr(
        store, "with_blobs", lambda ids, fn: calls.append(list(ids)) or real(ids, fn)
    )
    return calls


def test_encoding_task_stops_trying_deltas_of_a_rewritten_tensor(monkeypatch):
    rng = np.random.default_rng(40)
    chunks = [weights(rng, 32 * KB, "bf16").tobytes() for _ in range(12)]
    nudged = [optimizer_step(rng, np.frombuffer(c, "<u2"), "bf16").tobytes() for c in chunks[:6]]
    rewritten = [weights(rng, 32 * KB, "bf16").tobytes() for _ in range(6)]
    store = MemoryStore()
    group = _group(store, nudged, chunks[:6], "a") + _group(store, rewritten, chunks[6:], "b")
    decoded = []
    real = codec.verified_buffer
    monkeypatch.setattr(codec, "verified_buffer", lambda c, b: decoded.append(c) or real(c, b))
    calls = _reads(store, monkeypatch)
    encoded = ingest._encode_group(store, group)
    assert [e.ref is not None for e in encoded] == [True] * 6 + [False] * 6
    assert len(decoded) == 6 + 2  # tensor b: two tries, then its keyframes are not decoded
    keys = [key.id for *_, key in group]
    assert calls == [keys[:2] + keys[6:8], keys[2:6]]  # the probes of both, then the rest of a
    assert _encoded_bytes(store, encoded) == nudged + rewritten


def test_encoding_task_follows_the_push_s_outcomes_so_far(monkeypatch):
    rng = np.random.default_rng(43)
    bases = [weights(rng, 32 * KB, "bf16").tobytes() for _ in range(8)]
    new = [optimizer_step(rng, np.frombuffer(b, "<u2"), "bf16").tobytes() for b in bases]
    store = MemoryStore()
    group = _group(store, new[:4], bases[:4], "paid") + _group(store, new[4:], bases[4:], "lost")
    calls = _reads(store, monkeypatch)
    encoded = ingest._encode_group(store, group, {"paid": [1, 0], "lost": [0, 2]})
    keys = [key.id for *_, key in group]
    assert calls == [keys[:4]]  # all of the paying tensor in one read, none of the other
    assert [e.ref is not None for e in encoded] == [True] * 4 + [False] * 4
    assert _encoded_bytes(store, encoded) == new


def test_encoding_task_with_a_keyframe_gone_stores_its_chunks_whole():
    rng = np.random.default_rng(41)
    bases = [weights(rng, 32 * KB, "bf16").tobytes() for _ in range(3)]
    new = [optimizer_step(rng, np.frombuffer(b, "<u2"), "bf16").tobytes() for b in bases]
    store = MemoryStore()
    group = _group(store, new, bases, "a")
    store.delete([ids.chunk_id(bases[1])])
    encoded = ingest._encode_group(store, group)
    assert all(e.ref is None and e.store_id == e.chunk_id for e in encoded)
    assert _encoded_bytes(store, encoded) == new
