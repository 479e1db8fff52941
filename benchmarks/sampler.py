"""The cost of drawing one token per row: ``torch.multinomial`` (what transformers' ``generate``
samples with) against the package's ``InverseCDFSampler``, side by side in one process.

    python benchmarks/sampler.py                      # 32 rows x 50257 tokens (the PPO benchmark's shape)
    python benchmarks/sampler.py --rows 64 --vocab 32000

Prints the median milliseconds per draw of each and their ratio. Both draw from the same
softmax; tests/test_sampler.py checks the distribution.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhf_lightning.generation import InverseCDFSampler


def median_ms(draw, repeats: int) -> float:
    draw()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    scores = torch.randn(args.rows, args.vocab) * 3
    ids = torch.zeros(args.rows, 1, dtype=torch.long)
    sampler = InverseCDFSampler()
    multinomial = median_ms(lambda: torch.multinomial(torch.softmax(scores, -1), 1), args.repeats)
    inverse_cdf = median_ms(lambda: sampler(ids, scores), args.repeats)
    print(f"rows={args.rows} vocab={args.vocab} threads={torch.get_num_threads()}")
    print(f"torch.multinomial  {multinomial:8.2f} ms")
    print(f"InverseCDFSampler  {inverse_cdf:8.2f} ms  ({inverse_cdf / multinomial:.3f}x multinomial)")


if __name__ == "__main__":
    main()
