#!/usr/bin/env bash
# phi-4: v5p-128: 64 chips, 16 hosts of 4, requested as a Cloud TPU queued
# resource; once it is ACTIVE, every host runs the same command over ssh:
#
#   /opt/venvs/phijax/bin/phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4
#
# It runs in each host's home directory: the config and every file it names must be there on
# every host (or be named by a path every host reads), and run.dir should be a bucket (gs://...)
# so that all hosts write one run. phijax must be installed on every host (in /opt/venvs/phijax).
# Under run.distributed=on JAX finds the slice's other hosts from the TPU metadata server.
#
# A run that fails (exit 42: preempted after saving a checkpoint) is started again, up to
# 3 times, and resumes from its latest checkpoint. Delete the TPUs when done:
#   gcloud compute tpus queued-resources delete phi-4 --project="$PROJECT" --zone="$ZONE" --force
set -euo pipefail

PROJECT=${PROJECT:-$(gcloud config get-value project)}
ZONE=${ZONE:-us-east5-a}
NAME=phi-4

gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
  --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 \
  --node-id="$NAME"

echo "waiting for $NAME to become ACTIVE"
while state=$(gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
    --zone="$ZONE" --format='value(state.state)'); [ "$state" != ACTIVE ]; do
  case "$state" in
    FAILED|SUSPENDED) echo "$NAME is $state" >&2; exit 1 ;;
  esac
  sleep 30
done

run() {  # every host of the slice
  gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command='/opt/venvs/phijax/bin/phijax train configs/phi-4.yaml mesh.data=1 mesh.fsdp=64 mesh.tensor=1 train.microbatches=30 run.distributed=on run.dir=gs://phijax-runs/phi-4'
}

for attempt in $(seq 0 3); do
  status=0
  run || status=$?
  [ "$status" -eq 0 ] && exit 0
  echo "run $attempt of $NAME ended with status $status" >&2
done
exit "$status"
