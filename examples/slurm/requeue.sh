# Sourced by the sbatch scripts here: run_requeueable COMMAND... runs COMMAND (the trainer, usually
# under srun) in the background, forwards SIGUSR1/SIGTERM sent to this batch script to it, and
# when it exits 3 ("stopped early, resumable": a checkpoint was written) requeues this job, which
# then reruns the same command and continues from the checkpoint. With `#SBATCH --requeue` and
# `#SBATCH --signal=B:USR1@180`, a training outlives any number of wall times and pre-emptions.
run_requeueable() {
  "$@" &
  local pid=$! code=0
  trap 'kill -USR1 "$pid" 2>/dev/null || true' USR1
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
  while true; do
    code=0
    wait "$pid" || code=$?
    # wait also returns when a trapped signal arrives: keep waiting while the trainer checkpoints
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$code" -eq 3 ]; then
    echo "stopped early with a checkpoint (exit 3): requeueing job ${SLURM_JOB_ID:-?} to continue"
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return "$code"
}
