"""Resumable, crash-safe teacher pipelines: seed records in, sharded JSONL records out.

    phijax-tools run PIPELINE.yaml [key=value ...] [--executor local|ray] [--retry-failed]

* `config`: the pipeline file (`PipelineConfig`) and `load_pipeline`, which checks everything
  (one-line `PipelineError` naming the key) and builds the stages before any network call;
* `stage`: what a stage is (`Stage`, its typed `StageConfig`, the `STAGES` registry filled by
  `@register_stage`) and the record helpers stages use (`render_template`, `child_record`);
  the built-in stage types live in `tools.stages`;
* `preflight`: what is checked before the first request: record fields and template
  placeholders against the first seed and the stages before (at load), each stage's max_tokens
  against the context length the endpoint reports (at the start of a run);
* `rundir`: the run directory, its crash-safe logs and how a killed run resumes;
* `local`: `run_pipeline`, one process with one async teacher; a run whose seeds mostly fail
  raises `PipelineFailed`, an endpoint that refuses the key or model `TeacherRefused`;
* `ray`: `run_pipeline_ray`, one Ray task per output shard. Both executors give the same
  records and leave the same layout; either resumes the other's run.
"""
from tools.pipeline.config import Pipeline, PipelineConfig, load_pipeline
from tools.pipeline.local import process_seed, run_pipeline
from tools.pipeline.ray import run_pipeline_ray
from tools.pipeline.rundir import RunDir, read_records, seed_id_of, shard_of, shard_path
from tools.pipeline.stage import (STAGES, PipelineError, PipelineFailed, Stage, StageConfig,
                                  StageContext, StageError, child_record, lookup,
                                  register_stage, render_template)
