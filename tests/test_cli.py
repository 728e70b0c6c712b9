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
    assert f"clean      prob = {first['clean_score']:.4f}" in out
    assert f"corrupted  prob = {first['corrupted_score']:.4f}" in out
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
    noise = r["corruption"]
    assert (r["window"], noise["samples"], noise["noise_std"], noise["seed"], r["answer"]) == (
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
        (["trace", "all lower case", "--quiet"], "could not guess a subject"),
    ],
)
def test_user_errors_exit_2_with_one_line(run, argv, message, tmp_path):
    code, out, err, _ = run(*argv, "--out", str(tmp_path / "x.html"))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


HELP = "run 'lenscope trace --help' for the options"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["trace", "p", "--kinds", "mlp"],
            "lenscope trace: error: argument --kinds: kinds must be a comma-separated list of "
            f"resid_pre,resid_mid,resid_post,mlp_out,attn_out, got 'mlp'; {HELP}",
        ),
        (
            ["trace", "p", "--samples", "0"],
            f"lenscope trace: error: argument --samples: expected a positive integer, got '0'; {HELP}",
        ),
        (
            ["trace", "p", "--samples", "-3"],
            f"lenscope trace: error: argument --samples: expected a positive integer, got '-3'; {HELP}",
        ),
        (
            ["trace", "p", "--noise", "lots"],
            "lenscope trace: error: argument --noise: expected an absolute std (e.g. 0.5) or a "
            f"multiple of sigma (e.g. 3s), got 'lots'; {HELP}",
        ),
        # A negative value reaches lenscope's own check, not argparse's "expected one argument".
        (
            ["trace", "p", "--noise", "-3s"],
            "lenscope trace: error: argument --noise: noise must be a finite number >= 0 (a "
            "multiple of sigma such as 3s, or an absolute std such as 0.5), got '-3s'; pass "
            "e.g. --noise 3s",
        ),
        (
            ["trace", "p", "--noise", "-0.5"],
            "lenscope trace: error: argument --noise: noise must be a finite number >= 0 (a "
            "multiple of sigma such as 3s, or an absolute std such as 0.5), got '-0.5'; pass "
            "e.g. --noise 0.5",
        ),
        (
            ["trace", "p", "--window", "-2"],
            f"lenscope trace: error: argument --window: expected a positive integer, got '-2'; {HELP}",
        ),
        (
            ["trace"],
            f"lenscope trace: error: the following arguments are required: prompt; {HELP}",
        ),
        (
            ["trace", "p", "--frobnicate"],
            f"lenscope trace: error: unrecognized arguments: --frobnicate; {HELP}",
        ),
        (
            ["frobnicate"],
            "lenscope: error: argument COMMAND: invalid choice: 'frobnicate' (choose from "
            "'trace', 'patch', 'dataset', 'lens'); run 'lenscope --help' for the options",
        ),
        (
            ["patch", "a b", "a c", "--window", "-1"],
            "lenscope patch: error: argument --window: expected a positive integer, got '-1'; "
            "run 'lenscope patch --help' for the options",
        ),
        (
            ["dataset", "--minutes", "-5"],
            "lenscope dataset: error: argument --minutes: expected a positive number of "
            "minutes, got '-5'; run 'lenscope dataset --help' for the options",
        ),
        (
            ["lens", "train", "--out", "l"],
            "lenscope lens train: error: the following arguments are required: --texts; run "
            "'lenscope lens train --help' for the options",
        ),
        (
            ["lens"],
            "lenscope lens: error: the following arguments are required: LENS_COMMAND; run "
            "'lenscope lens --help' for the options",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(run, capsys, argv, line):
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == line + "\n"  # no usage block


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
        "--layers",
        "--positions",
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


def _unwritable(kind, tmp_path):
    """An output path lenscope cannot write, and the reason its message gives."""
    if kind == "proc":  # an existing folder where no file can be created, even by root
        return "/proc/t.json", "cannot create a file in '/proc' (No such file or directory)"
    if kind == "read_only":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder / "t.json"), f"cannot create a file in {str(folder)!r} (Permission"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["proc", "read_only"])
@pytest.mark.parametrize(
    "command", [("trace", "--json"), ("trace", "--out"), ("dataset", "--summary")]
)
def test_an_unwritable_output_exits_2_before_the_model_loads(run, tmp_path, kind, command):
    import os
    import time

    if kind == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    if kind == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    path, reason = _unwritable(kind, tmp_path)
    subcommand, flag = command
    argv = [subcommand, TINY_PROMPT] if subcommand == "trace" else [subcommand]
    if flag != "--out":
        argv += ["--out", str(tmp_path / "ok.html")]
    started = time.perf_counter()
    code, out, err, calls = run(*argv, flag, path, "--quiet")
    assert time.perf_counter() - started < 2
    assert code == 2 and calls == []
    assert err.startswith(
        f"lenscope {subcommand}: error: {flag} must name a file lenscope can write, "
        f"got {path!r}: {reason}"
    )
    assert err.rstrip().endswith(
        f"; pass {flag} a file in a folder you can write to, e.g. {flag} t.json"
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ok.html").exists()


def test_output_folders_and_clashes_are_checked_before_loading(run, tmp_path):
    code, _, err, calls = run("trace", TINY_PROMPT, "--out", str(tmp_path))
    assert code == 2 and calls == []
    assert f"--out must name a file, got {str(tmp_path)!r}, which is a folder; pass e.g. " in err
    same = str(tmp_path / "x.json")
    code, _, err, calls = run("dataset", "--summary", same, "--checkpoint", same)
    assert code == 2 and calls == []
    assert f"--summary and --checkpoint must name different files, got {same!r} for both" in err
    # A file that did not exist is not left behind.
    code, _, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The",
        "--window",
        "9",
        "--json",
        str(tmp_path / "t.json"),
        "--out",
        str(tmp_path / "x.html"),
    )
    assert code == 2 and "window must be" in err
    assert list(tmp_path.iterdir()) == []


OUTPUTS = [
    ("trace", "--out"),
    ("trace", "--json"),
    ("patch", "--out"),
    ("patch", "--json"),
    ("dataset", "--out"),
    ("dataset", "--summary"),
    ("dataset", "--checkpoint"),
    ("lens train", "--out"),
    ("lens train", "--json"),
    ("lens train", "--checkpoint"),
]


@pytest.mark.parametrize(("command", "flag"), OUTPUTS)
def test_a_mistyped_output_folder_is_refused_at_parse_time(run, capsys, tmp_path, command, flag):
    """``--out no/such/dir/x.html``: one line naming the folder, nothing created, no model."""
    missing = tmp_path / "no" / "such" / "dir"
    path = str(missing / "x.html")
    positional = {"trace": ["p"], "patch": ["a b", "a c"], "lens train": ["--texts", "t.txt"]}
    argv = [*command.split(), *positional.get(command, []), flag, path]
    if command == "lens train" and flag != "--out":
        argv += ["--out", str(tmp_path / "lens")]
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"lenscope {command}: error: argument {flag}: the folder {str(missing)!r} of {path!r} "
        f"does not exist (lenscope creates no folders); create it first (mkdir -p {missing}), "
        "or pass a path in an existing folder\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_refused_at_parse_time(run, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    path = str(tmp_path / "file.txt" / "t.json")
    with pytest.raises(SystemExit) as exc:
        run("trace", "p", "--json", path)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"lenscope trace: error: argument --json: {str(tmp_path / 'file.txt')!r} of {path!r} is "
        "a file, not a folder; pass a path in a folder\n"
    )


def test_results_are_kept_when_the_output_cannot_be_written_at_the_end(run, tmp_path, monkeypatch):
    import errno

    import lenscope.plotting
    from lenscope import TraceResult

    def full_disk(fig, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lenscope.plotting, "save_html", full_disk)
    monkeypatch.chdir(tmp_path)
    code, out, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--samples",
        "2",
        "--quiet",
        "--out",
        "t.html",
        "--kinds",
        "mlp_out",
    )
    assert code == 1
    assert "answer " in out  # the table was printed
    (kept,) = tmp_path.glob("lenscope-trace-*.json")
    assert err == (
        "lenscope trace: error: could not write --out 't.html': No space left on device; the "
        f"results are kept in {str(kept.resolve())!r} (in the format of --json); free some "
        "space or pass another path and run again\n"
    )
    data = json.loads(kept.read_text())
    assert list(data) == ["mlp_out"]
    assert TraceResult.from_dict(data["mlp_out"]).samples == 2


def test_dataset_summary_is_kept_when_the_report_cannot_be_written(run, tmp_path, monkeypatch):
    import lenscope.plotting.dataset
    from lenscope.datasets import DatasetSummary

    def broken(summary, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lenscope.plotting.dataset, "save_dataset_report", broken)
    monkeypatch.chdir(tmp_path)
    code, _, err, _ = run("dataset", "--limit", "1", "--samples", "2", "--quiet")
    assert code == 1
    (kept,) = tmp_path.glob("lenscope-dataset-*.json")
    assert (
        "could not write --out 'report.html': Permission denied; the summary is kept in "
        f"{str(kept.resolve())!r} (DatasetSummary.load reads it); free some space" in err
    )
    assert DatasetSummary.load(kept).samples == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            # In the prompt but for case: past the text check made before loading.
            ["--subject", "the eiffel tower"],
            "check spelling and case, or pass --subject with the exact text of those tokens",
        ),
        (
            ["--subject", "The", "--layers", "0-9"],
            "got (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); pass e.g. --layers 0-3",
        ),
        (
            ["--subject", "The", "--positions", "3,40"],
            "pass --positions with positions of the prompt's tokens (e.g. 2-6), or --positions all",
        ),
        (
            ["--subject", "The", "--method", "attribution", "--estimator", "ig:0"],
            "pass e.g. --estimator ig:16",
        ),
        (
            ["--subject", "The", "--positions", "-1,last"],
            "positions must be distinct token positions in [0, 10) (or counted back from the "
            "end: -1 or 'last' is the last, -10 the first), got (-1, 'last'), which are the "
            "positions [9, 9]; pass --positions with positions of the prompt's tokens (e.g. 2-6), "
            "or --positions all",
        ),
        (
            ["--subject", "The", "--positions", "-11"],
            "got (-11,); pass --positions with positions of the prompt's tokens (e.g. 2-6)",
        ),
    ],
)
def test_user_errors_suggest_flags_not_python(run, tmp_path, argv, message):
    code, _, err, _ = run("trace", TINY_PROMPT, *argv, "--out", str(tmp_path / "x.html"))
    assert code == 2
    assert message in err
    assert "=" not in err.split("; ", 1)[1]


def test_guess_failure_suggests_the_flag(run, tmp_path):
    code, _, err, _ = run("trace", "all lower case", "--out", str(tmp_path / "x.html"))
    assert code == 2
    assert "could not guess a subject" in err
    assert err.rstrip().endswith("pass it with --subject")


def test_cli_wording_of_messages_a_cli_user_can_meet():
    from lenscope.cli import cli_wording
    from lenscope.corruptions import GaussianNoise
    from lenscope.loading import _resolve_device, _resolve_dtype
    from lenscope.validation import InvalidInput

    with pytest.raises(InvalidInput) as e:
        _resolve_device("cuda:7")
    assert cli_wording(str(e.value)).endswith(
        "; pass --device cpu, one of the available devices, or no --device to let "
        "TransformerLens choose"
    )
    with pytest.raises(InvalidInput) as e:
        _resolve_dtype("int8")
    assert cli_wording(str(e.value)).endswith(
        "; pass --dtype float32 (the default), --dtype bfloat16 or --dtype float16 instead"
    )
    with pytest.raises(InvalidInput) as e:
        GaussianNoise(noise=-1.0)
    assert cli_wording(str(e.value)).endswith(
        "; noise is the absolute std; pass e.g. --noise 0.5, or --noise 3s for three times "
        "the embedding sigma"
    )
    assert cli_wording("pass bridge=True, window=3, samples=5, batch_size=64, seed=0") == (
        "pass --bridge, --window 3, --samples 5, --batch-size 64, --seed 0"
    )
    assert (
        cli_wording(
            'use the offline model load_model("gemma-3-270m") (--model gemma-3-270m; needs pip '
            'install "lenscope[offline]"), or download it'
        )
        == 'use the offline model --model gemma-3-270m (needs pip install "lenscope[offline]"), or download it'
    )
    assert (
        cli_wording("from 1 to n_layers=4; cfg.samples=3") == "from 1 to n_layers=4; cfg.samples=3"
    )


BAD_INDEX_LISTS = ["3-1", "a", "1,1", "", "1.5", "0-2,2"]


@pytest.mark.parametrize(
    ("flag", "text", "value"),
    [
        ("--layers", "0-2", (0, 1, 2)),
        ("--layers", "0,3, 5", (0, 3, 5)),
        ("--layers", "4", (4,)),
        ("--layers", "0-1,3", (0, 1, 3)),
        ("--positions", "subject", "subject"),
        ("--positions", "from_subject", "from_subject"),
        ("--positions", "all", "all"),
        ("--positions", "2-4", (2, 3, 4)),
        ("--positions", "last", "last"),
        ("--positions", "-1", (-1,)),
        ("--positions", "-2,-1", (-2, -1)),
        ("--positions", "0-1,last", (0, 1, "last")),
    ],
)
@pytest.mark.parametrize("joined", [True, False])
def test_layers_and_positions_are_parsed(flag, text, value, joined):
    from lenscope.cli import build_parser, trace_options

    argv = [f"{flag}={text}"] if joined else [flag, text]  # --positions -1 is a value too
    args = build_parser().parse_args(["trace", "p", *argv])
    assert trace_options(args)[flag[2:]] == value


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        *((flag, t) for flag in ("--layers", "--positions") for t in BAD_INDEX_LISTS),
        ("--layers", "-1"),
        ("--positions", "-1-3"),
        ("--positions", "first"),
    ],
)
def test_bad_layers_and_positions_exit_2_at_parse_time(run, capsys, flag, text):
    with pytest.raises(SystemExit) as exc:
        run("trace", "p", f"{flag}={text}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected " in err and repr(text) in err


def test_position_names_match_the_settings():
    from lenscope.cli import POSITION_NAMES
    from lenscope.settings import POSITION_NAMES as SETTINGS_NAMES

    assert POSITION_NAMES == SETTINGS_NAMES


def test_layers_and_positions_choose_the_traced_cells(run, tmp_path):
    js = tmp_path / "t.json"
    code, _, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--samples",
        "2",
        "--quiet",
        "--kinds",
        "mlp_out",
        "--layers",
        "1-2",
        "--positions",
        "subject",
        "--out",
        str(tmp_path / "t.html"),
        "--json",
        str(js),
    )
    assert code == 0, err
    scores = json.loads(js.read_text())["mlp_out"]["scores"]
    traced = {
        (layer, pos)
        for layer, row in enumerate(scores)
        for pos, v in enumerate(row)
        if v is not None
    }
    assert traced == {(layer, pos) for layer in (1, 2) for pos in (1, 2, 3)}


def test_dataset_has_no_cell_flags(run):
    with pytest.raises(SystemExit) as exc:
        run("dataset", "--layers", "0-1")
    assert exc.value.code == 2


@pytest.mark.filterwarnings("always::UserWarning")
def test_a_long_trace_is_announced_on_stderr_in_flags(run, tmp_path, monkeypatch):
    from lenscope import progress

    monkeypatch.setattr(progress, "LONG_TRACE_SECONDS", 0.0)
    code, _, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--samples",
        "2",
        "--quiet",
        "--kinds",
        "resid_post",
        "--out",
        str(tmp_path / "t.html"),
    )
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if "will take" in x]
    assert line.startswith("lenscope trace: warning: this trace will take about ")
    assert "40 cells x 1 kind = 40 cells in " in line
    assert line.endswith(
        "to trace fewer cells pass --positions subject (or --positions from_subject, or "
        "positions such as 3,4,5) and a range of layers such as --layers 0-1, or fewer --samples"
    )


def test_a_trace_too_big_for_memory_exits_2(run, tmp_path, monkeypatch):
    from lenscope import engine

    monkeypatch.setattr(engine, "available_memory", lambda device: 1000)
    code, _, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--quiet",
        "--out",
        str(tmp_path / "t.html"),
    )
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(
        "lenscope trace: error: one cell of a trace must fit in memory, but this 10-token prompt "
        "needs about "
    )
    assert err.rstrip().endswith(
        "trace a shorter prompt (a row's memory grows with the square of its length); neither "
        "--positions nor --layers lowers what one cell needs"
    )


def test_subject_is_checked_before_the_model_loads(monkeypatch, capsys, tmp_path):
    import time

    import lenscope.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lenscope.loading, "load_model", no_loading)
    out = ["--out", str(tmp_path / "x.html"), "--quiet"]
    started = time.perf_counter()
    assert main(["trace", TINY_PROMPT, "--subject", "The Louvre", *out]) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err
    assert "subject 'The Louvre' must occur in the prompt" in err
    assert "pass --subject with text copied from the prompt" in err


def test_local_tokenizer_never_downloads(monkeypatch):
    import lenscope.loading

    assert lenscope.loading.local_tokenizer("gpt2-xl") is None
    monkeypatch.setattr(lenscope.loading, "_OFFLINE_PACKAGE", "no_such_package_xyz")
    assert lenscope.loading.local_tokenizer("gemma-3-270m") is None


def test_every_name_the_cli_offers_has_its_meaning_in_the_package():
    # The names live once, in the torch-free lenscope.names; here: each one means something.
    from lenscope import metrics, names, sites

    assert set(metrics.BINDERS) == set(names.METRIC_NAMES)
    assert set(names.FOIL_METRICS) <= set(names.METRIC_NAMES)
    assert set(names.DEFAULT_KINDS) <= set(names.KINDS)
    assert [sites.site(k).hook_name(3) for k in names.KINDS] == [
        f"blocks.3.hook_{k}" for k in names.KINDS
    ]
    assert [sites.site(k).hook_name(3) for k in names.HEAD_KINDS] == [
        f"blocks.3.attn.hook_{k}" for k in names.HEAD_KINDS
    ]


def test_patch_command_equals_the_python_api(run, tmp_path, tiny_model):
    from lenscope import CausalTracer

    js = tmp_path / "p.json"
    counterfactual = "The Space Needle is located in the city of"
    code, out, err, _ = run(
        "patch",
        TINY_PROMPT,
        counterfactual,
        "--kinds",
        "resid_pre",
        "--answer",
        " paris",
        "--foil",
        " seattle",
        "--direction",
        "noise",
        "--out",
        str(tmp_path / "p.html"),
        "--json",
        str(js),
        "--quiet",
    )
    assert code == 0, err
    data = json.loads(js.read_text())["resid_pre"]
    expected = CausalTracer(tiny_model, progress=False).patch(
        TINY_PROMPT, counterfactual, answer=" paris", foil=" seattle", direction="noise"
    )
    assert data["scores"] == expected.scores.tolist()
    assert f"prompt {counterfactual!r}; foil ' seattle'; direction noise" in out
    assert "noise std" not in out and "samples" not in out
    assert "clean      normalized_logit_diff = 1.0000" in out


def test_patch_command_refuses_prompts_of_different_lengths(run, tmp_path):
    code, _, err, _ = run(
        "patch", TINY_PROMPT, "The Colosseum is located in the city of", "--quiet"
    )
    assert code == 2
    assert "as many tokens as the clean prompt" in err


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("uniform", "uniform_noise"),
        ("t4", "student_t_noise"),
        ("multivariate", "multivariate_gaussian_noise"),
    ],
)
def test_trace_corruption_flag(run, tmp_path, flag, name):
    js = tmp_path / "t.json"
    code, _, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--kinds",
        "mlp_out",
        "--samples",
        "2",
        "--corruption",
        flag,
        "--replace",
        "--out",
        str(tmp_path / "t.html"),
        "--json",
        str(js),
        "--quiet",
    )
    if flag == "multivariate":
        # The tiny tokenizer knows few of the reference subjects' words: too few
        # distinct embeddings for a covariance of full rank.
        assert code == 2 and "pass ridge=" in err
        return
    assert code == 0, err
    record = json.loads(js.read_text())["mlp_out"]["corruption"]
    assert record["name"] == name and record["replace"] is True


def test_cli_copies_of_direction_names_match_the_package():
    from lenscope import cli, settings

    assert cli.DIRECTIONS == settings.DIRECTIONS


def test_lens_train_saves_a_lens_and_reports_held_out_kl(run, tiny_model, tmp_path):
    from conftest import TINY_WORDS

    from lenscope import LensEvaluation, TunedLens

    texts = tmp_path / "train.txt"
    texts.write_text(" ".join(TINY_WORDS * 6))
    held = tmp_path / "held.txt"
    held.write_text(" ".join(reversed(TINY_WORDS * 3)))
    out = tmp_path / "tiny.lens"
    code, stdout, stderr, calls = run(
        "lens", "train", "--texts", str(texts), "--out", str(out), "--steps", "2",
        "--tokens-per-step", "32", "--seq-len", "16", "--batch-size", "2", "--held-out",
        str(held), "--eval-tokens", "32", "--json", str(tmp_path / "eval.json"), "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    assert "trained a tuned lens" in stdout and "on 64 tokens (2 steps)" in stdout
    assert "| layer | KL logit lens | KL tuned lens |" in stdout
    assert calls[0][0] == "gemma-3-270m"
    lens = TunedLens.load(out, tiny_model)
    assert lens.training["steps"] == 2
    assert LensEvaluation.load(tmp_path / "eval.json").tokens == 30


def test_lens_train_refuses_missing_texts_before_loading(run, tmp_path):
    code, _, stderr, calls = run(
        "lens", "train", "--texts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "l")
    )
    assert code == 2 and not calls
    assert "--texts and --held-out take text files" in stderr


def test_lens_train_help():
    out = subprocess.run(
        [sys.executable, "-m", "lenscope.cli", "lens", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--texts",
        "--out",
        "--steps",
        "--tokens-per-step",
        "--seq-len",
        "--held-out",
        "--optimizer",
        "--lr",
    ):
        assert option in out


def test_trace_method_attribution(run, tiny_model, tmp_path):
    """--method attribution writes the estimates tracer.attribute gives with the same flags,
    and says what they cost."""
    import torch

    import lenscope

    js = tmp_path / "a.json"
    code, out, err, _ = run(
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--samples",
        "2",
        "--kinds",
        "mlp_out",
        "--method",
        "attribution",
        "--out",
        str(tmp_path / "a.html"),
        "--json",
        str(js),
        "--quiet",
    )
    assert code == 0, err
    assert "1 clean forward pass, 1 forward and 1 backward pass of 2 corrupted copies" in err
    data = json.loads(js.read_text())
    assert data["mlp_out"]["method"] == "attribution"
    expected = lenscope.CausalTracer(tiny_model, progress=False).attribute(
        TINY_PROMPT, "The Eiffel Tower", kinds=("mlp_out",), samples=2, seed=0
    )["mlp_out"]
    torch.testing.assert_close(torch.tensor(data["mlp_out"]["scores"]), expected.scores)


def test_trace_estimator(run, tiny_model, tmp_path):
    """--estimator ig:2 gives tracer.attribute(estimator='ig:2'); without --method
    attribution, or with an unknown name, it is refused before the model loads."""
    import torch

    import lenscope

    js = tmp_path / "a.json"
    common = (TINY_PROMPT, "--subject", "The Eiffel Tower", "--samples", "2", "--kinds", "mlp_out")
    outputs = ("--out", str(tmp_path / "a.html"), "--json", str(js), "--quiet")
    code, _, err, _ = run(
        "trace", *common, "--method", "attribution", "--estimator", "ig:2", *outputs
    )
    assert code == 0, err
    data = json.loads(js.read_text())
    expected = lenscope.CausalTracer(tiny_model, progress=False).attribute(
        TINY_PROMPT, "The Eiffel Tower", kinds=("mlp_out",), samples=2, seed=0, estimator="ig:2"
    )["mlp_out"]
    assert data["mlp_out"]["estimator"] == "ig:2"
    torch.testing.assert_close(torch.tensor(data["mlp_out"]["scores"]), expected.scores)
    code, _, err, _ = run("trace", *common, "--estimator", "ig:2", *outputs)
    assert code != 0 and "without --method attribution; add --method attribution" in err
    code, _, err, _ = run(
        "trace", *common, "--method", "attribution", "--estimator", "ig", *outputs
    )
    assert (
        code != 0 and "estimator must be 'atp', 'atp-star', 'relp', 'ig:M' or 'ig:M:layer'" in err
    )


def test_trace_target_and_relp(run, tiny_model, tmp_path):
    """--estimator relp --target log_prob gives tracer.attribute(estimator='relp',
    target='log_prob'); --target without --method attribution is refused."""
    import torch

    import lenscope

    js = tmp_path / "a.json"
    common = (TINY_PROMPT, "--subject", "The Eiffel Tower", "--samples", "2", "--kinds", "mlp_out")
    outputs = ("--out", str(tmp_path / "a.html"), "--json", str(js), "--quiet")
    options = ("--method", "attribution", "--estimator", "relp", "--target", "log_prob")
    code, _, err, _ = run("trace", *common, *options, *outputs)
    assert code == 0, err
    data = json.loads(js.read_text())
    expected = lenscope.CausalTracer(tiny_model, progress=False).attribute(
        TINY_PROMPT,
        "The Eiffel Tower",
        kinds=("mlp_out",),
        samples=2,
        seed=0,
        estimator="relp",
        target="log_prob",
    )["mlp_out"]
    assert data["mlp_out"]["estimator"] == "relp" and data["mlp_out"]["target"] == "log_prob"
    torch.testing.assert_close(torch.tensor(data["mlp_out"]["scores"]), expected.scores)
    code, _, err, _ = run("trace", *common, "--target", "log_prob", *outputs)
    assert code != 0 and "--target log_prob without --method attribution" in err


def _interrupt_second_sweep(monkeypatch):
    """Ctrl-C as the second kind's sweep starts."""
    import lenscope.engine

    original, calls = lenscope.engine.sweep, []

    def sweep(*args, **kwargs):
        calls.append(kwargs["site"].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(lenscope.engine, "sweep", sweep)


@pytest.mark.parametrize("with_json", [False, True])
def test_ctrl_c_keeps_the_finished_kinds_beside_out(run, tmp_path, monkeypatch, with_json):
    common = ["--subject", "The Eiffel Tower", "--samples", "2", "--quiet"]
    alone = tmp_path / "alone.json"
    assert run("trace", TINY_PROMPT, *common, "--kinds", "resid_post", "--out",
               str(tmp_path / "alone.html"), "--json", str(alone))[0] == 0  # fmt: skip
    _interrupt_second_sweep(monkeypatch)
    out = tmp_path / "t.html"
    kept = tmp_path / "mine.json" if with_json else tmp_path / "t.partial.json"
    json_flag = ["--json", str(kept)] if with_json else []
    code, stdout, err, _ = run("trace", TINY_PROMPT, *common, "--out", str(out), *json_flag)
    assert code == 130
    assert err == (
        f"lenscope trace: interrupted: 1 of 3 kinds finished; they are saved in {str(kept)!r} "
        "(in the format of --json)\n"
    )
    assert not out.exists() and stdout == ""
    data = json.loads(kept.read_text())
    assert list(data) == ["resid_post"]
    assert data["resid_post"] == json.loads(alone.read_text())["resid_post"]


def test_ctrl_c_in_the_first_kind_keeps_nothing(run, tmp_path, monkeypatch):
    import lenscope.engine

    def sweep(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lenscope.engine, "sweep", sweep)
    code, _, err, _ = run("patch", TINY_PROMPT, "The Space Needle is located in the city of",
                          "--answer", " paris", "--foil", " seattle", "--quiet",
                          "--out", str(tmp_path / "p.html"))  # fmt: skip
    assert code == 130
    assert err == "lenscope patch: interrupted: 0 of 3 kinds finished; nothing to keep\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_keeps_the_finished_facts_of_a_dataset(run, tmp_path, monkeypatch):
    import lenscope.datasets as ds
    from lenscope.datasets import DatasetSummary

    original, done = ds.run._trace_job, []

    def trace_job(tracer, fact_id, fact, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(fact_id)
        return original(tracer, fact_id, fact, **kwargs)

    monkeypatch.setattr(ds.run, "_trace_job", trace_job)
    facts = tmp_path / "facts.json"
    subjects = ["The Eiffel Tower", "The Space Needle", "The Colosseum", "Big Ben"]
    facts.write_text(json.dumps([
        {"prompt": f"{subject} is located in the city of", "subject": subject}
        for subject in subjects
    ]))  # fmt: skip
    out = tmp_path / "report.html"
    code, _, err, _ = run("dataset", "--facts", str(facts), "--no-filter", "--samples", "2",
                          "--quiet", "--out", str(out))  # fmt: skip
    kept = tmp_path / "report.partial.json"
    assert code == 130
    assert err.splitlines()[-1] == (
        f"lenscope dataset: interrupted: 2 of 4 facts finished; they are saved in {str(kept)!r} "
        "(DatasetSummary.load reads it)"
    )
    summary = DatasetSummary.load(kept)
    assert [f.fact_id for f in summary.facts] == done and summary.n_pending == 2
    assert not out.exists()


def test_bad_dtype_is_refused_at_parse_time_without_importing_torch():
    script = (
        "import sys\n"
        "from lenscope.cli import main\n"
        "try:\n"
        "    main(['trace', 'The cat sat', '--subject', 'cat', '--dtype', 'float8'])\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert (
        "argument --dtype: dtype must be a precision a model can run in: float32, bfloat16, "
        "float16, float64"
    ) in done.stderr
    assert "got 'float8'; pass --dtype float32 (the default)" in done.stderr


def test_dtype_names_reach_the_loader_as_torch_names(run, tmp_path):
    code, _, err, calls = run(
        "trace",
        TINY_PROMPT,
        "--quiet",
        "--samples",
        "1",
        "--dtype",
        "bf16",
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "x.html"),
    )
    assert code == 0, err
    assert calls[0][1]["dtype"] == "bfloat16"


def test_model_help_names_local_folders_and_gguf_files():
    out = subprocess.run(
        [sys.executable, "-m", "lenscope.cli", "trace", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    assert "gemma-3-270m (default) or smollm2-135m" in flat
    assert (
        "a local folder saved with save_pretrained or a .gguf file (offline; ~ is expanded)" in flat
    )
    assert "float32 (default), bfloat16, float16 or float64" in flat


def test_quiet_silences_transformers_progress_bars(tmp_path, tiny_tokenizer, capfd):
    """--quiet: no "Loading weights" bar from transformers; the setting is restored after."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=2,
    )
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    capfd.readouterr()
    argv = [
        "trace",
        TINY_PROMPT,
        "--subject",
        "The Eiffel Tower",
        "--model",
        str(folder),
        "--samples",
        "1",
        "--kinds",
        "resid_post",
        "--out",
        str(tmp_path / "x.html"),
    ]
    assert main([*argv, "--quiet"]) == 0
    quiet = capfd.readouterr().err
    assert "Loading weights" not in quiet and "%|" not in quiet, quiet
    assert transformers_logging.is_progress_bar_enabled()
    assert main(argv) == 0
    assert "Loading weights" in capfd.readouterr().err  # the check above can fail


@pytest.mark.parametrize("option", ["inline", "file", "cdn"])
def test_plotly_js_option_and_the_page_names_the_experiment(run, tmp_path, option):
    from lenscope.plotting._common import plotly_js_file

    html = tmp_path / "t.html"
    code, _, err, _ = run(
        "trace", TINY_PROMPT, "--subject", "The Eiffel Tower", "--answer", " paris",
        "--samples", "2", "--seed", "4", "--out", str(html), "--quiet", "--plotly-js", option,
    )  # fmt: skip
    assert code == 0, err
    text = html.read_text(encoding="utf-8")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["t.html", plotly_js_file()] if option == "file" else ["t.html"])
    assert (len(text) > 1_000_000) == (option == "inline")
    assert ('src="https://cdn.plot.ly/' in text) == (option == "cdn")
    title = text[text.index("<title>") : text.index("</title>")]
    assert "restoring clean activations into the corrupted run" in title
    assert "<th>corruption</th><td" in text and ">gaussian_noise<" in text
    assert "<th>seed</th><td" in text and ">4<" in text and "counterfactual" not in text


def test_every_command_that_writes_html_offers_plotly_js(capsys):
    from lenscope.cli import build_parser

    parser = build_parser()
    for command in ("trace", "patch", "dataset"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--plotly-js {inline,file,cdn}" in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "p", "--plotly-js", "web"])
    assert "invalid choice: 'web'" in capsys.readouterr().err


def test_ablate_flag_traces_the_ablation_of_the_python_api(run, tmp_path, tiny_model):
    from lenscope import CausalTracer, ZeroAblation

    js = tmp_path / "a.json"
    args = ("trace", TINY_PROMPT, "--subject", "The Eiffel Tower", "--kinds", "mlp_out")
    code, out, err, _ = run(*args, "--ablate", "zero:mlp_out@1-2", "--json", str(js), "--quiet")
    assert code == 0, err
    assert "zero ablation (site 'mlp_out', ablated layers [1, 2]" in out
    saved = json.loads(js.read_text())["mlp_out"]
    corruption = ZeroAblation("mlp_out", layers=[1, 2])
    assert saved["corruption"] == corruption.to_dict()
    expected = CausalTracer(tiny_model, progress=False).trace(
        TINY_PROMPT, "The Eiffel Tower", kind="mlp_out", corruption=corruption
    )
    assert saved["scores"] == json.loads(json.dumps(expected.to_dict()))["scores"]
    source = "The Space Needle is located in the city of"
    code, _, err, _ = run(
        *args, "--ablate", "resample:z", "--ablate-from", source, "--json", str(js), "--quiet"
    )
    assert code == 0, err
    record = json.loads(js.read_text())["mlp_out"]["corruption"]
    assert record["resample_sources"] == [source] and record["ablated_layers"] is None


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--ablate", "zero:mlp"], r"expected KIND:SITE\[@LAYERS\] with KIND one of zero, mean"),
        (["--ablate", "half:mlp_out@2"], r"got 'half:mlp_out@2'; pass e.g. --ablate zero:mlp_"),
        (["--ablate", "zero:mlp_out@x"], r"got 'zero:mlp_out@x'"),
        (["--ablate", "mean:mlp_out@2"], r"--ablate mean averages over other prompts, got no --a"),
        (["--ablate-from", "x"], r"--ablate-from gives the prompts of --ablate mean or resample"),
        (["--ablate", "zero:mlp_out@9"], r"layers must be distinct layer indices in \[0, 4\)"),
    ],
)
def test_bad_ablate_flags_name_the_rule(run, capsys, flags, match):
    import re

    try:  # a malformed flag stops argparse (SystemExit), a bad value the command
        code, _, err, _ = run("trace", TINY_PROMPT, "--subject", "The Eiffel Tower", *flags)
    except SystemExit as exc:
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and re.search(match, err), err


def test_cli_copies_of_ablation_names_match_the_package():
    from lenscope import cli, corruptions

    assert cli.ABLATION_SITES == corruptions.ABLATION_SITES
    assert {f"{kind}_ablation" for kind in cli.ABLATION_KINDS} == {
        name for name in corruptions.CORRUPTIONS if name.endswith("_ablation")
    }
