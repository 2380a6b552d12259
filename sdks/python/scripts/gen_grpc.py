"""Regenerates the SDK's gRPC stubs (src/keel/_grpc/) from proto/keel/v1/keel.proto.

    python sdks/python/scripts/gen_grpc.py [--out DIR]

Run it after changing the .proto and commit the result; tests/test_grpc_stubs.py fails
while the committed stubs differ from what this script generates.

- The .proto is compiled as a copy named ``keel_v1.proto``: compiled as
  ``keel/v1/keel.proto`` its modules would be ``keel.v1.…``, inside the SDK's own package
  ``keel``. The proto package, and so every method's path, stays ``keel.v1``.
- protoc's service module imports the message module by its top-level name
  (``import keel_v1_pb2``), which only works with the stubs' directory on ``sys.path``; it
  is rewritten to a package-relative import.
- The generator is pinned (:data:`GRPC_TOOLS_VERSION`, the ``test`` extra installs it): its
  output changes between releases, and the code of 1.62 (protobuf 4.25's) is the newest
  that still loads with the oldest runtimes the ``grpc`` extra accepts (grpcio 1.60,
  protobuf 4.25); later generators emit code that refuses any runtime older than
  themselves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import List

#: The grpcio-tools release the committed stubs come from.
GRPC_TOOLS_VERSION = "1.62.3"

SDK = Path(__file__).resolve().parents[1]
PROTO = SDK.parents[1] / "proto" / "keel" / "v1" / "keel.proto"
STUBS = SDK / "src" / "keel" / "_grpc"
MESSAGES = "keel_v1_pb2.py"
SERVICES = "keel_v1_pb2_grpc.py"

HEADER = (
    "# Generated from proto/keel/v1/keel.proto by sdks/python/scripts/gen_grpc.py "
    f"(grpcio-tools {GRPC_TOOLS_VERSION}).\n"
    "# Do not edit: change the .proto and run the script.\n"
)
TOP_LEVEL_IMPORT = "import keel_v1_pb2 as keel__v1__pb2\n"
RELATIVE_IMPORT = "from . import keel_v1_pb2 as keel__v1__pb2\n"


class GenerationError(Exception):
    """The stubs could not be generated as committed (wrong generator, protoc failed)."""


def generate(out: Path) -> List[Path]:
    """Writes the message and service modules into ``out``; returns their paths."""
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        raise GenerationError(
            f"grpcio-tools is not installed: pip install 'grpcio-tools=={GRPC_TOOLS_VERSION}'"
        ) from None
    if found != GRPC_TOOLS_VERSION:
        raise GenerationError(
            f"the stubs are generated with grpcio-tools=={GRPC_TOOLS_VERSION} (the SDK's test "
            f"extra pins it), but {found} is installed: its output differs. "
            f"pip install 'grpcio-tools=={GRPC_TOOLS_VERSION}'"
        )
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in"
        generated = Path(tmp) / "out"
        source.mkdir()
        generated.mkdir()
        (source / "keel_v1.proto").write_bytes(PROTO.read_bytes())
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{source}",
                f"-I{include}",
                f"--python_out={generated}",
                f"--grpc_python_out={generated}",
                str(source / "keel_v1.proto"),
            ]
        )
        if code != 0:
            raise GenerationError(f"protoc failed with exit code {code} on {PROTO}")
        messages = (generated / MESSAGES).read_text(encoding="utf-8")
        services = (generated / SERVICES).read_text(encoding="utf-8")
    if services.count(TOP_LEVEL_IMPORT) != 1:
        raise GenerationError(
            f"{SERVICES} does not import {TOP_LEVEL_IMPORT.strip()!r} exactly once; "
            "the generator's output changed, so the import fix needs updating"
        )
    services = services.replace(TOP_LEVEL_IMPORT, RELATIVE_IMPORT)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in ((MESSAGES, messages), (SERVICES, services)):
        path = out / name
        path.write_text(HEADER + text, encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=STUBS, help=f"where to write them (default {STUBS})"
    )
    args = parser.parse_args()
    try:
        paths = generate(args.out)
    except GenerationError as e:
        sys.exit(f"gen_grpc: {e}")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
