#!/usr/bin/env bash
# Regenerates the Python code of the gRPC API (package clearing.v1) from proto/.
#
# Usage: cluster/gen_proto.sh [PYTHON]
#   PYTHON is the interpreter whose grpcio-tools and mypy-protobuf to use: the first
#   argument, else $PYTHON, else python3 on PATH.
#
# The output, services/clearing/v1/, is git-ignored and rebuilt from scratch on every
# run, so the script is idempotent and a proto file that was removed leaves no stale
# module behind. It can be run from any directory.
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_PKG="services/clearing"
OUT_DIR="${OUT_PKG}/v1"

cd "${ROOT}"
shopt -s nullglob
PROTOS=(proto/clearing/v1/*.proto)
if [[ ${#PROTOS[@]} -eq 0 ]]; then
  echo "gen_proto: no .proto files under proto/clearing/v1" >&2
  exit 1
fi

# mypy-protobuf's protoc plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) are scripts
# installed next to the interpreter, which need not be on PATH (a venv not activated).
SCRIPTS_DIR="$("${PY}" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="${SCRIPTS_DIR}:${PATH}"
for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if ! command -v "${plugin}" >/dev/null; then
    echo "gen_proto: ${plugin} not found; install mypy-protobuf for ${PY}" >&2
    exit 1
  fi
done
"${PY}" -c 'import grpc_tools.protoc' || {
  echo "gen_proto: grpc_tools not importable; install grpcio-tools for ${PY}" >&2
  exit 1
}

# Generated files only ever live here, so clearing the directory loses nothing.
rm -rf "${OUT_DIR}"
mkdir -p "${OUT_DIR}"

"${PY}" -m grpc_tools.protoc -I proto \
  --python_out=services --grpc_python_out=services \
  --mypy_out=services --mypy_grpc_out=services \
  "${PROTOS[@]}"

# protoc writes modules, not packages: the empty __init__.py files make clearing and
# clearing.v1 regular packages, so that imports and mypy resolve them the same way.
: > "${OUT_PKG}/__init__.py"
: > "${OUT_DIR}/__init__.py"

echo "gen_proto: generated ${OUT_DIR}/ from ${#PROTOS[@]} proto files with $("${PY}" -c 'import sys; print(sys.executable)'):"
for f in "${OUT_DIR}"/*; do
  echo "  ${f}"
done
