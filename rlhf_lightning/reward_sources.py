"""PPO's reward sources: each turns :class:`~rlhf_lightning.generation.Responses` into ``(b,)`` scores.

* :class:`RewardModelScorer`: a Hugging Face reward-model folder. When its tokenizer differs
  from the policy's, responses are decoded and re-tokenized for it.
* :class:`EnsembleScorer`: several reward models (each a :class:`RewardModelScorer`), their
  mean score minus a multiple of their disagreement.
* :class:`CallableScorer`: any Python function ``(prompts, completions) -> scores`` on texts,
  such as the built-in task's gold annotator or a rule.
* :class:`ImplicitRewardScorer`: DPO's implicit reward ``beta * (log pi_dpo(y|x) - log
  pi_ref(y|x))``, a reward model that reads a DPO policy's log-ratio to its reference.

Another way is to subclass :class:`~rlhf_lightning.modules.PPOModule` and override
``compute_scores``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import rlhf_math as pm
from .data.encoding import attention_mask_for, encode_prompt, encode_text, pad, response_end_id
from .forwards import response_logprobs, score_sequences
from .generation import Responses

TextRewardFn = Callable[[list[str], list[str]], Sequence[float]]


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when ``a`` and ``b`` map text to the same ids (same vocabulary and special tokens)."""
    return (
        type(a) is type(b)
        and a.get_vocab() == b.get_vocab()
        and (a.eos_token_id, a.pad_token_id) == (b.eos_token_id, b.pad_token_id)
    )


class RewardModelScorer:
    """Scores responses with a frozen reward model (eval mode, no grad, in chunks)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        policy_tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.shares_tokens = same_tokenizer(tokenizer, policy_tokenizer)

    def encode(self, responses: Responses) -> tuple[Tensor, Tensor]:
        """Ids and mask in the reward model's vocabulary: the policy's own ids when the
        tokenizers agree (a chat policy's rendering, its response ending with the end-of-turn
        token), else prompt + completion text re-tokenized and ended as a plain-text pair is in
        training (:func:`~rlhf_lightning.data.encoding.response_end_id`: EOS; the decoded texts
        have lost any chat template's special tokens)."""
        if self.shares_tokens:
            return responses.input_ids, responses.attention_mask
        sequences = [
            encode_prompt(self.tokenizer, prompt) + encode_text(self.tokenizer, completion)
            + [response_end_id(self.tokenizer, {"prompt": prompt})]
            for prompt, completion in zip(responses.prompts, responses.completions)
        ]
        device = responses.prompt_ids.device
        return pad(sequences, self.tokenizer.pad_token_id).to(device), attention_mask_for(sequences).to(device)

    def __call__(self, responses: Responses) -> Tensor:
        ids, mask = self.encode(responses)
        return score_sequences(self.model, ids, mask, batch_size=self.batch_size)


class EnsembleScorer:
    """Scores responses with a reward-model ensemble: ``mean - penalty * std`` of the members'
    scores (:func:`~rlhf_lightning.rlhf_math.ensemble_score`), each member a
    :class:`RewardModelScorer` (its own tokenizer and ``reward_offset``).

    ``last_spread`` ``(b,)`` holds the members' std per response of the last call, which
    :meth:`statistics` reports.
    """

    def __init__(self, members: Sequence[RewardModelScorer], penalty: float = 0.0) -> None:
        self.members, self.penalty = list(members), penalty
        self.last_spread: Tensor | None = None

    def __call__(self, responses: Responses) -> Tensor:
        member_scores = torch.stack([member(responses) for member in self.members])
        self.last_spread = pm.ensemble_spread(member_scores)
        return pm.ensemble_score(member_scores, self.penalty)

    def statistics(self) -> dict[str, Tensor]:
        """``objective/scores_spread``: the members' std, averaged over the last call's responses
        (none before the first call)."""
        return {} if self.last_spread is None else {"objective/scores_spread": self.last_spread.mean()}


class CallableScorer:
    """Scores decoded texts with ``fn(prompts, completions)``.

    A failing function stops the run with a message naming it. A NaN or infinite score is
    passed on with a warning naming an offending prompt: the PPO module then skips that update
    and :class:`~rlhf_lightning.guards.NonFiniteGuard` decides when to restore or stop.
    """

    def __init__(self, fn: TextRewardFn) -> None:
        self.fn = fn

    def __call__(self, responses: Responses) -> Tensor:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        try:
            scores = torch.as_tensor(self.fn(responses.prompts, responses.completions), dtype=torch.float32)
        except Exception as err:  # a user's function: say whose it was
            raise RuntimeError(f"reward function {name} failed: {err}") from err
        scores = scores.reshape(-1).to(responses.prompt_ids.device)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            warnings.warn(
                f"reward function {name} returned a non-finite score for {len(bad)} responses, "
                f"e.g. prompt {responses.prompts[bad[0]]!r} -> completion {responses.completions[bad[0]]!r}",
                stacklevel=2,
            )
        return scores


class ImplicitRewardScorer:
    """Scores responses with DPO's implicit reward (Rafailov et al. 2023)
    ``beta * (log pi_dpo(y | x) - log pi_ref(y | x))`` (:func:`~rlhf_lightning.rlhf_math.
    dpo_implicit_reward`): ``log pi(y | x)`` is the sum of the response tokens' log-probs
    (:func:`~rlhf_lightning.forwards.response_logprobs` at temperature 1, masked by the response
    mask), under the frozen DPO policy ``model`` and its frozen ``reference``, ``batch_size`` rows
    per forward. Both read the policy's token ids: their tokenizer must be the policy's."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module, beta: float, batch_size: int = 64) -> None:
        self.model, self.reference, self.beta, self.batch_size = model, reference, beta, batch_size

    @torch.no_grad()
    def sequence_logps(self, model: torch.nn.Module, responses: Responses) -> Tensor:
        """``log pi(y | x)`` ``(b,)`` of each response under ``model``."""
        ids, mask, response_mask = responses.input_ids, responses.attention_mask, responses.response_mask
        response_length = response_mask.shape[1]
        chunks = [
            pm.dpo_sequence_logps(response_logprobs(model, rows, rows_mask, response_length, 1.0)[0], rows_response)
            for rows, rows_mask, rows_response in zip(
                ids.split(self.batch_size), mask.split(self.batch_size), response_mask.split(self.batch_size))
        ]
        return torch.cat(chunks)

    def __call__(self, responses: Responses) -> Tensor:
        return pm.dpo_implicit_reward(self.sequence_logps(self.model, responses),
                                      self.sequence_logps(self.reference, responses), self.beta)
