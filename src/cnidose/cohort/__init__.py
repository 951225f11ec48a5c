"""Cohort scale: batch fitting, forecast evaluation and virtual trials, serially, on local processes or on
Dask (identical results)."""

from cnidose.cohort.batch import batch_evaluate, batch_fit
from cnidose.cohort.executor import Backend, run_chunks

__all__ = ["Backend", "batch_evaluate", "batch_fit", "run_chunks"]
