"""vascdist: distributed training of vascular-access sound classifiers (normal vs stenosis)."""

__version__ = "0.1.0"
