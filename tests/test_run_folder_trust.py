"""A run folder is data: `cirlab.load`, `cirlab-demo RUN` and `+task=export` build only cirlab's targets from
its config, refuse anything else (naming the target and the file) before it runs, and turn a damaged
config or results.json into a CirlabError naming the file."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cirlab.errors import CirlabError
from cirlab.trusted import allowed, targets

ROOT = Path(__file__).resolve().parents[1]
REFUSED = "is not something a run folder may build"


@pytest.fixture(scope="module")
def finished_run(shared_run) -> Path:
    """The zero-shot baseline test_cli, test_mlcl and test_searle share (built once per session)."""
    return shared_run("+method=zeroshot", "method.fusion=sum")


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("*.npy", "predictions*", "visual*"))
    return copy


def tamper(run: Path, key: str, node) -> None:
    """Set `key` of both the run's config.yaml and its results.json config to `node`."""
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    OmegaConf.update(cfg, key, node, force_add=True, merge=False)
    OmegaConf.save(cfg, cfg_path)
    results = json.loads((run / "results.json").read_text())
    parent = results["config"]
    *path, last = key.split(".")
    for part in path:
        parent = parent[part]
    parent[last] = node
    (run / "results.json").write_text(json.dumps(results))


def attacks(tmp_path: Path) -> dict[str, tuple[str, object]]:
    """name -> (key, node): a file-writing callable Hydra allows, one it blocks, one an interpolation makes."""
    src = tmp_path / "secret.txt"
    src.write_text("secret")
    dst = tmp_path / "written.txt"
    copy = {"_target_": "shutil.copyfile", "src": str(src), "dst": str(dst)}
    return {
        "copyfile": ("backbone.model", copy),
        "os.system": ("dataset.source", {"_target_": "os.system", "command": f"touch {dst}"}),
        "oc.create": (
            "backbone.model",
            f"${{oc.create:{{_target_: shutil.copyfile, src: '{src}', dst: '{dst}'}}}}",
        ),
    }


ATTACKS = ["copyfile", "os.system", "oc.create"]


def refusal(message: str, target: str, file: str) -> None:
    assert REFUSED in message and repr(target) in message and file in message, message


@pytest.mark.parametrize("attack", ATTACKS)
def test_load_refuses_a_run_folder_that_names_a_foreign_target(run_copy, tmp_path, attack):
    import cirlab

    key, node = attacks(tmp_path)[attack]
    tamper(run_copy, key, node)
    target = "os.system" if attack == "os.system" else "shutil.copyfile"
    with pytest.raises(CirlabError) as err:
        cirlab.load(run_copy)
    refusal(str(err.value), target, "config.yaml")
    assert not (tmp_path / "written.txt").exists()


@pytest.mark.parametrize("attack", ["copyfile", "os.system"])
def test_demo_refuses_it_with_exit_2(run_copy, tmp_path, capsys, monkeypatch, attack):
    from cirlab.demo import load_backend
    from cirlab.demo import main as demo_main

    # refused before the page is built: an empty stand-in spares the import of Gradio (seconds)
    monkeypatch.setitem(sys.modules, "gradio", types.ModuleType("gradio"))
    key, node = attacks(tmp_path)[attack]
    tamper(run_copy, key, node)
    with pytest.raises(CirlabError, match=REFUSED):
        load_backend(run_copy, log=lambda *_: None)
    with pytest.raises(SystemExit) as exc:
        demo_main([str(run_copy), "--port", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    refusal(err, "os.system" if attack == "os.system" else "shutil.copyfile", "config.yaml")
    assert not (tmp_path / "written.txt").exists()


@pytest.mark.parametrize("attack", ["copyfile", "os.system"])
def test_export_refuses_it_with_exit_2(run_copy, tmp_path, cli, attack):
    key, node = attacks(tmp_path)[attack]
    tamper(run_copy, key, node)
    code, _, err = cli("+task=export", f"+run={run_copy}", run_dir=tmp_path / "export")
    assert code == 2 and "Traceback" not in err, err
    refusal(err, "os.system" if attack == "os.system" else "shutil.copyfile", "results.json")
    assert not (tmp_path / "written.txt").exists()


def test_a_legit_run_folder_still_loads_and_exports(run_copy, tmp_path, cli):
    import cirlab

    retriever = cirlab.load(run_copy)
    source = retriever.data.source
    paths = [source.image_path(n) for n in list(source.eval_sets("test")[0].gallery)[:8]]
    hits = retriever.index(paths).search(paths[0], "make it red", k=3)
    assert len(hits) == 3
    code, _, err = cli("+task=export", f"+run={run_copy}", run_dir=tmp_path / "export")
    assert code == 2 and "nothing to export" in err and REFUSED not in err  # zero-shot trains nothing


def test_every_target_of_conf_and_experiments_is_allowed():
    """A config cirlab ships must load back from its run folder: a new `_target_` needs its place in
    cirlab/trusted.py (Hydra's launcher and callbacks live in hydra.yaml, never read from a run)."""
    found = set()
    for path in [*ROOT.glob("conf/**/*.yaml"), *ROOT.glob("experiments/*.yaml")]:
        if "hydra" in path.relative_to(ROOT).parts[:2]:
            continue
        config = yaml.safe_load(path.read_text()) or {}
        config.pop("hydra", None)
        found.update(target for _, target in targets(config))
    assert len(found) > 20
    assert not {t for t in found if not allowed(t)}


@pytest.mark.parametrize(
    "target, ok",
    [
        ("torch.optim.SGD", True),
        ("torch.optim.lr_scheduler.CosineAnnealingLR", True),
        ("cirlab.methods.zeroshot.ZeroShot", True),
        ("cirlab.io.write_json", False),  # cirlab's, but it writes files
        ("cirlab.methods.blip4cir.partial", False),  # imported from functools
        ("cirlab.retrieval.embedding_file.EmbeddingWriter", False),  # a cirlab class outside the bases
        ("torch.save", False),
        ("torch.optim.lr_scheduler.warnings.warn", False),
        ("builtins.exec", False),
        ("cirlab.nope.Nothing", False),
        (None, False),
    ],
)
def test_allowlist(target, ok):
    assert allowed(target) is ok


# ---- damaged run folders: a CirlabError naming the file, never a traceback ----------------------------
@pytest.mark.parametrize(
    "file, text, said",
    [
        ("results.json", '{"config": {', "results.json is not valid JSON"),
        ("results.json", "[1, 2]", "results.json is not a cirlab run's config"),
        ("results.json", b"\xff\xfe\x00", "results.json is not valid JSON"),
        (".hydra/config.yaml", "paths: [unclosed", "config.yaml is not a readable run config"),
        (".hydra/config.yaml", "- a\n- b\n", "config.yaml is not a cirlab run's config"),
        (".hydra/config.yaml", "method: {stages: eval}\n", "method.stages"),
        (".hydra/config.yaml", "x: ${nowhere}\n", "config.yaml: the run's config does not resolve"),
        (".hydra/hydra.yaml", "hydra: [", "hydra.yaml is damaged"),
    ],
)
def test_damaged_run_files_are_named(run_copy, file, text, said):
    import cirlab

    path = run_copy / file
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CirlabError, match=re.escape(said)):
        cirlab.load(run_copy)


def test_a_config_missing_a_key_names_it(run_copy):
    import cirlab

    cfg_path = run_copy / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    del cfg["retrieval"]
    OmegaConf.save(cfg, cfg_path)
    with pytest.raises(CirlabError, match=r"config\.yaml: retrieval"):
        cirlab.load(run_copy)


def test_export_names_a_damaged_results_json(run_copy, tmp_path, cli):
    (run_copy / "results.json").write_text('{"config": ')
    code, _, err = cli("+task=export", f"+run={run_copy}", run_dir=tmp_path / "export")
    assert code == 2 and "results.json is not valid JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["last.ckpt", "checkpoints/last.ckpt", "x/checkpoints/last.ckpt"])
def test_a_short_relative_checkpoint_path_is_a_message(tmp_path, monkeypatch, name):
    import cirlab

    monkeypatch.chdir(tmp_path)
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_bytes(b"")
    with pytest.raises(CirlabError, match="is not inside <run>/stages/<stage>/checkpoints/"):
        cirlab.load(name)
