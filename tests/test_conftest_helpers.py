"""The shared test helpers of conftest.py can fail: a ranking check that passed an empty result, or a
baseline run an earlier session left behind, would let the tests built on them pass whatever the code."""

from __future__ import annotations

import json

import conftest
import pytest
from conftest import assert_same_ranking, session_folder, shared_runs

SCORE = {"a": 0.9, "b": 0.8, "c": 0.8 + 1e-8, "d": 0.5, "e": 0.1}


def test_same_ranking_allows_only_swaps_of_tied_scores():
    assert_same_ranking(["a", "b", "c", "d"], ["a", "b", "c", "d"], SCORE)
    assert_same_ranking(["a", "c", "b", "d"], ["a", "b", "c", "d"], SCORE)  # b and c tie
    for got, why in (
        ([], "0 results"),  # zip() alone passed these two
        (["a", "b"], "2 results"),
        (["a", "b", "c", "d", "e"], "5 results"),
        (["a", "b", "c", "e"], r"\('e', 'd'\)"),  # not a tie
        (["a", "b", "b", "d"], "twice"),
    ):
        with pytest.raises(AssertionError, match=why):
            assert_same_ranking(got, ["a", "b", "c", "d"], SCORE)


def test_same_ranking_refuses_scores_that_cannot_judge():
    with pytest.raises(AssertionError, match="every score ties"):  # e.g. a query embedding of zeros
        assert_same_ranking(["d", "c", "b", "a"], ["a", "b", "c", "d"], dict.fromkeys(SCORE, 0.0))
    with pytest.raises(AssertionError, match="do not order"):  # not evaluation's scores
        assert_same_ranking(["a", "b", "c", "d"], ["a", "b", "c", "d"], {**SCORE, "d": 0.95})
    with pytest.raises(AssertionError, match="ranked nothing"):
        assert_same_ranking([], [], SCORE)


def temp_factory(given):
    return pytest.TempPathFactory(given, 3, "all", lambda *_: None, _ispytest=True)


def test_shared_run_reuses_this_sessions_runs_only(tmp_path, monkeypatch):
    """Sessions simulated with pytest's own TempPathFactory, as a plain session and as xdist sets up its
    workers (each gets the controller's base folder + popen-<id> as --basetemp)."""
    built = []

    def fake_run_cli(folder, *args, run_dir):
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"build": len(built)}))
        built.append(args)

    monkeypatch.setattr(conftest, "run_cli", fake_run_cli)
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(tmp_path))  # numbered base folders go here

    def session(basetemp, workers=("",)) -> list[int]:
        """The build number of the baseline each process of a new session gets."""
        factories = [temp_factory(basetemp)]
        if workers != ("",):
            factories = [temp_factory(factories[0].getbasetemp() / f"popen-{w}") for w in workers]
        got = []
        for worker, factory in zip(workers, factories):
            monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
            if not worker:
                monkeypatch.delenv("PYTEST_XDIST_WORKER")
            run = shared_runs(session_folder(factory) / "shared-runs")
            got.append(json.loads((run("+method=zeroshot") / "results.json").read_text())["build"])
        return got

    for basetemp in (None, tmp_path / "given"):  # numbered base folders, and pytest --basetemp
        built.clear()
        assert session(basetemp) == [0]
        assert session(basetemp) == [1], "a later session reused an earlier session's run"
        assert session(basetemp, ("gw0", "gw1")) == [2, 2]  # one build for the workers of a session
        assert session(basetemp, ("gw0", "gw1")) == [3, 3]
