"""Synthetic checkpoint series (safetensors, bf16 or fp32) for the demo, tests and benchmarks,
and PyTorch checkpoints written without torch.

Weights are normally distributed like trained ones; each next version rewrites a share of the
tensors, as fine-tuning a few layers does, and keeps the rest byte-identical.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from chunkstore.torch_index import STORAGE_DTYPES

DTYPES = {"bf16": ("BF16", 2), "fp32": ("F32", 4), "fp16": ("F16", 2)}


def weights(rng: np.random.Generator, count: int, dtype: str) -> np.ndarray:
    """``count`` normal weights (std 0.02) encoded as ``dtype``, as a flat array."""
    values = (rng.standard_normal(count, dtype=np.float32) * 0.02).astype(np.float32)
    if dtype == "fp32":
        return values
    if dtype == "fp16":
        return values.astype(np.float16)
    if dtype == "bf16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    raise ValueError(f"unknown dtype {dtype!r}")


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``name -> (safetensors dtype, shape, flat array)`` as a safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, _, data in tensors.values():
            f.write(data.tobytes())


_STORAGE_TYPES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def write_torch_checkpoint(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]
) -> None:
    """Write ``name -> (safetensors dtype, shape, flat array)`` as ``torch.save`` writes a
    state dict: a zip of ``archive/data.pkl`` (an OrderedDict of ``_rebuild_tensor_v2`` calls
    on persistent storages) and each storage's bytes as ``archive/data/KEY``, stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", _state_dict_pickle(tensors))
        archive.writestr("archive/byteorder", "little")
        for key, (_, _, data) in enumerate(tensors.values()):
            with archive.open(f"archive/data/{key}", "w", force_zip64=True) as member:
                member.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        archive.writestr("archive/version", "3\n")


def _state_dict_pickle(tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]) -> bytes:
    """The pickle (protocol 2) of a state dict of ``tensors``, storage keys 0, 1, ..."""
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", ordered_dict, b"("]
    for key, (name, (dtype, shape, data)) in enumerate(tensors.items()):
        strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
        storage = b"".join(
            [b"(", _text("storage"), _global("torch", _STORAGE_TYPES[dtype]), _text(str(key))]
            + [_text("cpu"), _int(data.size), b"tQ"]  # a tuple, as a persistent id
        )
        args = [storage, _int(0), _ints(shape), _ints(strides), b"\x89", ordered_dict]
        out += [_text(name), _global("torch._utils", "_rebuild_tensor_v2"), b"(", *args, b"tR"]
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    encoded = value.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _int(value: int) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # the opcode alone: ints are not memoized


def _ints(values: tuple[int, ...] | list[int]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def make_series(
    out_dir: Path,
    versions: int = 3,
    size_mb: float = 64,
    dtype: str = "bf16",
    changed_share: float = 0.1,
    tensor_mb: float = 4,
    seed: int = 0,
) -> list[Path]:
    """Write ``versions`` checkpoint directories ``out_dir/step-K/model.safetensors``.

    Version K+1 re-draws ``changed_share`` of the tensors of version K and bumps the step in
    the metadata (which changes the header); all other tensor bytes stay as they were.
    """
    st_dtype, itemsize = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    n_tensors = max(1, round(size_mb / tensor_mb))
    elems = int(tensor_mb * (1 << 20)) // itemsize
    cols = 1024 if elems >= 1024 else elems
    shape = (elems // cols, cols)
    tensors = {
        f"layers.{i}.weight": (st_dtype, shape, weights(rng, shape[0] * cols, dtype))
        for i in range(n_tensors)
    }
    names = list(tensors)
    paths = []
    for k in range(versions):
        if k:
            n_changed = max(1, round(changed_share * n_tensors))
            for name in rng.choice(names, size=n_changed, replace=False):
                tensors[name] = (st_dtype, shape, weights(rng, shape[0] * cols, dtype))
        step_dir = out_dir / f"step-{(k + 1) * 1000}"
        step_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(step_dir / "model.safetensors", tensors, {"step": str((k + 1) * 1000)})
        paths.append(step_dir)
    return paths


def bf16_from_f32(values: np.ndarray) -> np.ndarray:
    """fp32 values rounded to bfloat16 bit patterns (uint16), to nearest, ties to even, as
    torch's ``.to(torch.bfloat16)`` does (NaN becomes 0x7FC0)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(values)] = 0x7FC0
    return out


def f32_from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the fp32 values they are exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def optimizer_step(
    rng: np.random.Generator, flat: np.ndarray, dtype: str, lr: float = 1e-4
) -> np.ndarray:
    """``flat`` (weights encoded as ``dtype``) one optimizer step later: every weight moves by
    ``lr`` times a standard normal draw (Adam's steps are about ``lr`` per weight), computed in
    fp32 and stored back in ``dtype``, so bf16 weights change in their low mantissa bits, or
    not at all when the step is below half a unit in their last place."""
    step = (rng.standard_normal(flat.size, dtype=np.float32) * np.float32(lr)).astype(np.float32)
    if dtype == "bf16":
        return bf16_from_f32(f32_from_bf16(flat) - step)
    if dtype == "fp16":
        return (flat.astype(np.float32) - step).astype(np.float16)
    if dtype == "fp32":
        return (flat - step).astype(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")
