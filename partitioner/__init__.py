"""edgesplit.partitioner: blocks, the content-addressed store, manifests and layer-wise cuts."""
from .blocks import NamedBlock, decompose, list_splitters, register_splitter
from .builders import build_skeleton, list_builders, register_builder, timm_recipe
from .errors import BlockHashMismatch, EdgesplitError, ManifestError, MissingBlocksError, UnsupportedModelError
from .layerwise import BlockSpan, build_blocks, cut, even_splits, load_model, partition
from .manifest import BlockEntry, ModelManifest
from .store import BlockStore, block_id

__all__ = [
    "BlockEntry", "BlockHashMismatch", "BlockSpan", "BlockStore", "EdgesplitError", "ManifestError",
    "MissingBlocksError", "ModelManifest", "NamedBlock", "UnsupportedModelError", "block_id",
    "build_blocks", "build_skeleton", "cut", "decompose", "even_splits", "list_builders",
    "list_splitters", "load_model", "partition", "register_builder", "register_splitter", "timm_recipe",
]
