"""FTI4CIR against the authors' code: their pickled IMG2TEXT (tests/golden/fti4cir/model.pth, made by
tools/golden/fti4cir.py with their src/) is read as data by cirlab.methods.fti4cir_release and gives their
outputs in cirlab's IMG2TEXT; a file that names anything else is refused without running it."""

from __future__ import annotations

import os
import pickle
import re
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from cirlab.errors import CirlabError
from cirlab.methods.fti4cir_net import IMG2TEXT, orthogonality_loss, regularisation_loss
from cirlab.methods.fti4cir_release import IMG2TEXT_FILE, WHAT, read_released_img2text, released_layout, sniff
from cirlab.methods.searle_phi import distillation_loss
from cirlab.weights import load_strict, load_weights

GOLDEN = Path(__file__).parent / "golden" / "fti4cir"
SETTINGS = {"num_k": 6, "topk": 4, "epsilon": 0.05, "temperature": 0.2, "hy_regLoss": 1.4}


def golden_net() -> IMG2TEXT:
    return IMG2TEXT(16, 24, 16, num_k=6, topk=4, epsilon=0.05, n_layers=2, n_heads=2).eval()


@pytest.fixture(scope="module")
def outputs() -> dict:
    return torch.load(GOLDEN / "outputs.pt", weights_only=True)


def test_released_file_gives_the_authors_outputs(outputs):
    net = golden_net()
    load_strict(net, read_released_img2text(GOLDEN / "model.pth"), "golden model.pth")
    g, patches = outputs["global_features"], outputs["patch_features"]
    with torch.no_grad():
        out = net(g, patches)
        assert torch.allclose(net.latent(patches), outputs["latent"], atol=1e-5)
    assert out.r.tolist() == outputs["r"].tolist() and len(set(out.r.tolist())) >= 3
    for name in ("subject", "attributes", "local"):
        assert torch.allclose(getattr(out, name), outputs[name], atol=1e-5), name
    for got, want in (
        (orthogonality_loss(out.local), "orthogonal_loss"),
        (orthogonality_loss(patches[:, :5]), "orthogonal_loss_raw"),
        (distillation_loss(g, outputs["second_view"], 0.2), "contrastive_loss"),
        (regularisation_loss(*outputs["texts"]), "regularisation_loss"),
    ):
        assert torch.allclose(got, outputs[want], atol=1e-5), want


def test_released_file_through_the_checkpoint_layouts(tmp_path):
    layouts = [released_layout(SETTINGS), IMG2TEXT_FILE.layout()]
    net = golden_net()
    assert load_weights(net, GOLDEN / "model.pth", layouts, "method.img2text.checkpoint") == WHAT
    assert sniff(GOLDEN / "model.pth").settings == SETTINGS
    exported = tmp_path / "img2text.pt"  # cirlab's export: {'epoch', 'IMG2TEXT': state dict}
    torch.save(IMG2TEXT_FILE.write(net.state_dict(), 3), exported)
    assert sniff(exported) is None
    again = golden_net()
    assert load_weights(again, exported, layouts, "method.img2text.checkpoint") == IMG2TEXT_FILE.name
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CirlabError, match=r"other settings: topk=4 \(the run has 12\)"):
        load_weights(golden_net(), GOLDEN / "model.pth", [released_layout({**SETTINGS, "topk": 12})], "x")


@pytest.fixture
def authors_modules(tmp_path, monkeypatch):
    """Importable `i2t_model` and `MHTransformer` whose classes carry the authors' names, and a function
    that turns a cirlab IMG2TEXT into an object of those classes, as their train.py pickles it."""
    (tmp_path / "MHTransformer.py").write_text(
        textwrap.dedent(
            """
            from cirlab.methods import fti4cir_net as n
            class Transformer(n.Transformer): pass
            class TransformerLayer(n.Layer): pass
            class MultiHeadAttention(n.Attention): pass
            class MlpTransformer(n.Mlp): pass
            """
        )
    )
    (tmp_path / "i2t_model.py").write_text(
        textwrap.dedent(
            """
            import os
            from cirlab.methods import fti4cir_net, searle_phi
            class IMG2TEXT(fti4cir_net.IMG2TEXT): pass
            class Phi(searle_phi.Phi): pass
            class Evil:
                def __init__(self, call): self.call = call
                def __reduce__(self): return self.call
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("i2t_model", "MHTransformer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import i2t_model
    import MHTransformer

    from cirlab.methods import fti4cir_net as n
    from cirlab.methods import searle_phi

    names = {
        n.IMG2TEXT: i2t_model.IMG2TEXT,
        searle_phi.Phi: i2t_model.Phi,
        n.Transformer: MHTransformer.Transformer,
        n.Layer: MHTransformer.TransformerLayer,
        n.Attention: MHTransformer.MultiHeadAttention,
        n.Mlp: MHTransformer.MlpTransformer,
    }

    def as_authors(net: IMG2TEXT) -> IMG2TEXT:
        for module in net.modules():
            module.__class__ = names.get(type(module), type(module))
            if isinstance(module, MHTransformer.MlpTransformer):
                module.act = torch.nn.functional.relu  # a function attribute, as theirs
        net.temperature, net.hy_regLoss = 0.2, 1.4
        net.cosine_criterion, net.ortho_loss = torch.nn.CosineEmbeddingLoss(), torch.nn.MSELoss()
        net.criterion_target = torch.as_tensor([1])
        return net

    yield i2t_model, as_authors
    for name in ("i2t_model", "MHTransformer"):
        sys.modules.pop(name, None)


def test_a_pickle_of_the_authors_classes_loads(authors_modules, tmp_path):
    _, as_authors = authors_modules
    torch.manual_seed(0)
    net = IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=2)
    want = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(as_authors(net), tmp_path / "model.pth")
    released = sniff(tmp_path / "model.pth")
    assert released.settings == {
        "num_k": 5,
        "topk": 3,
        "epsilon": 0.05,
        "temperature": 0.2,
        "hy_regLoss": 1.4,
    }
    assert list(released.state) == list(want)
    assert all(torch.equal(released.state[k], v) for k, v in want.items())


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda sentinel: (os.system, (f"touch {sentinel}",)), "posix.system"),
        (lambda sentinel: (eval, (f"open({str(sentinel)!r}, 'w')",)), "__builtin__.eval"),
        (lambda sentinel: (Path.touch, (sentinel,)), "__builtin__.getattr"),  # getattr(Path, 'touch')
    ],
    ids=["os.system", "builtins.eval", "getattr"],
)
def test_a_file_that_would_run_code_is_refused_unrun(authors_modules, tmp_path, call, named):
    i2t_model, as_authors = authors_modules
    sentinel = tmp_path / "ran"
    net = as_authors(IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=1))
    net.payload = i2t_model.Evil(call(sentinel))
    torch.save(net, tmp_path / "model.pth")
    assert not sentinel.exists()
    with pytest.raises(CirlabError, match=f"refused: .* but it references {re.escape(named)},"):
        read_released_img2text(tmp_path / "model.pth")
    with pytest.raises(CirlabError, match="Nothing of the file was run"):
        load_weights(net, tmp_path / "model.pth", [released_layout(SETTINGS)], "method.img2text.checkpoint")
    assert not sentinel.exists()


def test_unknown_globals_and_damaged_files_are_refused(authors_modules, tmp_path):
    _, as_authors = authors_modules
    net = as_authors(IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=1))
    net.phi_s.layers[0] = torch.nn.Conv1d(1, 1, 1)  # a layer such a file never holds
    torch.save(net, tmp_path / "conv.pth")
    with pytest.raises(CirlabError, match=r"references torch\.nn\.modules\.conv\.Conv1d"):
        read_released_img2text(tmp_path / "conv.pth")

    loop = as_authors(IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=1))
    loop.phi_s.back = loop
    torch.save(loop, tmp_path / "loop.pth")
    with pytest.raises(CirlabError, match="nest without end"):
        read_released_img2text(tmp_path / "loop.pth")

    good = as_authors(IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=1))
    torch.save(good, tmp_path / "good.pth")
    with zipfile.ZipFile(tmp_path / "good.pth") as src, zipfile.ZipFile(tmp_path / "cut.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-4] if item.filename.endswith("data/0") else data)
    with pytest.raises(CirlabError, match=r"storage '0' holds \d+ bytes"):
        read_released_img2text(tmp_path / "cut.pth")

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"templates": [1.0]}))
    with pytest.raises(CirlabError, match="is not FTI4CIR's released model"):
        read_released_img2text(tmp_path / "plain.pkl")
