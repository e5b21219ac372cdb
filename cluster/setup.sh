#!/usr/bin/env bash
# Installs whatever the local cluster and the switch need and is missing:
#   Debian's etcd-server, OpenJDK 17 and Maven; Debian's chromium and chromium-driver
#   (the operator console's browser test); Apache Cassandra's runtime jars from Maven
#   Central (cassandra-all); a virtualenv with the project; generated protobuf code.
# Idempotent: with everything in place it checks a few files and exits in about a second.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
CASSANDRA_VERSION=$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' cluster/cassandra/pom.xml)
CASSANDRA_LIB="$ROOT/.cache/cassandra-$CASSANDRA_VERSION/lib"
VENV="$ROOT/.venv"
PYTHON_BIN=${PYTHON:-python3}

step() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    local pkgs=("$@")
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || fail "need root (or sudo) to install ${pkgs[*]}"
        sudo="sudo"
    fi
    if [ "$apt_updated" -eq 0 ]; then
        step "apt-get update (once)"
        $sudo apt-get update -qq >/dev/null || fail "apt-get update failed"
        apt_updated=1
    fi
    step "installing Debian packages: ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
        >/tmp/clearing-apt.log 2>&1 || { tail -20 /tmp/clearing-apt.log >&2; fail "apt-get install ${pkgs[*]}"; }
}

java_major() {
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1
}

# 1. System packages ---------------------------------------------------------------
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
if ! command -v java >/dev/null || [ "$(java_major)" != "17" ]; then
    if [ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java ]; then
        export PATH="/usr/lib/jvm/java-17-openjdk-amd64/bin:$PATH"
    else
        missing+=(openjdk-17-jre-headless)
    fi
fi
command -v mvn >/dev/null || missing+=(maven)
# Headless chromium and its WebDriver for tests/cluster/test_console_browser.py
# (about 100 MB the first time; selenium comes with the dev extra).
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
# Debian's etcd-server ships a systemd unit that may start a default etcd on
# 127.0.0.1:2379; ours listen elsewhere, so it does not matter if it runs.
[ "$(java_major)" = "17" ] || fail "Java 17 is required for Cassandra 5.0 (found: $(java -version 2>&1 | head -1))"

# 2. Cassandra jars ------------------------------------------------------------------
if [ ! -f "$CASSANDRA_LIB/cassandra-all-$CASSANDRA_VERSION.jar" ]; then
    step "fetching Apache Cassandra $CASSANDRA_VERSION jars from Maven Central (about 70 MB, once)"
    tmp="$CASSANDRA_LIB.partial"
    rm -rf "$tmp"
    # Maven 3.8 writes colour codes whatever it is told: stripped, so a log stays text.
    # (pipefail: the pipeline fails when mvn does.)
    if ! mvn -q -B -f cluster/cassandra/pom.xml dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1 | sed -u 's/\x1b\[[0-9;]*m//g'; then
        fail "mvn could not fetch org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION"
    fi
    rm -rf "$CASSANDRA_LIB"
    mv "$tmp" "$CASSANDRA_LIB"
    step "cassandra jars in .cache/cassandra-$CASSANDRA_VERSION/lib ($(ls "$CASSANDRA_LIB" | wc -l) jars)"
fi

# 3. Python virtualenv with the project ----------------------------------------------
stamp="$VENV/.installed-pyproject"
if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv .venv ($($PYTHON_BIN --version))"
    "$PYTHON_BIN" -m venv "$VENV" || fail "python -m venv (install python3-venv?)"
fi
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    step "installing the project and its dependencies into .venv (pip, about a minute the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    # With every package under services/, the editable install is a .pth naming that
    # folder, so generated code added later (services/clearing/) imports too.
    "$VENV/bin/python" -m pip install -q -e ".[dev]" || fail "pip install -e .[dev]"
    cp pyproject.toml "$stamp"
fi

# 4. Generated protobuf code -----------------------------------------------------------
gen_stamp="services/clearing/.generated"
if [ -d proto/clearing ]; then
    if [ ! -f "$gen_stamp" ] || [ -n "$(find proto -name '*.proto' -newer "$gen_stamp" | head -1)" ] \
        || [ cluster/gen_proto.sh -nt "$gen_stamp" ]; then
        step "generating protobuf and gRPC code into services/clearing/"
        PYTHON="$VENV/bin/python" bash cluster/gen_proto.sh >/dev/null || fail "protobuf code generation"
        touch "$gen_stamp"
    fi
fi

# 5. buf (the proto linter) from npm, for `make verify` and the API tests ----------------
if [ -f package-lock.json ] && [ ! -x node_modules/.bin/buf ]; then
    if command -v npm >/dev/null; then
        step "installing buf from npm (proto lint)"
        npm ci --no-audit --no-fund --silent >/dev/null 2>&1 || step "warning: npm ci failed; proto lint tests will be skipped"
    else
        step "warning: npm not found; proto lint tests will be skipped"
    fi
fi

# 6. The local certificate authority (.state/pki, git-ignored, keys 0600) ------------------
"$VENV/bin/clearingctl" pki init | sed 's/^/[setup] certificate authority /'

step "ready: etcd $(etcd --version | sed -n 's/etcd Version: //p'), Java $(java_major), Cassandra $CASSANDRA_VERSION, $("$VENV/bin/python" --version)"
