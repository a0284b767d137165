"""Data: random-access sources (``sources``), per-example preprocessing (``preprocess``) and
grain pipelines (``pipeline``). Importing this package needs only numpy; grain, scikit-learn
and tensorflow-datasets are imported by the functions that use them."""

from aa_flax.data.pipeline import InputPipeline, resolve_num_workers
from aa_flax.data.sources import DATASETS, DatasetSplits, load_npz_files, load_splits

__all__ = ["DATASETS", "DatasetSplits", "InputPipeline", "load_npz_files",
           "load_splits", "resolve_num_workers"]
