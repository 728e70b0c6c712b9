"""Render the README's noise-versus-counterfactual figure on the real offline model.

Traces ROME's Eiffel Tower prompt on Gemma-3-270m twice, with the same kinds,
windows and metric (the normalised logit difference of ' Paris' against
' Rome', so that both panels share one scale): once with ROME's Gaussian
noise on the subject (10 samples, 3 sigma), once with the counterfactual
prompt "The Colosseum is located in the city of" (symmetric token
replacement), then writes one interactive figure and screenshots it with
headless Chromium (see ``scripts/screenshot.py``)::

    python scripts/str_figure.py          # docs/str_vs_noise.{html,png}, docs/str_vs_noise.json
"""

import argparse
import json
from pathlib import Path

from screenshot import screenshot

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
COUNTERFACTUAL = "The Colosseum is located in the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/str_vs_noise"))
    parser.add_argument("--kinds", default="resid_pre,mlp_out")
    args = parser.parse_args()

    import lenscope
    from lenscope.plotting import plot_traces, save_html

    model = lenscope.load_model("gemma-3-270m", device="cpu")
    tracer = lenscope.CausalTracer(model, progress=False)
    kinds = tuple(args.kinds.split(","))
    common = dict(kinds=kinds, windows=1, metric="normalized_logit_diff", foil=" Rome")
    noise = tracer.trace_kinds(PROMPT, SUBJECT, **common)
    str_ = tracer.trace_kinds(
        PROMPT, corruption=lenscope.CounterfactualPrompt(COUNTERFACTUAL), **common
    )
    panels = {}
    for kind in kinds:
        panels[f"{kind}: Gaussian noise"] = noise[kind]
        panels[f"{kind}: STR (Colosseum)"] = str_[kind]
    figure = plot_traces(
        panels,
        allow_mismatch=True,
        title="Eiffel Tower on Gemma-3-270m, normalised logit diff ' Paris' vs ' Rome'",
    )
    html = args.out.with_suffix(".html")
    save_html(figure, html)
    summary = {
        name: {
            "peak": r.peak(),
            "raw_clean_corrupted": r.normalization,
            "scores": r.scores.tolist(),
            "tokens": list(r.tokens),
        }
        for name, r in panels.items()
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    for name, r in panels.items():
        print(name, "peak", r.peak(), "raw (clean, corrupted)", r.normalization)
    screenshot(html, args.out.with_suffix(".png"), width=1400, height=520, scale=1.5)
    html.unlink()


if __name__ == "__main__":
    main()
