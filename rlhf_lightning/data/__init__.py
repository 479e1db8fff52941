"""Record formats, encoding rules and LightningDataModules."""

from .encoding import (
    IGNORE_INDEX,
    encode_chat,
    encode_preference,
    encode_prompt_record,
    encode_sft,
)
from .modules import PreferenceDataModule, PromptDataModule, SFTDataModule
from ..records import (
    DataFormatError,
    read_preferences,
    read_prompts,
    read_sft,
    write_jsonl,
)

__all__ = [
    "IGNORE_INDEX",
    "DataFormatError",
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "encode_chat",
    "encode_preference",
    "encode_prompt_record",
    "encode_sft",
    "read_preferences",
    "read_prompts",
    "read_sft",
    "write_jsonl",
]
