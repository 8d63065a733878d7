"""The generated protobuf code that is checked in matches what its .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto").rglob("*.proto"))


def test_there_are_protos():
    assert PROTOS, "no .proto files found under proto/"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_generated_code_matches_proto(proto: Path, tmp_path: Path):
    rel = proto.relative_to(ROOT / "proto")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    if "service " in proto.read_text():
        args.append(f"--grpc_python_out={tmp_path}")
    assert protoc.main([*args, str(proto)]) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, f"protoc generated nothing for {rel}"
    for out in generated:
        checked_in = ROOT / out
        assert checked_in.exists(), f"{out} is not checked in; regenerate with scripts/protoc.sh"
        assert checked_in.read_text() == (tmp_path / out).read_text(), (
            f"{out} drifted from {rel}; regenerate with scripts/protoc.sh"
        )
