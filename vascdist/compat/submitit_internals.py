"""Every use of submitit's private API in vascdist, behind one version check.

vascdist uses submitit's public executor and checkpoint protocol, plus three internals: the signal handler
that dumps the next submission and requeues (`SignalHandler`), `FailedJobError`, and the class-level job-state
watcher of `SlurmJob` (replaced by one that falls back to squeue when accounting is off). Read off submitit 1.5.
"""

from __future__ import annotations

import subprocess
import time

from vascdist.compat import require_minor

TESTED = "1.5"
require_minor("submitit", TESTED, "its requeue handler and job-state watcher (vascdist/compat/submitit_internals.py)")

import submitit  # noqa: E402  (after the version check, so a wrong release fails with one line)
from submitit.core.job_environment import SignalHandler  # noqa: E402,F401
from submitit.core.utils import DelayedSubmission, FailedJobError  # noqa: E402,F401
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob  # noqa: E402

# Job states after which a job does not run again (a requeued job is PENDING once more).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "ENDED"}


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading squeue when sacct cannot answer (accounting off: no slurmdbd).

    Without the fallback every poll logs 'Bypassing sacct error ... status may be inaccurate' and job states stay
    UNKNOWN. squeue forgets a job MinJobAge seconds after it ends; a job it no longer lists after having listed
    it unfinished is reported as ENDED (its outcome is then in its result pickle and logs).
    """

    use_squeue = False

    def update(self) -> None:
        ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not ids:
            return
        self._num_calls += 1
        text = None if self.use_squeue else self._run(["sacct", "-o", "JobID,State,NodeList", "--parsable2",
                                                        *[f"-j{i}" for i in ids]])
        if text is None:
            self.use_squeue = True  # sacct failed once: accounting is off here, do not ask again
            listed = self._run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%N", "-j", ",".join(ids)])
            text = "JobID|State|NodeList\n" + (listed or "")
            seen = self.read_info(text)
            for job_id in self._registered - self._finished:
                if job_id not in seen and self._info_dict.get(job_id, {}).get("State") not in (None, *FINAL_STATES):
                    seen[job_id] = {"JobID": job_id, "State": "ENDED", "NodeList": ""}
            self._info_dict.update(seen)
        else:
            self._info_dict.update(self.read_info(text))
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    @staticmethod
    def _run(cmd: list[str]) -> str | None:
        """stdout of cmd, or None when it fails (squeue answers 'Invalid job id' for one purged job)."""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None


def use_squeue_fallback() -> None:
    """Make every submitit SlurmJob of this process (array elements and per-task sub-jobs included) use the
    fallback watcher; submitit keeps one watcher on the SlurmJob class."""
    if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
        SlurmJob.watcher = SqueueFallbackWatcher(delay_s=60)


def job_states(jobs: list) -> dict[str, str]:
    """{job_id: SLURM state} of submitit jobs, from one watcher update."""
    SlurmJob.watcher.update()
    return {j.job_id: SlurmJob.watcher.get_state(j.job_id, mode="cache") for j in jobs}
