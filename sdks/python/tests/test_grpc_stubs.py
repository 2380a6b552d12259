"""The committed gRPC stubs (src/keel/_grpc/) are what scripts/gen_grpc.py generates from
proto/keel/v1/keel.proto today, so they cannot drift from the contract.

Needs grpcio-tools, pinned by the ``test`` extra: without it the test is skipped, or fails
under ``KEEL_REQUIRE_SERVICES=1`` (as in CI).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from support import require_module

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_grpc.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_grpc", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    require_module("grpc_tools", "'keel-sdk[test]' (it pins grpcio-tools)")
    gen = load_script()
    try:
        generated = gen.generate(tmp_path)
    except gen.GenerationError as e:
        pytest.fail(str(e), pytrace=False)
    assert sorted(p.name for p in generated) == sorted(
        p.name for p in gen.STUBS.glob("keel_v1_pb2*.py")
    )
    for path in generated:
        committed = gen.STUBS / path.name
        want = path.read_text(encoding="utf-8")
        have = committed.read_text(encoding="utf-8")
        if have != want:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        have.splitlines(keepends=True),
                        want.splitlines(keepends=True),
                        f"committed/{path.name}",
                        f"generated/{path.name}",
                    )
                )[:40]
            )
            pytest.fail(
                f"{committed} differs from what {gen.PROTO} generates: run "
                f"`python sdks/python/scripts/gen_grpc.py` and commit the result.\n{diff}",
                pytrace=False,
            )
