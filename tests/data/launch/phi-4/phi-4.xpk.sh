#!/usr/bin/env bash
# phi-4: v5p-128: 64 chips, 16 hosts of 4, as an xpk workload on the cluster v5p-cluster.
#
# Every host runs, in the working directory of ghcr.io/example/phijax:0.1:
#   phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4
# The config and every file it names must be in the image (or on a path every host reads), and
# run.dir should be a bucket (gs://...) so that all hosts write one run. JAX finds the other
# hosts from the variables GKE and xpk set.
#
# xpk restarts the workload after a failure, up to --max-restarts times; exit 42 (preempted
# after saving a checkpoint) is among the statuses it restarts on, and the run resumes from its
# latest checkpoint.
set -euo pipefail

xpk workload create \
  --workload phi-4 \
  --cluster v5p-cluster \
  --zone us-east5-a \
  --tpu-type v5p-128 \
  --num-slices 1 \
  --max-restarts 3 \
  --docker-image ghcr.io/example/phijax:0.1 \
  --command 'phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4'
