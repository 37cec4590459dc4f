#!/bin/bash
# Submit every stage of slurm/study.sbatch, each starting when the one before has finished without error.
# Usage: DATA=/data/algonauts_2023 OUT=/scratch/cl_out bash slurm/submit_study.sh
set -euo pipefail
: "${DATA:?set DATA}" "${OUT:?set OUT}"
SHARDS=${SHARDS:-4}; SEARCH_SHARDS=${SEARCH_SHARDS:-32}
export DATA OUT SHARDS SEARCH_SHARDS RESULTS="${RESULTS:-Results}" SEEDS="${SEEDS:-0}"
submit() { sbatch --parsable "$@" slurm/study.sbatch; }
mappings=$(STAGE=mappings submit --gres=gpu:0 --array=0)
train=$(STAGE=train submit --dependency=afterok:$mappings --array=0-$(( 16 * SHARDS - 1 )))
pooled=$(STAGE=pooled submit --dependency=afterok:$mappings --array=0-$(( 18 * SHARDS - 1 )))
search=$(STAGE=search submit --dependency=afterok:$train:$pooled --array=0-$(( SEARCH_SHARDS - 1 )))
results=$(STAGE=results submit --dependency=afterok:$search --gres=gpu:0 --array=0 --time=48:00:00)
echo "submitted: mappings $mappings, train $train, pooled $pooled, search $search, results $results"
