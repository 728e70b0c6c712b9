"""Answers of several tokens: a 3-token answer's trace against a 1-token answer's, same run.

Teacher forcing (lenscope's exact trace with ``answer=`` of several tokens)
appends the answer's first ``k - 1`` tokens to every corrupted copy and
decodes ``k`` positions per copy; it adds ``k - 1`` positions to every row,
not forward passes. This prints, for ROME's three-kind trace (Meng et al.,
2022, arXiv 2202.05262; windows 1/10/10, 10 samples) of one prompt on
Gemma-3-270m, the wall time of the one-token answer (the clean top-1) and of
a three-token answer, best of ``--repeats``, and their ratio (issue 29 asks
for under 1.5x), with both strategies.

The two answers are timed alternately (1, 3, 1, 3, ...), so that a load
that changes during the run (the machine is shared) falls on both alike;
the load average before and after is printed.

  python benchmarks/bench_answers.py [--model gemma-3-270m] [--repeats 3] [--threads 2]
      [--strategy prefix]
"""

import argparse
import os
import time

import torch

import lenscope

PROMPT = "The Statue of Liberty is located in the city of"
SUBJECT = "The Statue of Liberty"
ANSWER = " New York City"


def best_times(fns, repeats):
    """Best wall time of ``repeats`` calls of each of ``fns``, called alternately.

    The first call of each warms up and is not counted.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times, strict=True):
            started = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - started)
    return [min(kept) for kept in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strategy", choices=("prefix", "full"), action="append")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = lenscope.load_model(args.model)
    ids = model.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    threads = torch.get_num_threads()
    print(f"{args.model}: answer {ANSWER!r} is {len(ids)} tokens; {threads} threads")
    for strategy in args.strategy or ("prefix", "full"):
        tracer = lenscope.CausalTracer(model, strategy=strategy, progress=False)

        def trace(answer=None, tracer=tracer):
            return tracer.trace_kinds(PROMPT, SUBJECT, answer=answer, seed=0)

        before = os.getloadavg()
        one, several = best_times([trace, lambda: trace(ANSWER)], args.repeats)
        after = os.getloadavg()
        print(
            f"{strategy:6s}  1 token {one:7.2f} s   {len(ids)} tokens {several:7.2f} s   "
            f"ratio {several / one:.2f}   (load average {before[0]:.1f} before, "
            f"{after[0]:.1f} after)"
        )


if __name__ == "__main__":
    main()
