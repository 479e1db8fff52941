"""Loading and saving the models and tokenizers of every stage.

One place for the rules that every RLHF stage depends on:

* a model is named by ``model_name_or_path``: a Hugging Face hub id, a local
  ``save_pretrained`` folder, or a built-in preset (``preset:tiny-gpt2``) that needs no
  download, so that the demo runs on a machine without hub access;
* every tokenizer gets a pad token that is *not* EOS where the tokenizer allows it (with pad
  == EOS, masking padding also masks EOS and the policy never learns to stop);
* a model's generation config lists every id that ends a response
  (:func:`~rlhf_lightning.stop_tokens.stop_token_ids`: EOS, a chat model's end-of-turn token);
* dropout is switched off (the standard for RLHF: log-probs recomputed during PPO must equal
  the ones seen at rollout time);
* Hugging Face folders are written atomically: to a temporary name, renamed when complete,
  so that a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.tokenization_auto import get_tokenizer_config

from .errors import UserInputError
from .stop_tokens import stop_token_ids
from .terminal import NEW_WEIGHTS_REPORTS, held_log_records, release, transformers_progress_bars_hidden

PRESET_PREFIX = "preset:"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
#: Text that any usable tokenizer encodes to at least one id (see :func:`load_tokenizer`).
PROBE_TEXT = "hello"

# A chat template for the byte-level preset: role tags, EOS closing each assistant turn.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Built-in presets: a GPT-2 shape small enough to train on 2 CPU cores in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256),
    "micro-gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
}

# Config attributes that hold dropout probabilities in common architectures.
DROPOUT_ATTRIBUTES = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)


class ModelLoadError(UserInputError):
    """A model or tokenizer could not be loaded; the message names the path and a hint."""


class UntrainedModelError(ModelLoadError):
    """A setting that needs a trained reward model names one whose score head would be random."""

    def __init__(self, key: str, name_or_path: str, why: str) -> None:
        super().__init__(
            f"{key}: '{name_or_path}' is not a trained reward model ({why}); hint: give the reward "
            "stage's export folder (a *ForSequenceClassification model), not an SFT export or another causal LM"
        )


class ModelSaveError(UserInputError):
    """A model folder could not be written (disk full, no permission); the message names it."""


def is_preset(name_or_path: str) -> bool:
    return name_or_path.startswith(PRESET_PREFIX)


def _preset_name(name_or_path: str) -> str:
    name = name_or_path[len(PRESET_PREFIX) :]
    if name not in PRESETS:
        raise ModelLoadError(
            f"unknown preset '{name_or_path}'; choose one of "
            + ", ".join(PRESET_PREFIX + p for p in PRESETS)
        )
    return name


def byte_tokenizer() -> ByT5Tokenizer:
    """The byte-level tokenizer of the presets: no download, 384 ids (256 bytes + specials)."""
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def _check_local_folder(name_or_path: str) -> None:
    path = Path(name_or_path)
    # A hub id is "name" or "org/name"; anything with more parts, or that exists, is a folder.
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model folder '{name_or_path}' does not exist; "
            "hint: run the previous stage first, or fix model_name_or_path"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    Padding side is left to the caller: collators pad by hand, generation pads left.
    """
    name_or_path = os.path.expanduser(name_or_path)
    if is_preset(name_or_path):
        _preset_name(name_or_path)
        tokenizer = byte_tokenizer()
    else:
        _check_local_folder(name_or_path)
        folder = Path(name_or_path)
        if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise ModelLoadError(
                f"model folder '{name_or_path}' has no tokenizer files; hint: save the tokenizer "
                "next to the weights (tokenizer.save_pretrained(folder))"
            )
        try:
            # For some model types (qwen2, phi3, ...) AutoTokenizer loads the type's own tokenizer
            # whatever tokenizer_config.json names; the byte tokenizer has no tokenizer.json for
            # that one to read (it would encode every text to no ids), so load it by its class.
            saved_class = get_tokenizer_config(name_or_path).get("tokenizer_class")
            tokenizer_class = ByT5Tokenizer if saved_class == ByT5Tokenizer.__name__ else AutoTokenizer
            tokenizer = tokenizer_class.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not load a tokenizer from '{name_or_path}': {err}; "
                "hint: a model folder needs the tokenizer files next to the weights "
                "(save both with save_pretrained)"
            ) from err
        if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
            raise ModelLoadError(
                f"the tokenizer loaded from '{name_or_path}' ({type(tokenizer).__name__}) encodes text to no ids; "
                "hint: save the tokenizer the model was trained with into that folder (save_pretrained)"
            )
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token that differs from EOS (adds ``<|pad|>`` if needed).

    Adding a token grows the vocabulary: models loaded through :func:`load_causal_lm` and
    friends resize their embeddings to match.
    """
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token; RLHF needs one to end "
            "responses (set eos_token when saving the tokenizer)"
        )
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _no_dropout(config: Any) -> None:
    """Zero the config's dropout probabilities (the ones a model applies functionally)."""
    for attribute in DROPOUT_ATTRIBUTES:
        if isinstance(getattr(config, attribute, None), float):
            setattr(config, attribute, 0.0)


def zero_dropout_modules(model: torch.nn.Module) -> None:
    """Set ``p = 0`` on every dropout module of ``model``, whatever its config calls it: RLHF's
    recomputed log-probs and values must equal the rollout's (and training mode must not
    change a forward pass)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute ``model``'s activations in the backward instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``, which transformers applies in training mode only), and turn off
    the KV cache of its own forwards (``config.use_cache``). ``generate`` keeps its cache: the
    :class:`~transformers.GenerationConfig` it is given decides. Also through a peft wrapper."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _resize_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # every id that ends a response, so that an export's plain generate() stops where ours does
        stop_ids = stop_token_ids(model, tokenizer)
        model.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids


def preset_config(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """The GPT-2 config of a built-in preset, sized to the tokenizer's vocabulary."""
    shape = PRESETS[_preset_name(name_or_path)]
    return GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def _load(
    auto_class: Any, name_or_path: str, tokenizer: PreTrainedTokenizerBase, trained_key: str | None = None,
    new_head: str | None = None, **config_kwargs: Any,
) -> PreTrainedModel:
    """With ``trained_key`` (the setting that names a model that must be trained, e.g. a reward
    model), refuse one whose weights transformers would partly initialise at random. With
    ``new_head`` (what the model is for, e.g. "reward model"), a folder without the head (an SFT
    export) gets a new one, said in one line instead of transformers' load report."""
    if is_preset(name_or_path):
        if trained_key:
            raise UntrainedModelError(trained_key, name_or_path, "a preset's weights are all random")
        config = preset_config(name_or_path, tokenizer)
        for key, value in config_kwargs.items():
            setattr(config, key, value)
        _no_dropout(config)
        model = auto_class.from_config(config)
    else:
        _check_local_folder(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load a model config from '{name_or_path}': {err}") from err
        _no_dropout(config)
        reporter = logging.getLogger("transformers.modeling_utils")
        with transformers_progress_bars_hidden(), held_log_records(reporter, *NEW_WEIGHTS_REPORTS) as report:
            model, loading = auto_class.from_pretrained(name_or_path, config=config, output_loading_info=True)
        if new_head and only_new_head(model, loading):
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{new_head}: new scalar head on {name_or_path} ({', '.join(sorted(loading['missing_keys']))})")
        else:  # nothing new, or more than the head: transformers' report says what
            release(reporter, report)
        if trained_key and loading["missing_keys"]:
            saved_as = ", ".join(config.architectures or ["a model"])
            missing = ", ".join(sorted(loading["missing_keys"]))
            why = f"it holds {saved_as}, whose {missing} would start at random"
            raise UntrainedModelError(trained_key, name_or_path, why)
    zero_dropout_modules(model)
    _resize_to_tokenizer(model, tokenizer)
    return model


def only_new_head(model: PreTrainedModel, loading: dict[str, Any]) -> bool:
    """Whether the weights ``from_pretrained`` initialised (``loading``: its loading info) are
    the task head's alone: no backbone weight missing or left unused, none of another shape."""
    backbone = f"{model.base_model_prefix}."
    changed = [*loading["missing_keys"], *loading.get("unexpected_keys", [])]
    return bool(loading["missing_keys"]) and not loading.get("mismatched_keys") and not any(
        key.startswith(backbone) for key in changed
    )


def load_causal_lm(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A causal LM (policy, reference, SFT backbone) with dropout off, sized to ``tokenizer``."""
    return _load(AutoModelForCausalLM, name_or_path, tokenizer)


def load_sequence_scorer(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase, role: str = "reward model"
) -> PreTrainedModel:
    """A transformer with a scalar head (``num_labels=1``): reward model or critic (``role``).

    From a causal-LM folder the head is new (initialised by transformers; one line
    "``role``: new scalar head on <folder>" says so); from a reward-model folder it is the
    trained one.
    """
    return _load(AutoModelForSequenceClassification, name_or_path, tokenizer, new_head=role, num_labels=1)


def load_reward_model(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase, key: str = "model.init_args.reward_model"
) -> PreTrainedModel:
    """A trained reward model (:func:`load_sequence_scorer`) named by the setting ``key``; a
    folder without a trained score head (an SFT export, any causal LM) or a preset raises
    :class:`UntrainedModelError` instead of scoring with a random head."""
    return _load(AutoModelForSequenceClassification, name_or_path, tokenizer, trained_key=key, num_labels=1)


def save_hf_folder(
    path: str | os.PathLike[str],
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (None: the tokenizer alone) and ``tokenizer`` with ``save_pretrained``,
    atomically.

    The folder is written under a temporary sibling name and renamed into place once complete;
    an existing folder at ``path`` is replaced only then (moved aside, the new one renamed in,
    the old one deleted). A crash leaves ``.tmp-*`` / ``.old-*`` siblings at worst, never a
    folder at ``path`` that looks finished but is not. A failed write (a full disk) raises
    :class:`ModelSaveError` naming the folder; the staging folder is removed.
    """
    target = Path(path)
    staging = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if model is not None:
            with transformers_progress_bars_hidden():  # "Writing model shards" of one tiny file
                model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if target.exists():
            retired = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
            os.replace(target, retired)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as err:
        raise ModelSaveError(
            f"could not write the model folder '{target}': {err.strerror or err}; what was there before is "
            "left as it was; hint: free disk space or choose a folder you can write to, then run again"
        ) from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def is_complete_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a config, weights and a tokenizer (what a later stage needs)."""
    folder = Path(path)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return folder.is_dir() and (folder / "config.json").exists() and has_weights and has_tokenizer_files(folder)


def has_tokenizer_files(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a saved tokenizer (its ``tokenizer_config.json``)."""
    return (Path(path) / "tokenizer_config.json").exists()


def load_reference(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase, policy_name: str | None = None,
    policy: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """A frozen causal LM (eval mode, no gradients): a KL reference or a teacher. When it names
    the same preset as ``policy_name``, a frozen copy of ``policy`` as loaded (a preset is drawn
    at random: a second load would be another model); otherwise loaded from ``name_or_path``."""
    if policy is not None and name_or_path == policy_name and is_preset(name_or_path):
        model = copy.deepcopy(policy)
    else:
        model = load_causal_lm(name_or_path, tokenizer)
    return model.eval().requires_grad_(False)

