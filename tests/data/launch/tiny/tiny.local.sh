#!/usr/bin/env bash
# tiny: 2 processes on this machine standing in for 2 CPU nodes.
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
export XLA_FLAGS=--xla_force_host_platform_device_count=1
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export JAX_COORDINATOR_ADDRESS=127.0.0.1:8476
export JAX_NUM_PROCESSES=2

pids=()
JAX_PROCESS_ID=0 phijax train configs/tiny.yaml mesh.data=2 run.dir=/shared/runs/tiny 2>&1 | awk '{ print "[0] " $0; fflush() }' &
pids+=($!)
JAX_PROCESS_ID=1 phijax train configs/tiny.yaml mesh.data=2 run.dir=/shared/runs/tiny 2>&1 | awk '{ print "[1] " $0; fflush() }' &
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
