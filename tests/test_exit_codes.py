"""Exit codes say whose the problem is: 2 with a one-line message for what the user can fix (cirlab's own
errors, Hydra's config errors), 1 with the traceback for a bug. No test here trains or loads a model."""

from __future__ import annotations

import pytest

from cirlab.errors import CirlabError


def bug(*args, **kwargs):
    raise RuntimeError("an internal bug")


def test_internal_bug_in_the_run_exits_1_with_its_traceback(cli, monkeypatch):
    monkeypatch.setattr("cirlab.pipeline.run", bug)
    code, out, err = cli("+method=zeroshot")
    assert code == 1, err
    assert "Traceback" in err and "RuntimeError: an internal bug" in err and "in bug" in err
    assert "cirlab error" not in err and "please report it" in err


def test_internal_bug_inside_an_instantiated_target_exits_1_with_its_traceback(cli, monkeypatch):
    """Hydra reports any exception of a `_target_` in one line: the bug's own traceback is shown."""
    monkeypatch.setattr("cirlab.data.sources.synthetic.synthetic_source", bug)
    code, out, err = cli("+method=zeroshot")
    assert code == 1, err
    assert "Traceback" in err and "an internal bug" in err and "in bug" in err


def test_module_that_fails_at_import_is_a_bug_not_a_bad_target(cli, tmp_path, monkeypatch):
    """Hydra calls it "Error locating target" in one line; the import's own error is shown."""
    (tmp_path / "broken_source.py").write_text("open('/no/such/file')\n\ndef source(**kw): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli("+method=zeroshot", "++dataset.source._target_=broken_source.source")
    assert code == 1, err
    assert "Traceback" in err and "FileNotFoundError" in err and "/no/such/file" in err


def test_cirlab_error_in_the_run_exits_2_with_one_line(cli, monkeypatch):
    def user_error(*args, **kwargs):
        raise CirlabError("dataset.path=/x: no such folder")

    monkeypatch.setattr("cirlab.pipeline.run", user_error)
    code, out, err = cli("+method=zeroshot")
    assert code == 2 and "cirlab error: dataset.path=/x: no such folder" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,shown",
    [
        (["+method=zeroshot", "no_such_key=1"], "Could not override 'no_such_key'"),  # unknown override
        (["+method=zeroshot", "backbone=nope"], "Could not find 'backbone/nope'"),  # missing group option
        (["+method=zeroshot", "method.fusion=[unclosed"], "no viable alternative"),  # override syntax
        # a `_target_` that names nothing
        (["+method=zeroshot", "++dataset.source._target_=cirlab.nope.source"], "Error locating target"),
        # a `_target_`'s arguments from the config that it does not take
        (
            ["+method=zeroshot", "++dataset.datamodule.batch_sise=3"],
            "unexpected keyword argument 'batch_sise'",
        ),
        # a setting the synthetic generator does not have (its **spec would raise a TypeError inside cirlab)
        (["+method=zeroshot", "++dataset.source.n_vall=3"], "unknown setting dataset.source.n_vall"),
    ],
)
def test_user_errors_exit_2_without_traceback(cli, args, shown):
    code, out, err = cli(*args)
    assert code == 2, err
    assert shown in err and "Traceback" not in err
