"""Hand-computed checks of rlhf_lightning.rlhf_math (expected numbers are written out)."""

import math
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_lightning.rlhf_math import (
    leave_one_out_scores,
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    dpo_implicit_reward,
    dpo_loss,
    dpo_sequence_logps,
    ensemble_score,
    ensemble_spread,
    entropy_from_logits,
    explained_variance,
    first_eos_mask,
    gae,
    grpo_advantages,
    has_eos,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    reduce_token_losses,
    reinforce_pp_advantages,
    shape_rewards,
    value_loss,
)

LN2 = math.log(2.0)
D = torch.float64


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------ logits
def test_logprobs_hand_values_three_token_vocab():
    # logits = log([1, 2, 3]) -> softmax = [1/6, 2/6, 3/6]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    tokens = torch.tensor([[2, 0]])
    # token 2: log(3/6) = -0.693147; token 0: log(1/6) = -1.791759
    close(logprobs_from_logits(logits, tokens), [[-0.693147, -1.791759]])
    # logits [0, 0, 2 ln2] / T=2 -> [0, 0, ln2] -> exp = [1, 1, 2], sum 4
    logits = torch.tensor([[[0.0, 0.0, 2 * LN2]] * 2])
    # token 2: log(2/4) = -0.693147; token 0: log(1/4) = -1.386294
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[-0.693147, -1.386294]])


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 8, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax_gather_values_and_grads(chunk_size, dtype, temperature):
    g = torch.Generator().manual_seed(0)
    # a non-contiguous slice along time, as the PPO module takes logits[:, ctx - 1 : -1]
    full = (3 * torch.randn(3, 6, 11, generator=g)).to(dtype).requires_grad_()
    logits = full[:, 1:-1]
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    grad_out = torch.randn(3, 4, generator=g)

    out = logprobs_from_logits(logits, tokens, temperature, chunk_size)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), full)

    ref_full = full.detach().float().requires_grad_()
    ref_logp = torch.log_softmax(ref_full[:, 1:-1] / temperature, dim=-1)
    ref = ref_logp.gather(-1, tokens[..., None]).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref * grad_out).sum(), ref_full)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), atol=1e-2, rtol=1e-2)


def test_logprobs_gradcheck_float64():
    logits = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, tokens, 1.3, 2), (logits,))


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                self.largest = max(self.largest, o.numel())
        return out


def test_no_full_vocab_float32_tensor_in_forward_or_backward():
    v, chunk = 1000, 16
    logits = torch.randn(4, 33, v).bfloat16().requires_grad_()
    tokens = torch.randint(0, v, (4, 32))
    with _LargestFloat32() as mode:
        logprobs_from_logits(logits[:, :-1], tokens, 0.7, chunk_size=chunk).sum().backward()
        with torch.no_grad():
            entropy_from_logits(logits[:, :-1], 0.7, chunk_size=chunk)
    assert mode.largest == chunk * v  # one chunk; the full batch would be 4 * 32 * v


def test_entropy_hand_values():
    # uniform over 3: H = ln 3 = 1.098612
    # p = [1/6, 1/3, 1/2]: H = 1/6 ln6 + 1/3 ln3 + 1/2 ln2
    #                        = 0.298627 + 0.366204 + 0.346574 = 1.011404
    logits = torch.stack([torch.zeros(3), torch.log(torch.tensor([1.0, 2.0, 3.0]))])[None]
    close(entropy_from_logits(logits), [[1.098612, 1.011404]])
    # [0, 0, 2 ln2] / T=2 -> p = [1/4, 1/4, 1/2]: H = 2 * (1/4 ln4) + 1/2 ln2 = 1.5 ln2 = 1.039721
    close(entropy_from_logits(torch.tensor([[[0.0, 0.0, 2 * LN2]]]), temperature=2.0), [[1.039721]])


def test_entropy_matches_categorical_in_chunks():
    logits = torch.randn(3, 5, 7).to(torch.bfloat16)
    ref = torch.distributions.Categorical(logits=logits.float() / 0.5).entropy()
    for chunk_size in (None, 1, 4):
        out = entropy_from_logits(logits, 0.5, chunk_size)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- KL
def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0]], dtype=D)
    # log_ratio = logp - ref = [0.5, -1.0]
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    # 0.5 * [0.25, 1.0]
    close(kl_penalty(logp, ref, "k2"), [[0.125, 0.5]])
    # r = exp(ref - logp) = [e^-0.5, e^1]; (r - 1) - log r:
    # e^-0.5 - 1 + 0.5 = 0.606531 - 0.5 = 0.106531; e - 1 - 1 = 0.718282
    close(kl_penalty(logp, ref, "k3"), [[0.106531, 0.718282]])
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(logp, ref, "k4")


# ----------------------------------------------------------------------- masked stats
NAN, INF = float("nan"), float("inf")


def test_masked_sum_mean_var_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, INF, NAN]], dtype=D)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # float mask
    close(masked_sum(values, mask), 10.0)  # 1 + 2 + 3 + 4
    close(masked_mean(values, mask), 2.5)  # 10 / 4
    close(masked_sum(values, mask, dim=1), [6.0, 4.0])
    close(masked_mean(values, mask, dim=1), [2.0, 4.0])  # 6 / 3, 4 / 1
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(values, mask), 5 / 3)  # unbiased: 5 / (4 - 1)
    close(masked_var(values, mask, unbiased=False), 1.25)  # 5 / 4
    empty = torch.zeros_like(mask)
    close(masked_mean(values, empty), 0.0)  # empty mask: 0, not nan
    close(masked_var(values, empty), 0.0)


def test_masked_whiten_hand_values():
    values = torch.tensor([[1.0, 2.0, 1e30], [3.0, 4.0, NAN]], dtype=D)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # mean 2.5, unbiased var 5/3, std 1.290994: (x - 2.5) / 1.290994
    expected = [[-1.161895, -0.387298, 0.0], [0.387298, 1.161895, 0.0]]
    close(masked_whiten(values, mask), expected)
    # shift_mean=False adds the mean 2.5 back (padding stays 0)
    expected = [[1.338105, 2.112702, 0.0], [2.887298, 3.661895, 0.0]]
    close(masked_whiten(values, mask, shift_mean=False), expected)


def test_masked_whiten_in_place_all_reduce_like_torch_distributed():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    mask = torch.ones(1, 4)

    def all_reduce_two_identical_ranks(x):  # like dist.all_reduce: in place, returns None
        x.mul_(2)

    # world = two copies of [1, 2, 3, 4]: n = 8, mean 2.5, sum sq dev = 2 * 5 = 10, var = 10 / 7
    # std = 1.195229 -> [-1.5, -0.5, 0.5, 1.5] / 1.195229
    out = masked_whiten(values, mask, all_reduce=all_reduce_two_identical_ranks)
    close(out, [[-1.254990, -0.418330, 0.418330, 1.254990]])


def test_masked_whiten_two_ranks_equals_global_whiten():
    slots, barrier = [None, None], threading.Barrier(2)

    def make_all_reduce(rank):
        def all_reduce(x):
            slots[rank] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return all_reduce

    rank_values = [torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[3.0, -7.0, 4.0]])]
    rank_masks = [torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 1]])]
    outs = [None, None]

    def run(rank):
        all_reduce = make_all_reduce(rank)
        outs[rank] = masked_whiten(rank_values[rank], rank_masks[rank], all_reduce=all_reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [th.start() for th in threads]
    [th.join(timeout=10) for th in threads]
    # global entries [1, 2, 3, 4]: same numbers as the single-process hand test above
    close(outs[0], [[-1.161895, -0.387298, 0.0]])
    close(outs[1], [[0.387298, 0.0, 1.161895]])


# --------------------------------------------------------------------------- sequences
def test_first_eos_mask_has_eos_last_token_index():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 0, 0]])
    T, F = True, False
    expected = [[T, T, F, F], [T, T, T, T], [T, F, F, F], [T, T, F, F]]
    assert first_eos_mask(tokens, eos, pad).tolist() == expected
    # without pad_token_id the pads of row 3 count as response tokens
    assert first_eos_mask(tokens, eos).tolist()[3] == [T, T, T, T]
    # pad == eos (e.g. GPT-2): everything after the first EOS is padding
    assert first_eos_mask(torch.tensor([[5, 2, 2, 2]]), 2, 2).tolist() == [[T, T, F, F]]
    assert has_eos(tokens, eos).tolist() == [T, F, T, F]
    assert last_token_index(torch.tensor(expected)).tolist() == [1, 3, 0, 1]
    # all-False row -> 0 (documented); non-prefix mask -> the last True
    assert last_token_index(torch.tensor([[F, F, F], [T, F, T]])).tolist() == [0, 2]


# ------------------------------------------------------------------------------ rewards
def test_shape_rewards_hand_values():
    scores = torch.tensor([1.0, -0.5, 3.0], dtype=D)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 9.0], [5.0, 5.0, 5.0]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -0.5, -9.0], [0.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards, kl, non_score = shape_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref at real tokens: row0 [0.5, -1, 0], row1 [1, -0.5, (pad) 0]
    close(kl, [[0.5, -1.0, 0.0], [1.0, -0.5, 0.0], [0.0, 0.0, 0.0]])
    # -0.1 * kl
    close(non_score, [[-0.05, 0.1, 0.0], [-0.1, 0.05, 0.0], [0.0, 0.0, 0.0]])
    # + score at the last real token: row0 t=2: 0 + 1 = 1; row1 t=1: 0.05 - 0.5 = -0.45;
    # row2 has no real token: no reward anywhere
    close(rewards, [[-0.05, 0.1, 1.0], [-0.1, -0.45, 0.0], [0.0, 0.0, 0.0]])


def test_apply_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    contains = torch.tensor([True, False, False])
    close(apply_missing_eos_penalty(scores, contains, -1.0, "replace"), [1.0, -1.0, -1.0])
    close(apply_missing_eos_penalty(scores, contains, 1.0, "subtract"), [1.0, 1.0, 2.0])  # 2-1, 3-1
    close(apply_missing_eos_penalty(scores, contains, None), [1.0, 2.0, 3.0])
    close(scores, [1.0, 2.0, 3.0])  # not modified in place
    with pytest.raises(ValueError, match="replace"):
        apply_missing_eos_penalty(scores, contains, 1.0, "multiply")


# ------------------------------------------------------------------------------ GAE
def test_gae_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 5.0]], dtype=D)
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 99.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # row 0: delta2 = 2 + 0.9 * 0 - 1.5 = 0.5;    A2 = 0.5
    #        delta1 = 0 + 0.9 * 1.5 - 1.0 = 0.35; A1 = 0.35 + 0.72 * 0.5 = 0.71
    #        delta0 = 1 + 0.9 * 1.0 - 0.5 = 1.4;  A0 = 1.4 + 0.72 * 0.71 = 1.9112
    # row 1 (t=2 is padding, so V after t=1 is 0): delta1 = 0 + 0 - 1.0 = -1; A1 = -1
    #        delta0 = 1.4; A0 = 1.4 + 0.72 * -1 = 0.68
    close(adv, [[1.9112, 0.71, 0.5], [0.68, -1.0, 0.0]])
    # returns = A + V: [2.4112, 1.71, 2.0], [1.18, 0.0, (pad) 0]
    close(ret, [[2.4112, 1.71, 2.0], [1.18, 0.0, 0.0]])


def test_gae_padding_inside_a_row_ends_the_episode_there():
    rewards = torch.tensor([[1.0, 5.0, 2.0]], dtype=D)
    values = torch.tensor([[0.5, 9.0, 1.5]], dtype=D)
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    # t2: A = 2 - 1.5 = 0.5; t1 (padding): A = 0, V = 0; t0: A = 1 + 0.9 * 0 - 0.5 + 0.72 * 0
    close(adv, [[0.5, 0.0, 0.5]])
    close(ret, [[1.0, 0.0, 2.0]])


def test_gae_gamma_lam_one_is_monte_carlo():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    values = torch.tensor([[1.0, 1.0, 1.0]], dtype=D)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # returns-to-go: [1 + 2 + 3, 2 + 3, 3] = [6, 5, 3]; A = G - V
    close(ret, [[6.0, 5.0, 3.0]])
    close(adv, [[5.0, 4.0, 2.0]])


# ------------------------------------------------------------------------------ losses
def _policy_case():
    # ratios (row0) 1.5 with A=+1, 0.5 with A=+2; (row1) 0.5 with A=-1, 1.1 with A=-2; t=2 pad
    old = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -2.0, 0.0]], dtype=D)
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.1, 1.0]], dtype=D))
    adv = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return (old + log_ratio).requires_grad_(), old, adv, mask


def test_policy_loss_hand_values_and_grad():
    logp, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # (-A * r, -A * clip(r, 0.8, 1.2)) -> max:
    #   r=1.5, A=+1: (-1.5, -1.2) -> -1.2 clipped
    #   r=0.5, A=+2: (-1.0, -1.6) -> -1.0
    #   r=0.5, A=-1: ( 0.5,  0.8) ->  0.8 clipped
    #   r=1.1, A=-2: ( 2.2,  2.2) ->  2.2 (tie, not counted as clipped)
    close(loss, (-1.2 - 1.0 + 0.8 + 2.2) / 4)  # = 0.2
    close(stats.clipfrac, 0.5)  # 2 / 4
    # 0.5 * mean(ln1.5^2, ln0.5^2, ln0.5^2, ln1.1^2)
    # = 0.5 * (0.164402 + 0.480453 + 0.480453 + 0.009084) / 4 = 0.141799
    close(stats.approxkl, 0.141799)
    close(stats.ratio_mean, 0.9)  # (1.5 + 0.5 + 0.5 + 1.1) / 4
    close(stats.ratio_var, 0.18)  # (0.6^2 + 0.4^2 + 0.4^2 + 0.2^2) / 4 = 0.72 / 4
    loss.backward()
    # d/dlogp of -A * r / 4 = -A * r / 4 where unclipped, 0 where clipped or padding:
    # r=0.5, A=2: -0.25; r=1.1, A=-2: +0.55
    close(logp.grad, [[0.0, -0.25, 0.0], [0.0, 0.55, 0.0]])


def test_policy_loss_reductions_hand_values():
    logp, old, adv, _ = _policy_case()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # rows of 2 and 1 real tokens
    # per-token losses (see above): row 0 [-1.2, -1.0], row 1 [0.8]
    close(policy_loss(logp, old, adv, mask)[0], (-1.2 - 1.0 + 0.8) / 3)  # token_mean, the default
    close(policy_loss(logp, old, adv, mask, reduction="sequence_mean")[0], (-1.1 + 0.8) / 2)
    loss, stats = policy_loss(logp, old, adv, mask, reduction="constant", max_length=4)
    close(loss, (-1.2 - 1.0 + 0.8) / (2 * 4))
    close(stats.clipfrac, 2 / 3)  # statistics stay token means: r=1.5 and r=0.5 (A=-1) are clipped


def test_ratio_is_exactly_one_when_logprobs_equal_old():
    logp = torch.randn(3, 5)
    adv = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss, stats = policy_loss(logp.clone().requires_grad_(), logp, adv, mask)
    assert stats.ratio_mean.item() == 1.0 and stats.ratio_var.item() == 0.0
    assert stats.clipfrac.item() == 0.0 and stats.approxkl.item() == 0.0
    torch.testing.assert_close(loss, -masked_mean(adv, mask))


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 2.0]], dtype=D)
    old = torch.tensor([[1.5, 1.0, 0.0]], dtype=D)
    returns = torch.tensor([[0.0, 3.0, 0.0]], dtype=D)
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    # t0: (1 - 0)^2 = 1; clip(1, 1.3, 1.7) = 1.3 -> 1.69   -> 1.69 (clipped)
    # t1: (2 - 3)^2 = 1; clip(2, 0.8, 1.2) = 1.2 -> 3.24   -> 3.24 (clipped)
    # t2: (2 - 0)^2 = 4; clip(2, -0.2, 0.2) = 0.2 -> 0.04  -> 4
    close(loss, 0.5 * (1.69 + 3.24 + 4.0) / 3)  # = 1.488333
    close(clipfrac, 2 / 3)


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)
    # returns - values = [0, 0, 0, 1]: var = (3 * 0.25^2 + 0.75^2) / 3 = 0.25; var(returns) = 5/3
    # 1 - 0.25 / (5/3) = 1 - 0.15 = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, 0.0]], dtype=D)
    close(explained_variance(values, returns, mask), 0.85)
    assert explained_variance(returns, torch.ones_like(returns), mask).isnan()  # var(returns) = 0


def test_padding_never_changes_any_loss_or_statistic():
    g = torch.Generator().manual_seed(1)
    b, t = 3, 6
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    names = ["logp", "old_logp", "ref_logp", "adv", "values", "old_values", "returns", "rewards"]
    clean = {k: torch.randn(b, t, generator=g) for k in names}
    scores = torch.randn(b, generator=g)

    def everything(x):
        logp = x["logp"].clone().requires_grad_()
        values = x["values"].clone().requires_grad_()
        pl, st = policy_loss(logp, x["old_logp"], x["adv"], mask)
        vl, vclip = value_loss(values, x["old_values"], x["returns"], mask)
        (pl + vl).backward()
        out = {"pl": pl, "vl": vl, "vclip": vclip, **vars(st)}
        out["logp_grad"], out["values_grad"] = logp.grad, values.grad
        for est in ("k1", "k2", "k3"):
            for name, v in zip("rkn", shape_rewards(scores, logp, x["ref_logp"], mask, 0.05, est)):
                out[f"{name}_{est}"] = v
        out["adv"], out["ret"] = gae(x["rewards"], values.detach(), mask, 0.99, 0.95)
        out["white"] = masked_whiten(x["adv"], mask)
        out["ev"] = explained_variance(x["values"], x["returns"], mask)
        out["mean"], out["var"] = masked_mean(x["adv"], mask), masked_var(x["adv"], mask)
        return {k: v.detach() for k, v in out.items()}

    expected = everything(clean)
    for k in ("logp_grad", "values_grad"):
        assert torch.all(expected[k][~mask] == 0)
    for junk in (1e30, -1e30, INF, -INF, NAN):
        dirty = {k: torch.where(mask, v, torch.full_like(v, junk)) for k, v in clean.items()}
        got = everything(dirty)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], msg=f"{k} changed with padding {junk}")


# ------------------------------------------------------------------------ KL controllers
def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    # e = clip(12/6 - 1 = 1, -0.2, 0.2) = 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.value == pytest.approx(0.1 * 1.00512)  # 0.100512
    ctl.update(current_kl=3.0, n_steps=256)
    # e = clip(3/6 - 1 = -0.5) = -0.2; mult = 1 - 0.00512 = 0.99488 -> 0.100512 * 0.99488
    assert ctl.value == pytest.approx(0.09999737856)
    state = ctl.state_dict()
    ctl.update(current_kl=6.6, n_steps=256)
    # e = 6.6/6 - 1 = 0.1 (inside the clip); mult = 1 + 0.1 * 256 / 10000 = 1.00256
    assert ctl.value == pytest.approx(0.09999737856 * 1.00256)
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(state)
    assert restored.value == pytest.approx(0.09999737856)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_leave_one_out_scores_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, -1.0])
    # group 1: 1 - (2+3+4)/3 = -2; 2 - 8/3 = -2/3; 3 - 7/3 = 2/3; 4 - 2 = 2
    # group 2: 0 - 0 = 0; 0 - 0 = 0; 1 - (-1/3) = 4/3; -1 - 1/3 = -4/3
    expected = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0, 0.0, 0.0, 4 / 3, -4 / 3])
    torch.testing.assert_close(leave_one_out_scores(scores, 4), expected)
    # groups of 2: each score minus its partner's
    torch.testing.assert_close(leave_one_out_scores(scores, 2), torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 2.0, -2.0]))
    assert leave_one_out_scores(scores, 1) is scores
    with pytest.raises(ValueError, match="groups of 3"):
        leave_one_out_scores(scores, 3)


def test_ensemble_score_is_mean_minus_k_population_std_hand_values():
    members = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0]])  # 2 members x 3 responses
    # means 2, 2, 2; population stds sqrt(((1-2)^2 + (3-2)^2) / 2) = 1, 0, sqrt((4 + 4) / 2) = 2
    close(ensemble_spread(members), [1.0, 0.0, 2.0])
    close(ensemble_score(members, 0.5), [2.0 - 0.5, 2.0, 2.0 - 1.0])
    close(ensemble_score(members), [2.0, 2.0, 2.0])  # penalty 0: the plain mean
    # three members 0, 3, 6: mean 3, std sqrt((9 + 0 + 9) / 3) = sqrt(6) (the m - 1 form would give 3)
    close(ensemble_score(torch.tensor([[0.0], [3.0], [6.0]]), 1.0), [3.0 - math.sqrt(6.0)])
    close(ensemble_spread(torch.tensor([[5.0, -1.0]])), [0.0, 0.0])  # one member: no spread


# ------------------------------------------------------------------ critic-free advantages
GROUP = torch.tensor([1.0, 2.0, 3.0, 6.0])  # four responses to one prompt, with known rewards


def test_group_of_four_gives_known_advantages_for_each_estimator():
    # mean 3, deviations [-2, -1, 0, 3]; squares sum 4 + 1 + 0 + 9 = 14
    # GRPO: unbiased std sqrt(14 / 3) = 2.160247, + eps 1e-4 = 2.160347
    #   [-2, -1, 0, 3] / 2.160347 = [-0.925777, -0.462889, 0, 1.388666]
    close(grpo_advantages(GROUP, 4), [-0.925777, -0.462889, 0.0, 1.388666])
    # Dr. GRPO: the deviations themselves
    close(grpo_advantages(GROUP, 4, scale_by_std=False), [-2.0, -1.0, 0.0, 3.0])
    # RLOO: 1 - (2+3+6)/3 = -8/3; 2 - (1+3+6)/3 = -4/3; 3 - (1+2+6)/3 = 0; 6 - (1+2+3)/3 = 4
    close(leave_one_out_scores(GROUP, 4), [-2.666667, -1.333333, 0.0, 4.0])


def test_grpo_groups_are_consecutive_rows_and_equal_scores_give_zero():
    scores = torch.cat([torch.tensor([5.0, 5.0, 5.0, 5.0]), GROUP])
    # first group: std 0, so 0 / (0 + eps) = 0 (no nan); second group as above
    close(grpo_advantages(scores, 4), [0.0, 0.0, 0.0, 0.0, -0.925777, -0.462889, 0.0, 1.388666])
    # groups of 2: [5, 5] -> 0; [1, 2]: mean 1.5, std sqrt(0.5) = 0.707107 -> -/+ 0.5 / 0.707207 = 0.707007
    close(grpo_advantages(scores, 2)[4:6], [-0.707007, 0.707007])
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(scores, 3)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        grpo_advantages(scores, 1)


def test_reinforce_pp_returns_to_go_with_kl_in_reward_whitened_over_the_batch():
    # Four responses (the group above's rewards would do; here scores 1, 0, 2, -1), KL in the
    # reward with kl_coef 0.5 and k1 = log-ratio per token:
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=D)
    log_ratio = torch.tensor([[0.2, 0.0], [0.4, NAN], [0.0, 0.2], [0.0, 0.0]], dtype=D)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    rewards, _, _ = shape_rewards(scores, log_ratio, torch.zeros_like(log_ratio), mask, kl_coef=0.5)
    # rewards: [-0.1, 1.0], [-0.2], [0.0, -0.1 + 2 = 1.9], [0.0, -1.0]
    # returns-to-go (gamma 1): [0.9, 1.0], [-0.2], [1.9, 1.9], [-1.0, -1.0]
    # over the 7 real tokens: sum 3.5, mean 0.5; deviations 0.4, 0.5, -0.7, 1.4, 1.4, -1.5, -1.5
    # squares sum 0.16 + 0.25 + 0.49 + 1.96 + 1.96 + 2.25 + 2.25 = 9.32; unbiased std sqrt(9.32 / 6) = 1.246328
    expected = [[0.320943, 0.401179], [-0.561650, 0.0], [1.123300, 1.123300], [-1.203536, -1.203536]]
    close(reinforce_pp_advantages(rewards, mask), expected)
    # gamma on one row of rewards [1, 0, 2]:
    # gamma 0.5: G = [1 + 0.5 * 1, 0 + 0.5 * 2, 2] = [1.5, 1, 2]; mean 1.5, deviations [0, -0.5, 0.5],
    #   unbiased std sqrt(0.5 / 2) = 0.5 -> [0, -1, 1]
    # gamma 1: G = [3, 2, 2]; mean 7/3, deviations [2/3, -1/3, -1/3], std sqrt((6/9) / 2) = 0.577350
    #   -> [1.154701, -0.577350, -0.577350]
    row, full = torch.tensor([[1.0, 0.0, 2.0]], dtype=D), torch.ones(1, 3, dtype=torch.bool)
    close(reinforce_pp_advantages(row, full, gamma=0.5), [[0.0, -1.0, 1.0]])
    close(reinforce_pp_advantages(row, full), [[1.154701, -0.577350, -0.577350]])


def test_grpo_k3_kl_in_the_loss_is_kl_penalty_k3_with_its_gradient():
    # pi_ref / pi = 2 on the first token (ref = logp + ln 2), 1 on the second:
    # k3 = 2 - ln 2 - 1 = 0.306853 and 1 - 0 - 1 = 0
    logp = torch.tensor([[-1.0, -0.5, 7.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.0 + LN2, -0.5, 0.0]], dtype=D)
    mask = torch.tensor([[True, True, False]])
    kl = kl_penalty(logp, ref, "k3")
    close(kl[mask], [0.306853, 0.0])
    reduce_token_losses(kl, mask, "token_mean").backward()
    # d/dlogp (e^(ref - logp) - (ref - logp) - 1) = 1 - e^(ref - logp) = 1 - 2 = -1 and 1 - 1 = 0; / 2 tokens
    close(logp.grad, [[-0.5, 0.0, 0.0]])


def test_reduce_token_losses_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF]], dtype=D)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    close(reduce_token_losses(values, mask, "sequence_mean"), 3.0)  # (mean(1,2,3) = 2 + 4) / 2
    close(reduce_token_losses(values, mask, "token_mean"), 2.5)  # (1 + 2 + 3 + 4) / 4
    close(reduce_token_losses(values, mask, "constant"), 10 / 6)  # sum 10 / (2 rows * width 3)
    close(reduce_token_losses(values, mask, "constant", max_length=5), 1.0)  # 10 / (2 * 5)
    with pytest.raises(ValueError, match="sequence_mean.*token_mean.*constant"):
        reduce_token_losses(values, mask, "sum")


# --------------------------------------------------------------------------------- DPO
def test_dpo_sequence_logps_sum_or_ipo_mean():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [NAN, -4.0, NAN]], dtype=D)
    mask = torch.tensor([[True, True, True], [False, True, False]])  # prompt and padding masked
    close(dpo_sequence_logps(token_logps, mask, "sigmoid"), [-6.0, -4.0])
    close(dpo_sequence_logps(token_logps, mask, "ipo"), [-2.0, -4.0])


def test_dpo_implicit_reward_hand_values():
    # beta 0.1: 0.1 * (-4 - -5) = 0.1; 0.1 * (-6 - -5) = -0.1; equal log-probs: 0
    policy, reference = torch.tensor([-4.0, -6.0, -3.0]), torch.tensor([-5.0, -5.0, -3.0])
    rewards = dpo_implicit_reward(policy, reference, 0.1)
    assert rewards.dtype == torch.float32
    close(rewards, [0.1, -0.1, 0.0])
    close(dpo_implicit_reward(policy.double(), reference.double(), 2.0), [2.0, -2.0, 0.0])  # float32 out


def test_dpo_loss_hand_values():
    # pair 0: policy chosen -4, rejected -6; reference -5 and -5; beta 0.5
    #   h = (-4 + 6) - (-5 + 5) = 2, beta h = 1; rewards 0.5 * (-4 + 5) = 0.5, 0.5 * (-6 + 5) = -0.5
    # pair 1: everything -3: h = 0, rewards 0
    pc, pr = torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -3.0])
    rc, rr = torch.tensor([-5.0, -3.0]), torch.tensor([-5.0, -3.0])
    # sigmoid: -log sigmoid(1) = log(1 + e^-1) = 0.313262; h = 0: log 2 = 0.693147; mean 0.503204
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, 0.503204)
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.5, 0.0])
    # pair 0 alone, label smoothing 0.1: 0.9 * 0.313262 + 0.1 * log(1 + e^1) = 0.281936 + 0.131326 = 0.413262
    close(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 0.5, "sigmoid", 0.1)[0], 0.413262)
    # robust, 0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / (1 - 0.2) = 0.150610 / 0.8 = 0.188262
    close(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 0.5, "robust", 0.1)[0], 0.188262)
    # ipo: (h - 1 / (2 * 0.5))^2 = (2 - 1)^2 = 1; pair 1: (0 - 1)^2 = 1
    close(dpo_loss(pc, pr, rc, rr, 0.5, "ipo")[0], 1.0)
    close(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 1.0, "ipo")[0], 2.25)  # beta 1: (2 - 0.5)^2
    with pytest.raises(ValueError, match="sigmoid.*ipo.*robust"):
        dpo_loss(pc, pr, rc, rr, 0.5, "hinge")
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        dpo_loss(pc, pr, rc, rr, 0.5, "robust", 0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_loss_is_log2_with_zero_rewards_when_policy_equals_reference(loss_type, label_smoothing):
    logps = torch.tensor([-3.0, -10.0, -0.5], requires_grad=True)
    other = torch.tensor([-7.0, -1.0, -0.5])
    loss, chosen, rejected = dpo_loss(logps, other, logps.detach(), other, 0.1, loss_type, label_smoothing)
    close(loss, LN2)  # (1 - eps) log 2 + eps log 2, and for robust ((1 - eps) - eps) log 2 / (1 - 2 eps)
    close(chosen, [0.0, 0.0, 0.0])
    close(rejected, [0.0, 0.0, 0.0])
    loss.backward()
    # d/d pi_c at h = 0, where sigmoid(+-beta h) = 1/2: sigmoid: -(1 - eps) beta / 2 + eps beta / 2
    # = -beta (1 - 2 eps) / 2 (label smoothing weakens the pull); robust: (-(1 - eps) beta / 2
    # - eps beta / 2) / (1 - 2 eps) = -beta / (2 (1 - 2 eps)) (it strengthens it); / 3 pairs
    eps = label_smoothing
    per_pair = -0.1 * (1 - 2 * eps) / 2 if loss_type == "sigmoid" else -0.1 / (2 * (1 - 2 * eps))
    close(logps.grad, [per_pair / 3] * 3)
