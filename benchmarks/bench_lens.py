"""Lens statistics on Gemma-3-270m: time, memory and accuracy of the vocabulary sums.

Entropy and KL(final || layer) are sums over 262,144 tokens. Times one
``lens_trajectory`` of "Angela Merkel is the chancellor of" (18 layers), and
the two ways of reducing its logits over the vocabulary: float32 batched dot
products (lenscope before) and float64 accumulation (``lens._vocab_dot``, now),
with each one's largest error against a float64 computation and the extra
memory the float64 copies take.

  python benchmarks/bench_lens.py [--threads 1] [--repeats 5]
"""

import argparse
import statistics
import time

import torch

import lenscope
from lenscope.hooks import decode_resid, hook_name
from lenscope.lens import _vocab_dot, lens_trajectory
from lenscope.metrics import log_softmax

PROMPT = "Angela Merkel is the chancellor of"


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = lenscope.load_model("gemma-3-270m", device="cpu")
    seconds, _ = timed(lambda: lens_trajectory(model, PROMPT, top_k=5), args.repeats)
    n_pos = len(model.to_tokens(PROMPT)[0])
    print(f"lens_trajectory, 18 layers x {n_pos} positions: {seconds:.3f} s")

    with torch.inference_mode():
        _, cache = model.run_with_cache(model.to_tokens(PROMPT))
        logits = torch.stack(
            [decode_resid(model, cache[hook_name("resid_post", j)][0]) for j in range(18)]
        ).float()
    ref_logp = torch.log_softmax(logits.double(), -1)
    ref_entropy = -(ref_logp.exp() * ref_logp).sum(-1)
    ref_kl = (ref_logp[-1].exp() * (ref_logp[-1] - ref_logp)).sum(-1)
    logp = log_softmax(logits)
    probs, final_logp = logp.exp(), logp[-1]

    def float32():
        entropy = -torch.einsum("c p v, c p v -> c p", probs, logp)
        return entropy, torch.einsum("p v, c p v -> c p", final_logp.exp(), final_logp - logp)

    def float64():
        final_p, final64 = final_logp.exp().double(), final_logp.double()
        entropy = torch.stack([-_vocab_dot(p, lp) for p, lp in zip(probs, logp)])
        return entropy, torch.stack([_vocab_dot(final_p, final64 - lp.double()) for lp in logp])

    # float64: final_p and final_logp kept (instead of float32), and at most three
    # [pos, d_vocab] copies of one layer at a time.
    extra = logp[0].numel() * (5 * 8 - 2 * 4)
    print("| reduction | time | max entropy error | max KL error | extra memory |")
    print("|---|---|---|---|---|")
    for name, fn, mem in (
        ("float32 einsum (before)", float32, 0),
        ("float64 (now)", float64, extra),
    ):
        seconds, (entropy, kl) = timed(fn, args.repeats)
        e_err = float((entropy.double() - ref_entropy).abs().max())
        k_err = float((kl.double() - ref_kl).abs().max())
        ms, mb = 1000 * seconds, mem / 2**20
        print(f"| {name} | {ms:.0f} ms | {e_err:.1e} | {k_err:.1e} | {mb:.0f} MB |")


if __name__ == "__main__":
    main()
