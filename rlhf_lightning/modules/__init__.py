"""One LightningModule per RLHF stage."""

from .sft import SFTModule

__all__ = ["SFTModule"]
