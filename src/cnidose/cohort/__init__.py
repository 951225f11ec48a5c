"""Cohort scale: batch fitting and population simulation, serially, on local processes or on Dask."""

from cnidose.cohort.batch import batch_fit
from cnidose.cohort.executor import Backend, run_chunks

__all__ = ["Backend", "batch_fit", "run_chunks"]
