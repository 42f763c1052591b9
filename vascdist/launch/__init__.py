"""The Python side of the launchers: `vascdist submit` (submit: one training, or a sweep, as SLURM jobs through
submitit) and `vascdist cv --submit` (cv_jobs: the folds as one job array). The launchers users run by path
stay in the top-level launch/ folder (launch/torchrun.sh)."""
