#!/usr/bin/env bash
# The main job: ResNet-152 on Fashion-MNIST, data-parallel on two devices (--devices auto: every
# GPU, or without one two CPU devices, cpu:0 and cpu:1, with SyncBatchNorm), about 8 minutes on
# 2 CPU cores. Prints the test accuracy; metrics and a learning curve go to runs/main.{jsonl,svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
exec build/dptrain train --model resnet152 --stem imagenet --zero-init-residual \
  --devices auto --data fashion-mnist --batch-size 64 --max-steps 500 --lr 0.05 --lr-schedule cosine \
  --metrics runs/main.jsonl "$@"
