"""One LightningModule per RLHF stage."""

from .dpo import DPOModule
from .ppo import ImplicitRewardSettings, KLSettings, PPOModule, PPOSettings, ScoreSettings
from .reward_model import RewardModule
from .sft import SFTModule

__all__ = ["DPOModule", "ImplicitRewardSettings", "KLSettings", "PPOModule", "PPOSettings", "RewardModule", "SFTModule",
           "ScoreSettings"]
