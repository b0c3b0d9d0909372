#!/usr/bin/env bash
# phi-4: 16 processes on this machine standing in for v5p-128: 64 chips, 16 hosts of 4.
#
# Each process gets the environment a cluster would give it: the coordinator's address (on
# 127.0.0.1), the number of processes and its own id, and CPU devices in place of its host's
# accelerators, joined by gloo collectives. Output lines are prefixed by [rank]. The exit status
# is the first failure's, else 42 when a process was preempted (it saved a checkpoint: run
# the same command again to resume), else 0.
# `phijax launch local ... --submit` runs these processes and waits for them; once one fails it
# stops the others.
set -uo pipefail

export JAX_PLATFORMS=cpu
export XLA_FLAGS=--xla_force_host_platform_device_count=4
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export JAX_COORDINATOR_ADDRESS=127.0.0.1:8476
export JAX_NUM_PROCESSES=16

pids=()
JAX_PROCESS_ID=0 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[0] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=1 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[1] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=2 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[2] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=3 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[3] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=4 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[4] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=5 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[5] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=6 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[6] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=7 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[7] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=8 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[8] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=9 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[9] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=10 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[10] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=11 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[11] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=12 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[12] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=13 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[13] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=14 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[14] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=15 phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4 2>&1 | awk '{ print "[15] " $0; fflush() }' &
pids+=($!)

status=0
for pid in "${pids[@]}"; do
  wait "$pid"
  code=$?
  if [ "$code" -ne 0 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 42 ]; }; then
    status=$code
  fi
done
exit "$status"
