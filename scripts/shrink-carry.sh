#!/usr/bin/env bash
# Shrinks .carry for the device: the tracked tree (about 35 MiB of results) and .carry (31 MiB) passed the 64 MiB a
# device call takes on 2026-12-05. Fashion-MNIST's gzipped images go as xz (-4 MiB); scripts/device-visit.sh
# puts the .gz back on the device before anything reads them.
set -euo pipefail
cd "$(dirname "$0")/../.carry/fashion-mnist"
for name in train-images-idx3-ubyte t10k-images-idx3-ubyte; do
  if [[ -f $name.gz ]]; then
    gzip -dc "$name.gz" | xz -9e -T0 > "$name.xz.tmp" && mv "$name.xz.tmp" "$name.xz" && rm "$name.gz"
  fi
done
du -sh ..
