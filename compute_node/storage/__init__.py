"""File work on storage pools: volumes, images, locks, reconcile (docs/storage.md).

The layer the storage agent of a compute node (and, for shared pools, any storage replica)
runs; it touches files only and imports nothing of the API or the bus.
"""

from compute_node.storage.errors import (
    AlreadyExists,
    BadImage,
    Busy,
    ChecksumMismatch,
    InvalidName,
    InvalidSize,
    NoSpace,
    NotFound,
    ShrinkRefused,
    StorageError,
    Truncated,
)
from compute_node.storage.images import Image, ImageStore
from compute_node.storage.locks import lock_volume, open_volume
from compute_node.storage.pool import Pool, PoolCapabilities, PoolKind, PoolUsage
from compute_node.storage.volumes import Cloned, Digest, Volume, VolumeStore, check_size

__all__ = [
    "AlreadyExists",
    "BadImage",
    "Busy",
    "ChecksumMismatch",
    "Cloned",
    "Digest",
    "Image",
    "ImageStore",
    "InvalidName",
    "InvalidSize",
    "NoSpace",
    "NotFound",
    "Pool",
    "PoolCapabilities",
    "PoolKind",
    "PoolUsage",
    "ShrinkRefused",
    "StorageError",
    "Truncated",
    "Volume",
    "VolumeStore",
    "check_size",
    "lock_volume",
    "open_volume",
]
