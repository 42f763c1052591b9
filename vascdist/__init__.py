"""vascdist: distributed training of vascular-access sound classifiers (normal vs stenosis)."""

from vascdist.cpu import configure as _configure_cpu_threads

__version__ = "0.1.0"

# Before any vascdist module imports torch: OpenMP threads that sleep when idle, as many as this process may use
# (vascdist/cpu.py). Here, because every entry point and worker process that computes imports vascdist first.
_configure_cpu_threads()
