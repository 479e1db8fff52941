"""FSDP2 sharding under Lightning's ``ModelParallelStrategy``: which strategies a stage accepts,
which layers are sharded, how, and how a sharded model is gathered whole again (functions, no
state of their own).

Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``, each stage's
``configure_model`` (``PPOModule``'s, and ``HFModelModule``'s for SFT, reward and DPO) shards
each of its models over the strategy's ``data_parallel`` mesh (:func:`shard_models`, which calls
:func:`shard_model` on each): every transformer block is its own FSDP unit (a critic's or reward
model's backbone and head too, :func:`fsdp_units`), then the root takes the rest (embeddings,
final norm, a causal LM's head).
A unit's weights are all-gathered for its forward (and again for its backward) and freed after,
so a rank holds ``1/N`` of every weight between uses, and FSDP averages the gradients over the
ranks (the job DDP does otherwise). :func:`check_strategy` refuses the strategies no stage
supports.

The frozen models (PPO's reference and reward model, DPO's reference, the reward stage's
likelihood teacher) are sharded too: each is as large as the trained model, so keeping them
whole would cost every rank more memory than the sharded models it trains. The price is that
their forwards are collectives: every rank must run them the same number of times. The stages
do (each rank has the same number of rows, cut into the same chunks by ``forward_batch_size``
and ``reward_batch_size``); an overridden ``compute_scores`` must too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UserInputError
from .lora import LoRASettings, backbone


def uses_fsdp2(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 applied by the module)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: Any, stage: str, lora: LoRASettings | None = None) -> None:
    """Refuse a Trainer strategy that the stage named ``stage`` (its class name) does not support,
    with a one-line error naming ``trainer.strategy``: FSDP1 (``FSDPStrategy``), DeepSpeed (never
    run with the package), and a ``ModelParallelStrategy`` (FSDP2) that is not pure data
    parallelism over every process, or that is combined with ``lora``. Call after the strategy
    set up its processes (the module's ``setup``)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    key, name = "trainer.strategy", type(strategy).__name__
    if isinstance(strategy, FSDPStrategy):
        raise UserInputError(f"{key}: {stage} does not support {name} (FSDP1): the package shards with FSDP2 only (FSDP1 "
                             "breaks PPO's manual_backward and generation inside training_step, and no export gathers "
                             "its weights); use ModelParallelStrategy (FSDP2) or ddp (see docs/scaling.md)")
    if isinstance(strategy, DeepSpeedStrategy):
        raise UserInputError(f"{key}: {stage} does not support {name}: it has never been run with the package (exports, "
                             "frozen models, PPO's gradient clipping and generation are not handled under it); use ddp or "
                             "ModelParallelStrategy (FSDP2, see docs/scaling.md)")
    if uses_fsdp2(strategy):
        mesh = strategy.device_mesh
        data_parallel, tensor_parallel = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
        if tensor_parallel != 1:
            raise UserInputError(f"{key}: {stage} shards with FSDP2 only: give ModelParallelStrategy data_parallel_size="
                                 f"{data_parallel * tensor_parallel} (the number of processes) and tensor_parallel_size=1, "
                                 f"got data_parallel_size={data_parallel}, tensor_parallel_size={tensor_parallel}")
        if lora is not None:
            raise UserInputError(f"{key}: {stage} does not support model.init_args.lora under {name} (FSDP2) yet: "
                                 "use ddp, or full fine-tuning (lora: null)")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model, each one FSDP unit: the submodules whose class
    the model names in ``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ...), the same
    units accelerate's FSDP auto-wrap uses."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard with FSDP2")
    return blocks


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` that become FSDP units of their own, innermost first (the root
    follows them): a Hugging Face model's :func:`transformer_blocks`, and for a scalar model (a
    reward model or critic, with a ``score`` head) its backbone and its head, because
    :mod:`rlhf_lightning.forwards` calls those two on their own, and FSDP gathers a unit's weights
    only when that unit's forward runs. A causal LM keeps its head in the root: GPT-2's is tied
    to the input embedding. Any other module (the reward stage's likelihood head) has none: it
    is one unit, the root."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    units = transformer_blocks(model)
    if isinstance(getattr(model, "score", None), nn.Module):
        units += [backbone(model), model.score]
    return units


def shard_model(model: nn.Module, mesh: Any) -> None:
    """Shard ``model`` in place with FSDP2 (``fully_shard``) over the 1-d device ``mesh``: each of
    its :func:`fsdp_units`, then the root.

    The model is also marked the way transformers marks the models it shards itself, so that
    every ``generate`` on it (rollouts, validation samples) turns on ``synced_gpus`` when there
    are several processes: a rank that finished its responses keeps running forwards until all
    ranks have, as the other ranks' all-gathers need it (without it the run hangs).
    """
    from torch.distributed.fsdp import fully_shard

    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_fsdp_managed_module = True  # read by transformers' is_fsdp_managed_module (generate's synced_gpus)


def shard_models(device_mesh: Any, models: list[nn.Module]) -> None:
    """Under ``ModelParallelStrategy`` (``device_mesh``: the module's, None under any other
    strategy), shard each of ``models`` over the mesh's ``data_parallel`` ranks
    (:func:`shard_model`); else nothing. The one rule for what every stage's
    ``configure_model`` does with its models."""
    if device_mesh is None:
        return
    for model in models:
        shard_model(model, device_mesh["data_parallel"])


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2 (:func:`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded ``model``'s full state dict, gathered to the CPU of global rank 0 (an empty dict
    on the other ranks), for ``save_pretrained``; None for a model that is not sharded (it is
    saved as it is). A collective for a sharded model: every rank must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (GPT-2's head and input embedding) comes back as two copies: one tensor again,
    # so that save_pretrained writes it once, as it does for an unsharded model.
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first_name.setdefault(id(parameter), name)]
    return state
