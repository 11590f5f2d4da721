#!/usr/bin/env bash
# Installs everything the whole test suite needs on a fresh Debian/Ubuntu machine: the brokers it starts
# itself (redis-server from Debian; Apache Kafka and Apache Pulsar from their Maven Central artifacts, run on
# Java 17+ and resolved with Maven into the user's Maven repository), msgstream with its dev tools, the
# every backend distribution (editable). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python -m pip install -q -e ".[dev]" -e ./backends/redis -e ./backends/kafka -e ./backends/pulsar
# the brokers' jars, fetched now so that the first test does not wait for them
python scripts/broker.py kafka --fetch >/dev/null
python scripts/broker.py pulsar --fetch >/dev/null
