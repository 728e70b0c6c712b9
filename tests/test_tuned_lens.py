"""The tuned lens: identity = logit lens, training, save/load, tuned-lens's format, bases."""

import copy
import json
import random
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_PROMPT,
    TINY_SUBJECT,
    TINY_WORDS,
    make_tiny_model,
    make_tiny_tokenizer,
    tl4,
)

import lenscope
from lenscope import LensEvaluation, LogitLens, TunedLens
from lenscope.hooks import FINAL_RESID, capture_forward, hook_name
from lenscope.tuned_lens import _KLToTarget, _Trainer, fold_centring, is_centred
from lenscope.validation import InvalidInput, InvalidInputType

PACKAGE = Path(__file__).parent / "data" / "tuned_lens_package"
STATS = (
    "entropy",
    "answer_prob",
    "answer_rank",
    "top1_prob",
    "kl_to_final",
    "top_ids",
    "top_probs",
)


def corpus(n, seed, words=50):
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(words)) for _ in range(n)]


TRAIN = dict(steps=12, tokens_per_step=128, seq_len=16, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def peaked(tiny_tokenizer):
    """A tiny model with larger initial weights: peaked outputs, far from the logit lens early."""
    return make_tiny_model(tiny_tokenizer, init_range=0.3)


@pytest.fixture(scope="module")
def trained(peaked):
    return TunedLens.train(peaked, corpus(40, 1), **TRAIN)


def resid(model, kind="resid_pre", prompt=TINY_PROMPT):
    names = [hook_name(kind, i) for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        store = capture_forward(model, model.to_tokens(prompt), [], names, clone=True)
    return [store[n] for n in names], store[FINAL_RESID]


# -- the untrained lens is the logit lens --------------------------------------------------


@pytest.mark.parametrize("kind", ["resid_post", "resid_pre"])
@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gated_model", "tiny_bridge"])
def test_untrained_lens_is_the_logit_lens_exactly(request, fixture, kind):
    model = request.getfixturevalue(fixture)
    lens = TunedLens.identity(model)
    logit = lenscope.lens_trajectory(model, TINY_PROMPT, kind=kind)
    tuned = lenscope.lens_trajectory(model, TINY_PROMPT, kind=kind, decoder=lens)
    for name in STATS:
        assert torch.equal(getattr(tuned, name), getattr(logit, name)), name
    assert tuned.decoder == "tuned lens"
    hidden, _ = resid(model)
    for layer, h in enumerate(hidden):
        assert torch.equal(lens.forward(h, layer), LogitLens(model).forward(h, layer))


def test_untrained_evaluation_equals_the_logit_lens(peaked):
    report = TunedLens.identity(peaked).evaluate(peaked, corpus(4, 9), seq_len=16)
    assert torch.equal(report.kl_tuned, report.kl_logit)
    assert torch.equal(report.ce_tuned, report.ce_logit)
    assert torch.equal(report.entropy_tuned, report.entropy_logit)


# -- training ------------------------------------------------------------------------------


def test_training_lowers_held_out_kl(peaked, trained):
    report = trained.evaluate(peaked, corpus(8, 99), seq_len=16, batch_size=8)
    assert report.tokens == 8 * 51 // 15 * 15  # 50 words + EOS per text; BOS left out
    assert (report.kl_logit[:-1] > 0.3).all()  # something to learn
    assert (report.kl_tuned < 0.7 * report.kl_logit).all(), (report.kl_tuned, report.kl_logit)
    loss = trained.training["loss"]
    assert loss[-1] < 0.7 * loss[0]
    assert trained.training["tokens"] == 12 * 8 * 16


def test_evaluation_matches_a_plain_computation(peaked, trained):
    """KL, cross-entropy and entropy recomputed with TransformerLens' own forward and torch."""
    texts = corpus(2, 5)
    report = trained.evaluate(peaked, texts, seq_len=16)
    tokens = lenscope.tuned_lens.token_sequences(peaked, texts, 16)
    kl = torch.zeros(peaked.cfg.n_layers, dtype=torch.float64)
    ce = torch.zeros_like(kl)
    n = n_next = 0
    for row in tokens:
        with torch.no_grad():
            final_logits, cache = peaked.run_with_cache(row[None])
        p_log = torch.log_softmax(final_logits[0, 1:].double(), -1)
        for layer in range(peaked.cfg.n_layers):
            h = cache[hook_name("resid_pre", layer)][0, 1:]
            x = h + h @ trained.weight[layer].T + trained.bias[layer]
            with torch.no_grad():
                q_log = torch.log_softmax(peaked.unembed(peaked.ln_final(x[None]))[0].double(), -1)
            kl[layer] += (p_log.exp() * (p_log - q_log)).sum()
            ce[layer] += -q_log[:-1].gather(1, row[2:, None]).sum()
        n += len(row) - 1
        n_next += len(row) - 2
    torch.testing.assert_close(report.kl_tuned, kl / n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(report.ce_tuned, ce / n_next, rtol=1e-4, atol=1e-6)


def test_kl_gradient_equals_autograd_of_the_plain_kl():
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 40)).requires_grad_()
    target = torch.log_softmax(3 * torch.randn(5, 40), -1)
    _KLToTarget.apply(logits, target).backward()
    ours = logits.grad.clone()
    logits.grad = None
    plain = (target.exp() * (target - torch.log_softmax(logits, -1))).sum()
    plain.backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-6)


def test_training_is_deterministic_and_leaves_the_model_as_it_was(peaked, trained):
    flags = [p.requires_grad for p in peaked.parameters()]
    again = TunedLens.train(peaked, corpus(40, 1), **TRAIN)
    assert torch.equal(again.weight, trained.weight) and torch.equal(again.bias, trained.bias)
    other = TunedLens.train(peaked, corpus(40, 1), **{**TRAIN, "seed": 1})
    assert not torch.equal(other.weight, trained.weight)
    assert [p.requires_grad for p in peaked.parameters()] == flags
    assert not peaked.training


def test_adam_is_an_option(peaked):
    lens = TunedLens.train(peaked, corpus(40, 1), optimizer="adam", **TRAIN)
    assert lens.training["optimizer"] == "adam" and lens.training["lr"] == 1e-3
    assert lens.training["loss"][-1] < lens.training["loss"][0]


def test_an_interrupted_run_resumes_to_the_same_lens(peaked, trained, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run.ckpt"
    step = _Trainer._step
    flags = [p.requires_grad for p in peaked.parameters()]

    def interrupt(self, i):
        if i == 7:
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(_Trainer, "_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        TunedLens.train(peaked, corpus(40, 1), checkpoint=checkpoint, checkpoint_every=3, **TRAIN)
    assert [p.requires_grad for p in peaked.parameters()] == flags
    assert torch.load(checkpoint, weights_only=False)["step"] == 6
    monkeypatch.setattr(_Trainer, "_step", step)
    resumed = TunedLens.train(peaked, corpus(40, 1), checkpoint=checkpoint, **TRAIN)
    assert torch.equal(resumed.weight, trained.weight) and torch.equal(resumed.bias, trained.bias)
    assert resumed.training["loss"] == trained.training["loss"]
    with pytest.raises(InvalidInput, match="other settings or data"):
        TunedLens.train(peaked, corpus(40, 2), checkpoint=checkpoint, **TRAIN)


def test_texts_from_files_and_datasets(peaked, tmp_path):
    texts = corpus(3, 4)
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text)
    seq = lenscope.tuned_lens.token_sequences
    expected = seq(peaked, texts, 16)
    assert torch.equal(seq(peaked, files, 16), expected)
    single = seq(peaked, str(files[0]), 16)
    assert torch.equal(single, seq(peaked, texts[:1], 16))
    assert (expected[:, 0] == peaked.tokenizer.bos_token_id).all()
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": texts})
    assert torch.equal(seq(peaked, data, 16), expected)


# -- saving and loading --------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(peaked, trained, tmp_path):
    folder = trained.save(tmp_path / "tiny.lens")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "lenscope.json", "params.pt"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["d_model"] == 32
    assert config["lens_type"] == "linear_tuned_lens"
    assert set(torch.load(folder / "params.pt")) == {
        f"{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    loaded = TunedLens.load(folder, peaked)
    assert torch.equal(loaded.weight, trained.weight) and torch.equal(loaded.bias, trained.bias)
    assert loaded.basis == trained.basis and loaded.training == trained.training
    hidden, _ = resid(peaked)
    for layer, h in enumerate(hidden):
        assert torch.equal(loaded.forward(h, layer), trained.forward(h, layer))


def test_evaluation_round_trips_and_plots(peaked, trained, tmp_path):
    report = trained.evaluate(peaked, corpus(2, 3), seq_len=16, corpus="random words")
    again = LensEvaluation.load(report.save(tmp_path / "eval.json"))
    for name in LensEvaluation._SERIES:
        assert torch.equal(getattr(again, name), getattr(report, name))
    assert again.final_ce == report.final_ce and again.corpus == "random words"
    frame = report.to_dataframe()
    assert len(frame) == 2 * 4 and set(frame["lens"]) == {"tuned", "logit"}
    assert report.to_markdown().count("\n") == 4 + 2
    fig = lenscope.plot_lens_comparison(report, log_kl=True)
    assert len(fig.data) == 6 and fig.layout.yaxis.type == "log"
    assert "random words" in fig.layout.title.text
    with pytest.raises(InvalidInput, match="statistics must be one of"):
        report.plot(statistics=("kl", "nope"))
    with pytest.raises(InvalidInputType, match="expects a LensEvaluation"):
        lenscope.plot_lens_comparison(trained)


def _package_bridge(name, *, processing):
    """A TransformerBridge around the Hugging Face model that tuned-lens decoded."""
    from transformers import AutoModelForCausalLM

    from lenscope import compat
    from lenscope.loading import _compatible

    hf = AutoModelForCausalLM.from_pretrained(PACKAGE / name / "model", attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = compat.bridge_class().boot_transformers(
            f"tuned-lens-{name}",
            hf_model=hf.eval(),
            tokenizer=make_tiny_tokenizer(tempfile.mkdtemp()),
            device="cpu",
            dtype=torch.float32,
        )
        if processing:
            bridge = _compatible(bridge)
        elif tl4():
            bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return bridge.eval()


@pytest.mark.parametrize(
    ("name", "processing"), [("gpt2", False), ("llama", False), ("llama", True)]
)
def test_a_lens_saved_by_the_tuned_lens_package_decodes_as_it_does(name, processing):
    """Files and logits written by tuned-lens 0.2.0 itself (scripts/make_tuned_lens_fixture.py).

    Llama (RMSNorm) is not centred by TransformerLens' processing, so its lens
    reads the processed stream too; the logits then differ by a constant per
    position (the centred unembedding), so log-probabilities are compared.
    """
    expected = torch.load(PACKAGE / name / "expected.pt")
    bridge = _package_bridge(name, processing=processing)
    lens = TunedLens.load(PACKAGE / name / "lens", bridge)
    assert lens.basis == "raw"
    decoder = lens.for_model(bridge, "resid_pre")
    names = [hook_name("resid_pre", i) for i in range(4)]
    with torch.no_grad():
        store = capture_forward(bridge, expected["tokens"], [], names)
        for i, hook in enumerate(names):
            ours = torch.log_softmax(decoder.forward(store[hook], i)[0].double(), -1)
            theirs = torch.log_softmax(expected["logits"][i].double(), -1)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.skipif(not tl4(), reason="TransformerLens 3.9's bridge does not process weights")
def test_a_package_lens_refuses_the_centred_stream_of_a_layernorm_model():
    bridge = _package_bridge("gpt2", processing=True)
    lens = TunedLens.load(PACKAGE / "gpt2" / "lens", bridge)
    tokens = torch.load(PACKAGE / "gpt2" / "expected.pt")["tokens"]
    with pytest.raises(InvalidInput, match="zero mean over d_model.*no_processing=True"):
        lenscope.lens_trajectory(bridge, tokens[0], decoder=lens)


def test_loading_an_absent_lens_offline_names_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"lens/EleutherAI/pythia-160m/config.json.*HF_HUB_OFFLINE"):
        TunedLens.load("EleutherAI/pythia-160m")


def test_load_refuses_other_shapes_and_broken_folders(tiny_model, peaked, trained, tmp_path):
    folder = trained.save(tmp_path / "lens")
    small = make_tiny_model(peaked.tokenizer, n_layers=2)
    with pytest.raises(InvalidInput, match="n_layers 2 .lens: 4."):
        TunedLens.load(folder, small)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="needs config.json and params.pt"):
        TunedLens.load(tmp_path / "empty")
    (folder / "params.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="does not hold a readable tuned lens"):
        TunedLens.load(folder)


# -- residual-stream bases -----------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_and_centred(tiny_tokenizer):
    """The same LayerNorm model twice: unprocessed, and with centred writing weights."""
    if tl4():
        from conftest import make_tiny_bridge

        raw = make_tiny_bridge(tiny_tokenizer, init_range=0.3, processing=False)
        centred = make_tiny_bridge(tiny_tokenizer, init_range=0.3)
    else:
        raw = make_tiny_model(tiny_tokenizer, init_range=0.3, bridge=False)
        centred = copy.deepcopy(raw)
        centred.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return raw, centred


def test_the_bases_are_told_apart(raw_and_centred):
    raw, centred = raw_and_centred
    (raw_h, _), (cen_h, _) = resid(raw), resid(centred)
    assert not is_centred(torch.stack(raw_h)) and is_centred(torch.stack(cen_h))
    # The same model: the centred stream is the raw one minus its mean.
    for r, c in zip(raw_h, cen_h):
        torch.testing.assert_close(c, r - r.mean(-1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_a_lens_trained_on_a_centred_stream_decodes_both(raw_and_centred):
    raw, centred = raw_and_centred
    lens = TunedLens.train(centred, corpus(20, 1), **{**TRAIN, "steps": 4})
    assert lens.basis == "any" and lens.training["centred_stream"]
    (raw_h, _), (cen_h, _) = resid(raw), resid(centred)
    for layer in range(4):
        a = torch.log_softmax(lens.for_model(raw, "resid_pre").forward(raw_h[layer], layer), -1)
        b = torch.log_softmax(lens.for_model(centred, "resid_pre").forward(cen_h[layer], layer), -1)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, torch.log_softmax(LogitLens(raw).forward(raw_h[layer], 0), -1))


def test_a_lens_trained_on_a_raw_stream_refuses_a_centred_one(raw_and_centred):
    raw, centred = raw_and_centred
    lens = TunedLens.train(raw, corpus(20, 1), **{**TRAIN, "steps": 2})
    assert lens.basis == "raw"
    lenscope.lens_trajectory(raw, TINY_PROMPT, decoder=lens)
    with pytest.raises(InvalidInput, match="trained on the raw residual stream"):
        lenscope.lens_trajectory(centred, TINY_PROMPT, decoder=lens)
    with pytest.raises(InvalidInput, match="trained on the raw residual stream"):
        lens.evaluate(centred, corpus(2, 1), seq_len=16)


def test_folding_the_centring_keeps_the_output_on_centred_vectors():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8)
    h = torch.randn(5, 8)
    h = h - h.mean(-1, keepdim=True)
    folded = fold_centring(w)
    torch.testing.assert_close(h @ folded[1].T, h @ w[1].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fold_centring(folded), folded, rtol=1e-6, atol=1e-7)
    raw = torch.randn(5, 8)
    centred = raw - raw.mean(-1, keepdim=True)
    torch.testing.assert_close(
        raw + raw @ folded[0].T, centred + centred @ w[0].T, rtol=1e-5, atol=1e-5
    )


# -- lens views ----------------------------------------------------------------------------


def test_resid_post_of_a_layer_is_the_input_of_the_next_translator(peaked, trained):
    post, _ = resid(peaked, "resid_post")
    pre_decoder = trained.for_model(peaked, "resid_pre")
    post_decoder = trained.for_model(peaked, "resid_post")
    for layer in range(3):
        assert torch.equal(
            post_decoder.forward(post[layer], layer), pre_decoder.forward(post[layer], layer + 1)
        )
    # The last resid_post is the model's output: no translator.
    assert torch.equal(post_decoder.forward(post[3], 3), LogitLens(peaked).forward(post[3], 3))
    traj = lenscope.lens_trajectory(peaked, TINY_PROMPT, decoder=trained)
    # The last layer's lens is the model's own output: KL 0 up to float32 rounding of
    # the two softmaxes (exactly 0 on some builds, 6e-8 at two positions on others).
    assert float(traj.kl_to_final[-1].abs().max()) < 1e-6


def test_a_trace_cell_through_the_tuned_lens(peaked, trained):
    tracer = lenscope.CausalTracer(peaked)
    result = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="resid_post", samples=3, seed=0)
    layer, pos = 1, 3
    logit = lenscope.lens_trace_cell(tracer, result, layer, pos)
    tuned = lenscope.lens_trace_cell(tracer, result, layer, pos, decoder=trained)
    for a, b in zip(logit, tuned):
        assert torch.equal(a.answer_prob[-1], b.answer_prob[-1])  # the output: no translator
        assert not torch.equal(a.kl_to_final[0], b.kl_to_final[0])
    assert float(tuned.restored.answer_prob[-1, -1]) == pytest.approx(
        float(result.scores[layer, pos]), rel=1e-5
    )


def test_lens_views_refuse_what_a_tuned_lens_cannot_decode(tiny_model, peaked, trained):
    with pytest.raises(InvalidInput, match="translators for the residual stream"):
        lenscope.lens_trajectory(peaked, TINY_PROMPT, kind="mlp_out", decoder=trained)
    small = make_tiny_model(peaked.tokenizer, n_layers=2)
    with pytest.raises(InvalidInput, match="differs: n_layers 2"):
        lenscope.lens_trajectory(small, TINY_PROMPT, decoder=trained)

    class FakePackageLens:
        def forward(self, h, idx): ...

    FakePackageLens.__module__ = "tuned_lens.nn.lenses"
    with pytest.raises(InvalidInputType, match="tuned-lens package.*TunedLens.load"):
        lenscope.lens_trajectory(peaked, TINY_PROMPT, decoder=FakePackageLens())


@pytest.mark.parametrize(
    ("texts", "error", "message"),
    [
        ("not a file.txt", InvalidInput, "path of a text file"),
        ([1, 2], InvalidInputType, "every text must be a str"),
        (3, InvalidInputType, "texts must be a list of strings"),
        ([""], InvalidInput, "at least two tokens"),
    ],
)
def test_bad_texts_are_refused(peaked, texts, error, message):
    with pytest.raises(error, match=message):
        TunedLens.train(peaked, texts, **TRAIN)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"seq_len": 1000}, r"seq_len must be an integer in \[2, n_ctx=32\]"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"warmup_steps": 12}, r"warmup_steps must be an integer in \[0, steps=12\)"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"optimizer": "rmsprop"}, "optimizer must be 'sgd'"),
    ],
)
def test_bad_training_options_are_refused(peaked, option, message):
    with pytest.raises(InvalidInput, match=message):
        TunedLens.train(peaked, corpus(4, 0), **{**TRAIN, **option})


# -- the real model ------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_untrained_lens_is_the_logit_lens(gemma):
    lens = TunedLens.identity(gemma)
    prompt = "The Eiffel Tower is located in the city of"
    logit = lenscope.lens_trajectory(gemma, prompt)
    tuned = lenscope.lens_trajectory(gemma, prompt, decoder=lens)
    for name in STATS:
        assert torch.equal(getattr(tuned, name), getattr(logit, name)), name
    # Gemma-3 uses RMSNorm: TransformerLens leaves its stream uncentred, as Hugging Face's.
    hidden, _ = resid(gemma, prompt=prompt)
    assert not is_centred(torch.stack(hidden))
