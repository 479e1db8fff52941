"""One LightningModule per RLHF stage."""

from .ppo import KLSettings, PPOModule, PPOSettings, ScoreSettings
from .reward import RewardModule
from .sft import SFTModule

__all__ = ["KLSettings", "PPOModule", "PPOSettings", "RewardModule", "SFTModule", "ScoreSettings"]
