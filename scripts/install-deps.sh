#!/usr/bin/env bash
# Installs what coinfer's build needs on Debian 12 / Ubuntu 24.04. With --test, also what the
# test suites use: Chromium for the web page test, Node.js with the official `openai` client and
# playwright-core (pinned in tests/server/node/package-lock.json).
# The CUDA toolkit (nvcc, cuBLAS) is optional and not installed here: the CUDA backend is built
# whenever nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(g++ meson ninja-build pkg-config python3
      libasio-dev libfmt-dev libconcurrentqueue-dev doctest-dev nlohmann-json3-dev
      libpcre2-dev libxxhash-dev)
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1
if [ $with_tests = 1 ]; then
  pkgs+=(chromium cmake)  # cmake: the outside CMake project of tests/consumers
  command -v npm >/dev/null || pkgs+=(nodejs npm)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all packages present"
fi
if [ $with_tests = 1 ] && [ ! -d tests/server/node/node_modules/openai ]; then
  echo "install-deps: npm ci in tests/server/node"
  npm ci --prefix tests/server/node --no-audit --no-fund --loglevel=error
fi
