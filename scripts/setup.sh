#!/usr/bin/env bash
# Installs what dptrain needs from Debian 12 (only what is missing), then configures and builds
# it in Release under build/. Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build pkg-config
  libeigen3-dev libhdf5-dev hdf5-tools libssl-dev libdeflate-dev libxxhash-dev zlib1g-dev libcli11-dev nlohmann-json3-dev
  libjpeg62-turbo-dev libpng-dev  # image folders (JPEG, PNG)
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin  # multi-process training (mpirun)
  python3-torch python3-torchvision python3-h5py python3-numpy python3-pil  # PyTorch oracle for tests/benchmarks
  dataset-fashion-mnist
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build
