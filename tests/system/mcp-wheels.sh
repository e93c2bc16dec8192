#!/bin/bash
# Downloads the official MCP Python SDK (`mcp` on PyPI) and what it needs, as wheels for the
# test host's Python (Debian 12: CPython 3.11, x86_64 glibc), into target/mcp-wheels. The test
# host has no PyPI: the system tests install from this directory (it sees the repository).
# Pinned, so every run drives the server with the same client.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MCP_VERSION=2.3.0
dir=target/mcp-wheels
if ls "$dir"/mcp-"$MCP_VERSION"-*.whl >/dev/null 2>&1 && [ -f "$dir/.complete" ]; then
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "installing python3-pip (to download the MCP SDK's wheels)" >&2
  # A fresh machine may have no package lists yet.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip >/dev/null
fi
rm -rf "$dir"
mkdir -p "$dir"
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dir" "mcp==$MCP_VERSION"
touch "$dir/.complete"
