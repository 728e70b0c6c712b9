"""The lenscope command line, on the tiny model (injected in place of load_model)."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_PROMPT

from lenscope.cli import main


@pytest.fixture
def run(tiny_model, capsys):
    def run(*argv):
        calls = []

        def factory(name, **kwargs):
            calls.append((name, kwargs))
            return tiny_model

        code = main(list(argv), model_factory=factory)
        out = capsys.readouterr()
        return code, out.out, out.err, calls

    return run


def test_trace_writes_table_html_and_json(run, tmp_path):
    html, js = tmp_path / "t.html", tmp_path / "t.json"
    code, out, err, calls = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--samples",
        "2",
        "--out",
        str(html),
        "--json",
        str(js),
        "--quiet",
        "--model",
        "tiny",
    )
    assert code == 0, err
    # bridge=None: the installed TransformerLens' default class
    assert calls == [("tiny", {"bridge": None, "device": None, "dtype": None})]
    data = json.loads(js.read_text())
    assert list(data) == ["resid_post", "mlp_out", "attn_out"]
    first = data["resid_post"]
    assert f"answer     {first['answer']!r}" in out
    assert f"clean      p = {first['clean_score']:.4f}" in out
    assert f"corrupted  p = {first['corrupted_score']:.4f}" in out
    for kind in ("resid_post", "mlp_out", "attn_out"):
        row = next(line for line in out.splitlines() if line.startswith(kind))
        assert f"{max(v for r in data[kind]['scores'] for v in r):.4f}" in row
    assert "subject    'The Eiffel Tower' (tokens 1..3)" in out
    text = html.read_text()
    assert "<html>" in text and '<script src="http' not in text and len(text) > 1_000_000
    assert err == ""  # --quiet: no progress bars


def test_trace_options_reach_the_tracer(run, tmp_path):
    js = tmp_path / "t.json"
    code, out, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--kinds",
        "mlp_out",
        "--window",
        "2",
        "--samples",
        "3",
        "--noise",
        "0.5",
        "--seed",
        "7",
        "--answer",
        " paris",
        "--out",
        str(tmp_path / "x.html"),
        "--json",
        str(js),
        "--quiet",
    )
    assert code == 0, err
    r = json.loads(js.read_text())["mlp_out"]
    assert (r["window"], r["samples"], r["noise_std"], r["seed"], r["answer"]) == (
        2,
        3,
        0.5,
        7,
        " paris",
    )


def test_missing_subject_is_guessed(run, tmp_path):
    code, out, err, _ = run(
        "trace", TINY_PROMPT, "--samples", "1", "--quiet", "--out", str(tmp_path / "x.html")
    )
    assert code == 0
    assert "guessed subject: 'The Eiffel Tower'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["trace", TINY_PROMPT, "--subject", "The Louvre"],
            "subject 'The Louvre' must occur in the prompt",
        ),
        (
            ["trace", TINY_PROMPT, "--subject", "The", "--window", "9"],
            "window must be an integer from 1 to n_layers=4",
        ),
        (
            ["trace", TINY_PROMPT, "--subject", "The", "--answer", " paris rome"],
            "answer must be a single token",
        ),
        (["trace", "all lower case", "--quiet"], "could not guess a subject"),
    ],
)
def test_user_errors_exit_2_with_one_line(run, argv, message, tmp_path):
    code, out, err, _ = run(*argv, "--out", str(tmp_path / "x.html"))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trace", "p", "--kinds", "mlp"], "kinds must be a comma-separated list"),
        (["trace", "p", "--samples", "0"], "expected a positive integer"),
        (["trace", "p", "--noise", "lots"], "expected an absolute std"),
        (["trace"], "the following arguments are required: prompt"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(run, argv, message):
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2


def test_help_is_complete():
    out = subprocess.run(
        [sys.executable, "-m", "lenscope.cli", "trace", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--subject",
        "--model",
        "--kinds",
        "--window",
        "--samples",
        "--noise",
        "--seed",
        "--answer",
        "--out",
        "--json",
        "--device",
        "--quiet",
        "--bridge",
    ):
        assert option in out
    top = subprocess.run(
        [sys.executable, "-m", "lenscope.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "trace" in top


def test_internal_errors_exit_1_with_a_hint(run, monkeypatch, tmp_path):
    import lenscope.tracer

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch deep inside")

    monkeypatch.setattr(lenscope.tracer.CausalTracer, "trace_kinds", broken)
    code, out, err, _ = run("trace", TINY_PROMPT, "--quiet", "--out", str(tmp_path / "x.html"))
    assert code == 1
    assert "internal error: RuntimeError: shape mismatch deep inside" in err
    assert "not with your arguments: rerun with LENSCOPE_TRACEBACK=1" in err
    assert "usage" not in err
    monkeypatch.setenv("LENSCOPE_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run("trace", TINY_PROMPT, "--quiet", "--out", str(tmp_path / "x.html"))


def test_both_subcommands_reject_bad_kinds_before_loading(run, capsys):
    for command in (["trace", "p"], ["dataset"]):
        with pytest.raises(SystemExit) as exc:
            run(*command, "--kinds", "mlp_outt")
        assert exc.value.code == 2
        assert "kinds must be a comma-separated list" in capsys.readouterr().err


def test_dataset_refuses_a_foreign_checkpoint_before_filtering(
    run, tiny_model, monkeypatch, tmp_path
):
    import lenscope.datasets.facts

    checkpoint = tmp_path / "run.jsonl"
    args = ["dataset", "--limit", "1", "--samples", "2", "--quiet", "--checkpoint", str(checkpoint)]
    args += ["--out", str(tmp_path / "r.html")]
    assert run(*args)[0] == 0
    filtered = []
    original = lenscope.datasets.facts.filter_known
    monkeypatch.setattr(
        lenscope.datasets, "filter_known", lambda *a, **k: filtered.append(1) or original(*a, **k)
    )
    code, _, err, _ = run(*[a if a != "2" else "3" for a in args])
    assert code == 2
    assert "samples: checkpoint 2, this call 3" in err
    assert not filtered, "the known-fact filter ran before the checkpoint was checked"


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "lenscope.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("lenscope 0.")
