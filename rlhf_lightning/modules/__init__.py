"""One LightningModule per RLHF stage."""

from .dpo import DPOModule
from .ppo import KLSettings, PPOModule, PPOSettings, ScoreSettings
from .reward_model import RewardModule
from .sft import SFTModule

__all__ = ["DPOModule", "KLSettings", "PPOModule", "PPOSettings", "RewardModule", "SFTModule", "ScoreSettings"]
