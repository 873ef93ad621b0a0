"""Weight sharing and compact storage: Deep Compression's clustering and entropy-coding stages.

- ``ClusterConfig`` (recipe name ``cluster``): per-layer k-means into ``ClusteredLinear`` /
  ``ClusteredConv2d`` (codebook + indices; zeros stay zeros), with optional centroid fine-tuning.
- ``EntropyCodeConfig`` (``entropy_code``): rounds to the stored precision and records the size.
- ``save_compressed`` / ``load_compressed``: the ``.prdc`` file (codebooks, sparse index deltas,
  Huffman), CRC-checked.
- ``measure_stages``: the paper's stage-by-stage size table from real files.
"""

from pared.cluster.codec import decode, encode, load_compressed, round_to_storage_, save_compressed
from pared.cluster.deep_compression import DeepCompressionResult, EntropyCodeConfig, measure_stages
from pared.cluster.kmeans import init_centroids, kmeans_1d
from pared.cluster.weight_sharing import (
    ClusterConfig,
    ClusteredConv2d,
    ClusteredLinear,
    cluster_weight,
    shared_weight,
)

__all__ = [
    "ClusterConfig",
    "ClusteredConv2d",
    "ClusteredLinear",
    "DeepCompressionResult",
    "EntropyCodeConfig",
    "cluster_weight",
    "decode",
    "encode",
    "init_centroids",
    "kmeans_1d",
    "load_compressed",
    "measure_stages",
    "round_to_storage_",
    "save_compressed",
    "shared_weight",
]
