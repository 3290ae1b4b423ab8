#!/usr/bin/env bash
# Installs what coinfer's build needs on Debian 12 / Ubuntu 24.04. The CUDA toolkit (nvcc,
# cuBLAS) is optional and not installed here: the CUDA backend is built whenever nvcc is found.
set -euo pipefail
pkgs=(g++ meson ninja-build pkg-config python3
      libasio-dev libfmt-dev libconcurrentqueue-dev doctest-dev nlohmann-json3-dev
      libpcre2-dev libxxhash-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
