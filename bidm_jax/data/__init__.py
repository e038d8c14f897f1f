"""Input pipelines (grain): scikit-learn digits, TFDS array_record datasets and image folders.

Configured by the `data` ConfigDict (`default_data_config`). Training batches are
`{'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}`, sharded by host and
checkpointable with Orbax (`orbax_save_args` / `orbax_restore_args`); evaluation batches are
uint8 in [0, 255].
"""

from bidm_jax.data.config import default_data_config
from bidm_jax.data.config import validate as validate_data_config
from bidm_jax.data.pipeline import EvalIterator
from bidm_jax.data.pipeline import TrainIterator
from bidm_jax.data.pipeline import dataset_size
from bidm_jax.data.pipeline import iterator_state
from bidm_jax.data.pipeline import make_eval_iterator
from bidm_jax.data.pipeline import make_train_iterator
from bidm_jax.data.pipeline import orbax_restore_args
from bidm_jax.data.pipeline import orbax_save_args
from bidm_jax.data.pipeline import restore_iterator_state
from bidm_jax.data.preprocess import BadImageError
from bidm_jax.data.sources import DatasetNotPreparedError

__all__ = [
    "BadImageError",
    "DatasetNotPreparedError",
    "EvalIterator",
    "dataset_size",
    "default_data_config",
    "iterator_state",
    "make_eval_iterator",
    "make_train_iterator",
    "orbax_restore_args",
    "orbax_save_args",
    "restore_iterator_state",
    "TrainIterator",
    "validate_data_config",
]
