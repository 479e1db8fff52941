"""The token sampler of every stage (rlhf_lightning.generation.InverseCDFSampler): the
distribution it draws from, and that transformers' generate takes its draws with every
sampling setting the package passes (temperature, top-k, top-p)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from rlhf_lightning.generation import InverseCDFSampler, drawn_by_inverse_cdf, generate_responses, sampling_config
from rlhf_lightning.models import byte_tokenizer


def draw_counts(probs: list[float], draws: int, seed: int = 0) -> torch.Tensor:
    """How often each token is drawn from ``probs`` (one row repeated ``draws`` times)."""
    scores = torch.tensor(probs).log().expand(draws, -1).contiguous()
    torch.manual_seed(seed)
    out = InverseCDFSampler()(torch.zeros(draws, 1, dtype=torch.long), scores)
    assert torch.equal((out == 0).sum(-1), torch.ones(draws, dtype=torch.long))  # one token per row
    assert torch.isinf(out[out != 0]).all() and (out[out != 0] < 0).all()  # -inf elsewhere
    return (out == 0).sum(0)


def test_draws_follow_the_softmax_of_the_scores():
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0]
    draws = 200_000
    frequencies = draw_counts(probs, draws).double() / draws
    # binomial standard error at p = 0.5 is 0.0011; 5 of them
    assert torch.allclose(frequencies, torch.tensor(probs, dtype=torch.double), atol=0.0056)
    assert frequencies[-1] == 0  # probability 0 (a masked token) is never drawn


def test_a_rare_token_keeps_its_share_in_a_large_vocabulary():
    # the last of 50k entries, after a cumulative sum over all the others
    vocab, rare = 50_000, 1e-2
    probs = [(1 - rare) / (vocab - 1)] * vocab
    probs[-1] = rare
    counts = sum(draw_counts(probs, 500, seed) for seed in range(4))  # 2000 draws, 500 rows at a time
    assert 8 <= counts[-1] <= 35  # expected 20, Poisson sd 4.5


def test_a_token_with_all_the_mass_is_always_drawn():
    assert torch.equal(draw_counts([0.0, 0.0, 1.0, 0.0], 1000), torch.tensor([0, 0, 1000, 0]))


@pytest.mark.parametrize("u, probs, expected", [
    (0.0, [0.0, 0.0, 1.0], 2),  # u = 0 skips the leading tokens of probability 0
    (0.5, [0.5, 0.5, 0.0], 1),  # a cumulative value equal to u belongs to the token before: the next one
    (1.0 - 2**-53, [0.5, 0.5, 0.0, 0.0], 1),  # the largest u never reaches the trailing zeros
])
def test_the_draw_at_the_boundaries_of_the_cumulative_distribution(monkeypatch, u, probs, expected):
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, device=None: torch.full(shape, u, dtype=dtype))
    out = InverseCDFSampler()(torch.zeros(1, 1, dtype=torch.long), torch.tensor([probs]).log())
    assert out[0].argmax().item() == expected and out[0, expected] == 0


def test_a_row_without_a_distribution_takes_its_largest_score():
    inf = float("inf")
    scores = torch.tensor([[0.0, inf, 1.0], [-inf, -inf, -inf], [0.0, 3.0, 1.0]])
    out = InverseCDFSampler()(torch.zeros(3, 1, dtype=torch.long), scores)
    assert out[0].argmax().item() == 1  # +inf (a diverged model's logit after temperature)
    assert torch.isfinite(out[1]).sum() == 1  # no distribution at all: still exactly one token
    assert torch.isfinite(out[2]).sum() == 1


def test_settings_the_sampler_does_not_reproduce_are_left_to_transformers():
    for config in (GenerationConfig(do_sample=True, top_k=0, num_beams=2), GenerationConfig(do_sample=True, top_k=0, min_p=0.1),
                   GenerationConfig(do_sample=True, top_k=0, typical_p=0.5), GenerationConfig(do_sample=True, top_k=0,
                   num_return_sequences=2), GenerationConfig(do_sample=True, top_k=None)):
        assert drawn_by_inverse_cdf(config) == (config, [])
    assert len(drawn_by_inverse_cdf(GenerationConfig(do_sample=True, top_k=0))[1]) == 1


def test_sampling_configs_become_greedy_with_the_warpers_in_transformers_order():
    tokenizer = byte_tokenizer()
    config, processors = drawn_by_inverse_cdf(sampling_config(tokenizer, 8, temperature=0.7, top_k=5, top_p=0.9))
    assert not config.do_sample
    assert [type(p).__name__ for p in processors] == [
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "InverseCDFSampler"]
    config, processors = drawn_by_inverse_cdf(sampling_config(tokenizer, 8))
    assert [type(p).__name__ for p in processors] == ["InverseCDFSampler"]
    greedy = GenerationConfig(do_sample=False, max_new_tokens=3)
    assert drawn_by_inverse_cdf(greedy) == (greedy, [])


def one_layer_gpt2(tokenizer) -> GPT2LMHeadModel:
    """A one-layer GPT-2 (seed 0) over ``tokenizer``'s vocabulary, in eval mode."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()


def test_generate_draws_from_the_top_k_tokens_at_the_sampling_temperature():
    """Through model.generate: one step, many rows, against the model's own top-2 distribution."""
    tokenizer = byte_tokenizer()
    model = one_layer_gpt2(tokenizer)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)  # (tied to the head) a top-2 gap a missing temperature would show
    rows = 4000
    ids = torch.full((rows, 3), 70)
    config = sampling_config(tokenizer, 1, temperature=0.5, top_k=2, stop_ids=[tokenizer.eos_token_id])
    torch.manual_seed(1)
    drawn = generate_responses(model, ids, torch.ones_like(ids), config)[:, 0]
    with torch.no_grad():
        logits = model(ids[:1]).logits[0, -1]
    top = (logits / 0.5).topk(2)
    expected = torch.softmax(top.values, -1).double()
    tolerance = 5 * (expected[0] * expected[1] / rows).sqrt()
    assert set(drawn.unique().tolist()) <= set(top.indices.tolist())
    share = (drawn == top.indices[0]).double().mean()
    assert abs(share - expected[0]) < tolerance
    at_temperature_1 = torch.softmax(logits[top.indices], -1).double()[0]
    assert abs(at_temperature_1 - expected[0]) > 4 * tolerance  # the check above would see temperature 1


def test_a_model_whose_generation_config_samples_draws_the_same_tokens():
    """A chat model's ``generation_config.json`` often says ``do_sample: true``; transformers 4.x
    fills the greedy config's default ``do_sample`` from it and would then draw again after the
    sampler (other random numbers, so other tokens from the second step on)."""
    tokenizer = byte_tokenizer()
    model = one_layer_gpt2(tokenizer)
    ids = torch.full((64, 3), 70)
    config = sampling_config(tokenizer, 12, temperature=1.0, top_k=0)

    def draw() -> torch.Tensor:
        torch.manual_seed(1)
        return generate_responses(model, ids, torch.ones_like(ids), config)

    plain = draw()
    model.generation_config.do_sample = True
    assert torch.equal(draw(), plain)
    model.generation_config.do_sample = False
    assert len(set(map(tuple, plain.tolist()))) > 1  # the rows were sampled, not one greedy answer
