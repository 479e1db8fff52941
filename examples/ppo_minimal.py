"""One PPO iteration for RLHF, written top to bottom, CleanRL style: no Lightning, no callbacks.

It does what ``PPOModule.training_step`` does (rlhf_lightning/modules/ppo.py, whose rollout is
``RolloutLoop.run`` in rlhf_lightning/rollout.py) with the same functions of
``rlhf_lightning.rlhf_math`` and ``rlhf_lightning.forwards``, in the same order, so that one
iteration here gives the same update as one iteration of the module on the same batch
(tests/test_ppo_minimal.py checks it). Left out: DDP, LoRA, the critic-free estimators, the
entropy bonus, the adaptive KL controller, the non-finite guards and the logs.

    python examples/ppo_minimal.py     # a random micro GPT-2 on the built-in task's gold reward
    python examples/ppo_minimal.py --policy outputs/sft/model --reward_model outputs/reward/model \
        --prompts prompts.jsonl --iterations 100
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rlhf_lightning import rlhf_math as pm
from rlhf_lightning.data import encode_prompt_record, read_prompts
from rlhf_lightning.data.encoding import attention_mask_for, pad
from rlhf_lightning.forwards import response_logprobs, score_sequences, token_values
from rlhf_lightning.generation import GenerationSettings, Responses, sample
from rlhf_lightning.models import load_causal_lm, load_reward_model, load_sequence_scorer, load_tokenizer
from rlhf_lightning.optim import warmup_schedule
from rlhf_lightning.reward_sources import same_tokenizer
from rlhf_lightning.tasks import SentimentTask, gold_rewards


@dataclass
class Args:
    policy: str = "preset:micro-gpt2"  # the SFT model folder (a preset: a random model, to try the script)
    reference: str | None = None  # the KL penalty's reference policy (None: a frozen copy of the starting policy)
    reward_model: str | None = None  # a reward-model folder with the policy's tokenizer (None: the gold reward)
    prompts: str | None = None  # a JSONL file of {"prompt": ...} (None: the built-in task's prompts)
    output_dir: str | None = None  # where the trained policy is saved (None: not saved)
    iterations: int = 10
    batch_size: int = 8  # prompts, hence responses, per iteration
    learning_rate: float = 1e-5  # of the policy and the critic, decayed linearly to 0
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl_coef: float = 0.05  # beta of the per-token KL penalty to the reference
    missing_eos_penalty: float | None = None  # the score of a response without EOS
    missing_eos_mode: str = "replace"  # or "subtract" the penalty from the score
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE's lambda
    epochs: int = 4  # passes over each batch of experience
    num_minibatches: int = 4  # optimiser steps per epoch
    cliprange: float = 0.2  # epsilon of the clipped ratio
    cliprange_value: float = 0.2  # how far a value may move from its rollout value
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0


ScoreFn = Callable[[Responses], Tensor]


def ppo_iteration(args: Args, policy, reference, critic, score_fn: ScoreFn, tokenizer, prompt_ids: Tensor,
                  prompt_mask: Tensor, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Tensor]:
    """One PPO iteration on left-padded prompts ``(b, p)``; returns the rollout's tensors."""
    # 1. Sample one response per prompt, cut after its first stop token: EOS, or a chat model's end of turn
    #    (the global RNG draws the tokens).
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    responses = sample(policy, tokenizer, settings, prompt_ids, prompt_mask)
    input_ids, attention_mask = responses.input_ids, responses.attention_mask  # prompt + response: (b, p + r)
    mask = responses.response_mask  # (b, r): True on the response's real tokens
    r = mask.shape[1]

    # 2. No-grad forwards: log pi_old(y_t), log pi_ref(y_t) and V_old(s_t) at every response token.
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy, input_ids, attention_mask, r, args.temperature)
        ref_logprobs, _ = response_logprobs(reference, input_ids, attention_mask, r, args.temperature)
        values = token_values(critic, input_ids, attention_mask, r)
        logprobs, ref_logprobs, values = (x.masked_fill(~mask, 0.0) for x in (logprobs, ref_logprobs, values))
        # 3. One score per response (a reward model, or any rule on the texts).
        scores = score_fn(responses).to(logprobs.device, torch.float32)

    # 4. A response that never emitted a stop token gets the penalty as its score ("replace") or loses it ("subtract").
    contains_eos = pm.has_eos(responses.response_ids, responses.stop_ids)
    scores = pm.apply_missing_eos_penalty(scores, contains_eos, args.missing_eos_penalty, args.missing_eos_mode)
    # 5. Per-token reward: r_t = -beta * (log pi_old - log pi_ref), plus the score on the last real token.
    rewards, kl, _ = pm.shape_rewards(scores, logprobs, ref_logprobs, mask, args.kl_coef)
    # 6. GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t.
    advantages, returns = pm.gae(rewards, values, mask, args.gamma, args.lam)
    # 7. Whiten the advantages over the batch's real tokens (mean 0, std 1); the returns stay as they are.
    advantages = pm.masked_whiten(advantages, mask)

    # 8. The update: `epochs` passes over the batch in shuffled minibatches, one optimiser step each.
    batch_size = len(scores)
    assert batch_size % args.num_minibatches == 0, "batch_size must divide by num_minibatches"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(args.epochs):
        order = torch.randperm(batch_size, device=input_ids.device)
        for index in order.split(batch_size // args.num_minibatches):
            ids, attention, mb_mask = input_ids[index], attention_mask[index], mask[index]
            new_logprobs, _ = response_logprobs(policy, ids, attention, r, args.temperature)
            new_values = token_values(critic, ids, attention, r)
            # ratio_t = exp(logp - logp_old); L_pg = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
            pg_loss, _ = pm.policy_loss(new_logprobs, logprobs[index], advantages[index], mb_mask, args.cliprange)
            # L_v = 0.5 mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
            vf_loss, _ = pm.value_loss(new_values, values[index], returns[index], mb_mask, args.cliprange_value)
            loss = pg_loss + args.vf_coef * vf_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # one norm over policy and critic
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the learning rate decays once per optimiser step

    return dict(response_ids=responses.response_ids, response_mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                values=values, scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns)


def load_models(args: Args, tokenizer) -> tuple:
    """Policy, frozen reference (``reference``, else a copy of the starting policy), critic, score function."""
    policy = load_causal_lm(args.policy, tokenizer).train()
    reference = load_causal_lm(args.reference, tokenizer) if args.reference else copy.deepcopy(policy)
    reference.eval().requires_grad_(False)
    if args.reward_model is None:  # the built-in task's gold annotator scores the texts
        critic = load_sequence_scorer(args.policy, tokenizer, role="critic").train()
        return policy, reference, critic, lambda r: torch.tensor(gold_rewards(r.prompts, r.completions))
    if not same_tokenizer(load_tokenizer(args.reward_model), tokenizer):
        raise SystemExit("this example needs a reward model with the policy's tokenizer (PPOModule has no such limit)")
    reward_model = load_reward_model(args.reward_model, tokenizer).eval().requires_grad_(False)
    critic = load_sequence_scorer(args.reward_model, tokenizer, role="critic").train()  # V starts from the reward model
    return policy, reference, critic, lambda r: score_sequences(reward_model, r.input_ids, r.attention_mask)


def make_optimizer(args: Args, policy, critic) -> tuple:
    """AdamW (eps 1e-5, no weight decay) on policy and critic, and a linear decay to 0 over the run."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]} for model in (policy, critic)]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    return optimizer, warmup_schedule(optimizer, "linear", 0, args.iterations * args.epochs * args.num_minibatches)


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(Args):
        kind = int if field.type == "int" else float if field.type.startswith("float") else str
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    return Args(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.policy)
    policy, reference, critic, score_fn = (m.to(device) if isinstance(m, torch.nn.Module) else m
                                           for m in load_models(args, tokenizer))
    optimizer, scheduler = make_optimizer(args, policy, critic)
    records = read_prompts(args.prompts) if args.prompts else SentimentTask(seed=args.seed).prompt_records(256)
    prompts = [encode_prompt_record(record, tokenizer, max_length=64) for record in records]
    for iteration in range(args.iterations):
        batch = [prompts[i] for i in torch.randperm(len(prompts))[: args.batch_size].tolist()]
        prompt_ids = pad(batch, tokenizer.pad_token_id, side="left").to(device)
        prompt_mask = attention_mask_for(batch, side="left").to(device)
        out = ppo_iteration(args, policy, reference, critic, score_fn, tokenizer, prompt_ids, prompt_mask, optimizer,
                            scheduler)
        kl = pm.masked_sum(out["kl"], out["response_mask"], dim=1).mean()
        length = out["response_mask"].sum(1).float().mean()
        print(f"iteration {iteration + 1}: score {out['scores'].mean():.3f}  kl {kl:.4f}  length {length:.1f}")
    if args.output_dir:
        policy.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
