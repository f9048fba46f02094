"""SEARLE's real artefacts: the Open Images vocabulary CSV, the GPT phrases pickle (never run), concept
ranking as the reference, phi files in the authors' layout in and out, phi selection off the reported
split, the released-model experiments, and what bad files do on the CLI."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SMALL, results, run_cli
from omegaconf import OmegaConf
from torch import nn

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.errors import CirlabError
from cirlab.methods import searle_text as st
from cirlab.methods.searle import Searle
from cirlab.methods.searle_text import SearleText
from cirlab.weights import load_weights

TINY = OmegaConf.load(ROOT / "conf/backbone/tiny.yaml").model

# rows in the layout of the reference's data/oidv7-class-descriptions.csv (its first two rows, a quoted comma)
OIDV7 = (
    'LabelName,DisplayName\n/m/0c4936,\'Nduja\n/m/06w6y06,10 cane\n/m/0dbvp,"Ducks, geese and swans"\n'
    "/m/01f8m5,blue square\n/m/0k4j,red circle\n"
)
OIDV7_NAMES = ["'Nduja", "10 cane", "Ducks, geese and swans", "blue square", "red circle"]
# SEARLE's src/phi.py: nn.Sequential(Linear, GELU, Dropout, Linear, GELU, Dropout, Linear) named `layers`
PHI_KEYS = {
    "layers.0.weight",
    "layers.0.bias",
    "layers.3.weight",
    "layers.3.bias",
    "layers.6.weight",
    "layers.6.bias",
}


class ReferencePhi(nn.Module):
    """miccunifi/SEARLE src/phi.py, written out here so the key names do not come from cirlab."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return OpenCLIPBackbone(model_cfg=OmegaConf.to_container(TINY.model_cfg), name="tiny").eval()


def malicious_pickle(marker: Path) -> bytes:
    """A pickle that would run `touch marker` when loaded with pickle.load (built, never loaded here)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps({"red circle": [Payload()]})


# ---- vocabulary ---------------------------------------------------------------------------------
def test_vocabulary_reads_the_display_names_of_the_oidv7_csv(tmp_path):
    csv_file = tmp_path / "oidv7-class-descriptions.csv"
    csv_file.write_text(OIDV7)
    assert (
        st.read_vocabulary(csv_file) == OIDV7_NAMES
    )  # not "/m/0c4936,'Nduja", not split at the quoted comma
    plain = tmp_path / "names.txt"
    plain.write_text("red circle\n\n blue square \nred circle\n")
    assert st.read_vocabulary(plain) == ["red circle", "blue square"]
    other = tmp_path / "other.csv"
    other.write_text("id,name\n1,red circle\n")
    with pytest.raises(CirlabError, match="without a DisplayName column"):
        st.read_vocabulary(other)
    with pytest.raises(
        CirlabError,
        match=r"missing\.csv not found.*oidv7-class-descriptions\.csv of "
        r"github\.com/miccunifi/SEARLE",
    ):
        st.read_vocabulary(tmp_path / "missing.csv")


# ---- phrases ------------------------------------------------------------------------------------
def test_phrases_pickle_loads_plain_data_and_refuses_any_global(tmp_path):
    good = {
        "red circle": ["a photo of red circle that is big", "a photo of red circle that is small"],
        "blue square": ["a photo of blue square that is on the left"],
    }
    (tmp_path / "concept_to_phrases.pkl").write_bytes(pickle.dumps(good))
    assert st.load_phrases(tmp_path / "concept_to_phrases.pkl") == good
    (tmp_path / "p.json").write_text(json.dumps(good))
    assert st.load_phrases(tmp_path / "p.json") == good

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(malicious_pickle(marker))
    with pytest.raises(CirlabError, match=r"evil\.pkl refused.*(posix|os)\.system"):
        st.load_phrases(evil)
    assert not marker.exists()
    evil.write_bytes(pickle.dumps({"red circle": [Path("/etc")]}))  # any class at all, even a harmless one
    with pytest.raises(CirlabError, match="refused"):
        st.load_phrases(evil)
    evil.write_bytes(pickle.dumps(good)[:20])
    with pytest.raises(CirlabError, match="not a readable pickle"):
        st.load_phrases(evil)


def test_phrase_bank_keeps_every_phrase_and_samples_as_the_reference(tiny):
    phrases = {
        "red circle": [f"a photo of red circle that is {w}" for w in ("big", "small", "left")],
        "blue square": ["a photo of blue square that is big"],
        "green cross": [f"a photo of green cross that is {w}" for w in ("big", "small")],
    }
    vocab = list(phrases)
    bank = st.PhraseBank(tiny, vocab, phrases, None)  # null = all phrases, however many each concept has
    assert bank.count.tolist() == [3, 1, 2] and bank.start.tolist() == [0, 3, 4] and len(bank.features) == 6
    assert st.PhraseBank(tiny, vocab, phrases, 2).count.tolist() == [2, 1, 2]  # first N, never cycled
    with pytest.raises(CirlabError, match="per_concept"):
        st.PhraseBank(tiny, vocab, phrases, 0)

    n = 60000
    cands = torch.tensor([[0, -1, 1, 2]]).expand(n, 4)  # -1: a dropped concept, never drawn
    gen = torch.Generator().manual_seed(0)
    pooled = torch.bincount(bank.sample(cands, gen, pooled=True), minlength=6).float() / n
    assert torch.allclose(pooled, torch.full((6,), 1 / 6), atol=0.01)  # OTI: uniform over the pool of phrases
    per_concept = torch.bincount(bank.sample(cands, gen, pooled=False), minlength=6).float() / n
    expected = torch.tensor([1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6])  # phi: uniform concept, then phrase
    assert torch.allclose(per_concept, expected, atol=0.01)
    # all usable, equal counts: exactly a column draw and a phrase draw, as before counts could differ
    equal = st.PhraseBank(tiny, vocab, {c: ps[:1] for c, ps in phrases.items()}, None)
    full = torch.tensor([[2, 0, 1]])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    col = torch.randint(3, (1,), generator=g2)
    torch.randint(1, (1,), generator=g2)
    assert equal.sample(full, g1, pooled=True).tolist() == [int(full[0, col])]


def test_concepts_are_ranked_over_the_whole_vocabulary_before_problematic_ones_drop(tiny, tmp_path):
    """The reference takes each image's top-k of ALL concepts and then skips the problematic ones; filtering
    first would reach further down the ranking and give the image concepts it never had."""
    vocab = ["red circle", "blue square", "green cross", "yellow star"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    phrases = {c: [f"a photo of {c} that is big"] for c in vocab}
    phrases["blue square"] = ["a photo of a square that is blue"]  # does not contain its concept: problematic
    (tmp_path / "p.json").write_text(json.dumps(phrases))
    text = SearleText(
        tiny, None, {"vocabulary": str(tmp_path / "vocab.txt")}, {"file": str(tmp_path / "p.json")}
    )
    assert text.bank.concepts == ["red circle", "green cross", "yellow star"]
    d = text.concept_emb.shape[1]
    text.concept_emb = torch.eye(4, d)  # concept i <-> axis i
    image = torch.tensor(
        [[0.5, 1.0, 0.3, 0.1] + [0.0] * (d - 4)]
    )  # ranking: blue square, red circle, green, yellow
    rows = text.concepts_of(image, 2)
    assert rows.tolist() == [
        [-1, text.bank.index["red circle"]]
    ]  # filter-first would give red circle + green cross
    gen = torch.Generator().manual_seed(0)
    assert set(text.bank.sample(rows.expand(200, 2), gen, pooled=True).tolist()) == {
        text.bank.start[0].item()
    }
    with pytest.raises(CirlabError, match="1 of 1 images have no usable concept among their top 1"):
        text.concepts_of(image, 1)


# ---- phi files ----------------------------------------------------------------------------------
def reference_phi_file(tiny, path: Path, epoch: int | None = None) -> ReferencePhi:
    d, t = tiny.embed_dim, tiny.token_dim
    torch.manual_seed(1)
    phi = ReferencePhi(d, 4 * d, t, 0.5).eval()
    assert set(phi.state_dict()) == PHI_KEYS
    obj = {"Phi": phi.state_dict()} | ({"epoch": epoch} if epoch is not None else {})
    torch.save(obj, path)
    return phi


@pytest.mark.parametrize("name,epoch", [("SEARLE_ViT-B32.pt", None), ("phi_20.pt", 20)])
def test_reference_phi_file_gives_the_same_tokens_and_queries(tiny, tmp_path, name, epoch):
    ref = reference_phi_file(tiny, tmp_path / name, epoch)
    module = Searle(tiny).eval()
    layout = load_weights(
        module.stage_weights(), tmp_path / name, module.checkpoint_layouts(), "method.phi.checkpoint"
    )
    assert layout.startswith("SEARLE phi file")
    x = torch.randn(5, tiny.embed_dim)
    with torch.no_grad():
        assert torch.equal(module.tokens(x), ref(x))
        texts = [["is red"], ["has a blue square on the left"], ["is red"], ["x"], ["y"]]
        assert torch.equal(
            module.encode_queries(module.tokens(x), texts), module.encode_queries(ref(x), texts)
        )


def test_phi_export_is_the_reference_layout_and_loads_back(tiny, tmp_path):
    trained = Searle(tiny).eval()
    torch.nn.init.normal_(trained.phi.layers[6].weight)
    files = Searle.reference_files(trained.state_dict(), 7)
    assert list(files) == ["phi.pt"] and set(files["phi.pt"]) == {"Phi", "epoch"}
    assert set(files["phi.pt"]["Phi"]) == PHI_KEYS and files["phi.pt"]["epoch"] == 7
    torch.save(files["phi.pt"], tmp_path / "phi.pt")
    ref = ReferencePhi(tiny.embed_dim, 4 * tiny.embed_dim, tiny.token_dim, 0.5).eval()
    ref.load_state_dict(
        torch.load(tmp_path / "phi.pt", weights_only=True)["Phi"]
    )  # as the reference's hub/validate.py
    x = torch.randn(3, tiny.embed_dim)
    assert torch.equal(ref(x), trained.tokens(x))

    # a cirlab stage checkpoint (phi.* keys) is accepted too
    torch.save({"epoch": 3, "state_dict": trained.state_dict()}, tmp_path / "best.ckpt")
    again = Searle(tiny).eval()
    layout = load_weights(again.stage_weights(), tmp_path / "best.ckpt", again.checkpoint_layouts(), "phi")
    assert layout.startswith("cirlab stage checkpoint") and torch.equal(again.tokens(x), trained.tokens(x))

    normed = Searle(tiny, token_norm=2.5)
    assert Searle.reference_files(normed.state_dict(), 1)["phi.pt"]["token_norm"] == 2.5


def test_token_norm_oti_cannot_come_from_a_phi_file(tiny):
    with pytest.raises(CirlabError, match="token_norm=oti.*give that number"):
        Searle(tiny, token_norm="oti").checkpoint_layouts()


def test_phi_is_selected_on_val_only_when_val_is_not_the_reported_split(tiny):
    module = Searle(tiny)
    protocol = SimpleNamespace(main_metric="recall_at_10")
    module.eval_data = SimpleNamespace(
        val_split="val", test_split="val", source=SimpleNamespace(protocol=protocol)
    )
    assert module.checkpoint_monitor() is None  # FashionIQ/CIRR/CIRCO: the last epoch
    module.eval_data.test_split = "test1"
    assert module.checkpoint_monitor() == "val/recall_at_10"  # CIRR val for a CIRR test1 submission


# ---- experiments --------------------------------------------------------------------------------
SEARLE_EXPERIMENTS = sorted(
    p.stem
    for p in (ROOT / "experiments").glob("*.yaml")
    if p.stem.startswith(("searle_", "eval_released_searle"))
)


def test_released_experiments_exist():
    assert {
        f"eval_released_{v}_{d}" for v in ("searle", "searle_xl") for d in ("fashioniq", "cirr", "circo")
    } <= set(SEARLE_EXPERIMENTS)


@pytest.mark.parametrize("name", SEARLE_EXPERIMENTS)
def test_searle_experiment_builds_with_an_oidv7_vocabulary(name, tiny, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path / "data"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose("config", overrides=[f"+experiment={name}"])
    resolved = OmegaConf.to_container(raw, resolve=True)
    method = resolved["method"]
    paper = not name.endswith("synthetic")
    if paper:  # the reference's files, named under the data folder
        assert method["concepts"]["vocabulary"] == str(tmp_path / "data/searle/oidv7-class-descriptions.csv")
        assert method["phrases"]["file"] == str(tmp_path / "data/searle/GPTNeo27B/concept_to_phrases.pkl")
        assert method["phrases"]["per_concept"] is None
    if name.startswith("eval_released"):
        file = "SEARLE_ViT-L14.pt" if "_xl_" in name else "SEARLE_ViT-B32.pt"
        assert method["phi"]["checkpoint"] == str(tmp_path / "data/searle" / file)
        assert method["phi"]["max_epochs"] == 0 and resolved["trainer"]["precision"] == "32-true"
        assert resolved["backbone"]["model"]["model_name"] == ("ViT-L-14" if "_xl_" in name else "ViT-B-32")
        assert resolved["dataset"]["name"] == name.rsplit("_", 1)[1]

    (tmp_path / "oidv7-class-descriptions.csv").write_text(OIDV7)
    (tmp_path / "concept_to_phrases.pkl").write_bytes(
        pickle.dumps(
            {c: [f"a photo of {c} that is big", f"a photo of {c} that is small"] for c in OIDV7_NAMES}
        )
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"+experiment={name}",
                f"method.concepts.vocabulary={tmp_path / 'oidv7-class-descriptions.csv'}",
            ]
            + ([f"method.phrases.file={tmp_path / 'concept_to_phrases.pkl'}"] if paper else []),
        )
    for stage in cfg.method.stages:
        module = instantiate(cfg.method[stage].module, backbone=tiny)
        module.eval_data = SimpleNamespace(source=None)
        text = module.vocabulary_and_phrases()
        assert text.vocabulary == OIDV7_NAMES and text.bank.concepts == OIDV7_NAMES
        assert text.bank.count.tolist() == ([2] * 5 if paper else [32] * 5)


# ---- the CLI: bad phi / phrases files stop the run before anything that looks like a result --------
def assert_refused(code: int, err: str, run: Path, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not list(run.rglob("*.json")), list(run.rglob("*.json"))  # no results.json, done.json, predictions


def test_bad_phi_files_exit_2_without_a_result(cli, tmp_path):
    from cirlab.methods.combiner import Combiner

    def phi_eval(file: Path, *extra: str) -> tuple[int, str, Path]:
        run = tmp_path / f"run-{file.stem}-{len(extra)}"
        code, _, err = cli(
            "+method=searle",
            "method.phi.max_epochs=0",
            f"method.phi.checkpoint={file}",
            *extra,
            f"method.token_dir={tmp_path / 'tokens'}",
            run_dir=run,
        )
        return code, err, run

    combiner = tmp_path / "combiner.pt"  # a CLIP4Cir combiner file given as phi
    torch.save({"epoch": 3, "Combiner": Combiner(16).state_dict()}, combiner)
    assert_refused(
        *phi_eval(combiner), "method.phi.checkpoint=", "none of the layouts", "'Combiner'", "SEARLE phi file"
    )

    assert_refused(*phi_eval(tmp_path / "SEARLE_ViT-B32.pt"), "SEARLE_ViT-B32.pt: no such file")

    vit_l = (
        tmp_path / "SEARLE_ViT-L14.pt"
    )  # the XL release's shapes (768 -> 3072 -> 768) into the tiny backbone
    torch.save({"Phi": ReferencePhi(768, 3072, 768, 0.5).state_dict()}, vit_l)
    assert_refused(*phi_eval(vit_l), "of another shape", "layers.0.weight: file (3072, 768)")

    ok = tmp_path / "phi_20.pt"
    torch.save({"Phi": ReferencePhi(128, 512, 64, 0.5).state_dict(), "epoch": 20}, ok)
    assert_refused(*phi_eval(ok, "method.phi.module.token_norm=oti"), "token_norm=oti")
    assert not (tmp_path / "tokens").exists()  # no OTI ran


def test_phrases_pickle_with_a_global_exits_2_and_runs_nothing(cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "concept_to_phrases.pkl"
    evil.write_bytes(malicious_pickle(marker))
    run = tmp_path / "run"
    code, _, err = cli(
        "+method=searle_oti",
        f"method.phrases.file={evil}",
        f"method.token_dir={tmp_path / 'tokens'}",
        run_dir=run,
    )
    assert_refused(code, err, run, "refused", "system")
    assert not marker.exists()


@pytest.mark.slow
def test_exported_phi_reproduces_the_run(tmp_path):
    """+method=searle -> +task=export -> method.phi.checkpoint=phi.pt with max_epochs 0: the same test metrics,
    with no OTI and no vocabulary or phrases (both point to missing files in the evaluation)."""
    train = tmp_path / "train"
    run_cli(
        tmp_path,
        "+method=searle",
        "method.oti.steps=2",
        "method.phi.module.max_images=64",
        "method.phi.batch_size=32",
        "method.phi.max_epochs=1",
        f"method.token_dir={tmp_path / 'tokens'}",
        *SMALL,
        run_dir=train,
    )
    trained = results(train)
    assert trained["selection"]["phi"].startswith("best val/")  # synthetic: val is held out from test

    run_cli(tmp_path, "+task=export", f"+run={train}", run_dir=tmp_path / "export")
    phi = train / "reference" / "phi.pt"
    obj = torch.load(phi, weights_only=True)
    assert set(obj) == {"Phi", "epoch"} and set(obj["Phi"]) == PHI_KEYS

    evaluated = tmp_path / "eval"
    proc = run_cli(
        tmp_path,
        "+method=searle",
        f"method.phi.checkpoint={phi}",
        "method.phi.max_epochs=0",
        f"method.concepts.vocabulary={tmp_path / 'absent.csv'}",
        f"method.phrases.file={tmp_path / 'absent.pkl'}",
        f"method.token_dir={tmp_path / 'eval_tokens'}",
        *SMALL,
        run_dir=evaluated,
    )
    again = results(evaluated)
    test = {k: v for k, v in trained["metrics"].items() if k.startswith("test/")}
    assert test and {k: again["metrics"][k] for k in test} == test  # exactly
    assert again["metrics"] == trained["metrics"]
    assert again["selection"] == {"phi": "given checkpoint (no training)"}
    done = json.loads((evaluated / "stages/phi/done.json").read_text())
    assert done["weights_from"]["layout"].startswith("SEARLE phi file")
    assert not (tmp_path / "eval_tokens").exists() and "OTI" not in proc.stdout + proc.stderr
