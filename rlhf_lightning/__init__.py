"""rlhf-lightning: SFT, reward modelling and PPO as Lightning modules."""

__version__ = "0.1.0"
