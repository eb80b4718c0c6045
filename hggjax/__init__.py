"""hggjax: gradient compression for data-parallel JAX training.

Every compressor is an optax transformation::

    tx = optax.chain(hggjax.hggtopk(density=0.05, axis_name="data"), optax.sgd(0.1))

Inside ``jax.shard_map`` or ``jax.pmap`` over "data", the update selects k
elements per leaf, ``all_gather``s their values (float8 with a scale per 256 by
default) and positions (an Elias-Fano code), and returns the mean over devices;
the residual keeps what was not sent and what rounding lost.

For Adam(W), `hggjax.adamw` puts the compressor where it belongs (Adam's moments
before it, on each device)::

    tx = hggjax.adamw(lr, compressor="hggtopk", density=0.03, axis_name="data")
"""

from hggjax.compressed_adam import (AdamState, ChainParts, adam_moments, adamw, adamw_parts,
                                    scheduled_weight_decay)
from hggjax.chunked_dct import block_dct, dct, inverse_dct
from hggjax import cpu_host
from hggjax.dense import dense_mean
from hggjax.density_warmup import density_warmup
from hggjax.error_feedback import accumulated
from hggjax.payload import Payload, Selection
from hggjax.per_device import PerDeviceState, per_device
from hggjax.registry import (
    ERROR_FEEDBACK,
    Options,
    compressors,
    dgcsampling,
    gaussian,
    gaussian2,
    get_compressor,
    hggtopk,
    none,
    randomk,
    randomkec,
    redsync,
    redsynctrim,
    topk,
    topk2,
)
from hggjax.reshard import reshard_state
from hggjax.selectors.base import Selector
from hggjax.sharding import compression_state, shard_state, state_specs, stats
from hggjax.state import CompressionState, CompressionStats
from hggjax.transform import sparsify

__version__ = "0.1.0"

__all__ = [
    "AdamState", "ChainParts", "adam_moments", "adamw", "adamw_parts", "block_dct", "dct",
    "inverse_dct", "scheduled_weight_decay",
    "CompressionState", "CompressionStats", "ERROR_FEEDBACK", "Options", "Payload",
    "PerDeviceState", "cpu_host", "per_device",
    "Selection", "Selector", "accumulated", "compression_state", "compressors",
    "dense_mean", "density_warmup", "dgcsampling", "gaussian", "gaussian2", "get_compressor", "hggtopk",
    "none", "randomk", "randomkec", "redsync", "redsynctrim", "reshard_state", "shard_state",
    "sparsify", "state_specs", "stats", "topk", "topk2",
]
