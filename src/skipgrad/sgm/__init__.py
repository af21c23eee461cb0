"""The Skip Gradient Method: ``skip_gradient`` and the registry of residual block types."""
from skipgrad.sgm.blocks import BLOCKS, BlockKind, register_block
from skipgrad.sgm.context import (
    BlockInfo,
    NoResidualBlockError,
    UnsupportedOfficialModelError,
    check_gamma,
    find_blocks,
    skip_gradient,
)

__all__ = [
    "BLOCKS", "BlockInfo", "BlockKind", "NoResidualBlockError", "UnsupportedOfficialModelError",
    "check_gamma", "find_blocks", "register_block", "skip_gradient",
]
from skipgrad.sgm import families  # noqa: E402,F401  (registers the timm/torchvision families)
