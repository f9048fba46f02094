"""SEARLE: pseudo-token injection, concepts/phrases, OTI, phi, distillation loss, resumable OTI, CLI run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import CACHE, ROOT, results, run_cli
from omegaconf import OmegaConf

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.sources.jsonl import JsonlSource
from cirlab.data.sources.synthetic import SyntheticSource
from cirlab.errors import CirlabError
from cirlab.methods import searle_text as st
from cirlab.methods.searle_oti import oti
from cirlab.methods.searle_phi import Phi, distillation_loss
from cirlab.methods.searle_text import SearleText
from cirlab.methods.searle_tokens import OTIStore

TINY = OmegaConf.load(ROOT / "conf/backbone/tiny.yaml").model
OTI = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/searle_oti.yaml").oti)


def tiny_random() -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return OpenCLIPBackbone(model_cfg=OmegaConf.to_container(TINY.model_cfg), name="tiny").eval()


def capture_transformer_input(backbone, fn):
    seen = {}

    def hook(mod, args, kwargs):
        seen.setdefault("x", args[0].detach().clone())

    handle = backbone.model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return seen["x"], out


def test_pseudo_token_replaces_only_the_first_placeholder_embedding():
    b = tiny_random()
    texts = ["a photo of $ that has $ on the left", "$ red circle"]
    tokens = b.tokenize(texts)
    ph = b.placeholder_token_id
    assert ph == 259  # CLIP's BPE: '$' is a single byte-level token
    pseudo = torch.randn(2, b.token_dim)
    x_ref, _ = capture_transformer_input(b, lambda: b.encode_text(tokens))
    x_new, _ = capture_transformer_input(b, lambda: b.encode_text_with_pseudo_tokens(tokens, pseudo))
    n = x_new.shape[1]  # padding after the last EOT is cut (causal mask): compare the kept prefix
    assert n == int(tokens.argmax(-1).max()) + 1
    diff = (x_new - x_ref[:, :n]).abs().sum(-1)
    first = [row.tolist().index(ph) for row in tokens]
    assert first == [4, 1]
    for r in range(2):
        changed = torch.nonzero(diff[r] > 1e-6).flatten().tolist()
        assert changed == [first[r]], (r, changed)  # the second '$' of row 0 keeps the literal embedding
        pos = b.model.positional_embedding[first[r]]
        assert torch.allclose(x_new[r, first[r]], pseudo[r] + pos, atol=1e-6)
        assert torch.allclose(x_ref[r, first[r]], b.model.token_embedding.weight[ph] + pos, atol=1e-6)


def changed_positions(b, tokens, pseudo, **kw) -> list[list[int]]:
    x_ref, _ = capture_transformer_input(b, lambda: b.encode_text(tokens))
    x_new, _ = capture_transformer_input(b, lambda: b.encode_text_with_pseudo_tokens(tokens, pseudo, **kw))
    diff = (x_new - x_ref[:, : x_new.shape[1]]).abs().sum(-1)
    return [torch.nonzero(d > 1e-6).flatten().tolist() for d in diff]


def test_fill_all_puts_the_row_token_at_every_placeholder():
    """LinCIR: every `$` of a row gets that row's token."""
    b = tiny_random()
    tokens = b.tokenize(["$ of $ parked on $", "a photo of $"])
    pseudo = torch.randn(2, b.token_dim)
    assert changed_positions(b, tokens, pseudo, fill="all") == [[1, 3, 6], [4]]
    assert changed_positions(b, tokens, pseudo) == [[1], [4]]


def test_k_tokens_per_row_fill_that_rows_placeholders_in_order():
    """FTI4CIR: subject + r attribute tokens; each row's own placeholder positions (rows differ), the k-th
    placeholder gets token k, placeholders past K keep the literal `*`, tokens past the row's are unused."""
    b = tiny_random()
    tokens = b.tokenize(["a photo of * with * * but red", "a red circle with * * * *", "* *"])
    pseudo = torch.randn(3, 3, b.token_dim)
    assert changed_positions(b, tokens, pseudo, placeholder="*") == [[4, 6, 7], [5, 6, 7], [1, 2]]
    x_new, _ = capture_transformer_input(b, lambda: b.encode_text_with_pseudo_tokens(tokens, pseudo, "*"))
    pos = b.model.positional_embedding
    assert torch.allclose(x_new[0, 7], pseudo[0, 2] + pos[7], atol=1e-6)
    assert torch.allclose(x_new[1, 5], pseudo[1, 0] + pos[5], atol=1e-6)
    assert torch.allclose(x_new[2, 2], pseudo[2, 1] + pos[2], atol=1e-6)


def test_pseudo_token_equal_to_dollar_embedding_gives_encode_text():
    b = tiny_random()
    tokens = b.tokenize(["a photo of $ that has a blue square", "$", "we see a $ in this image"])
    dollar = b.model.token_embedding.weight[b.placeholder_token_id]
    with torch.no_grad():
        out = b.encode_text_with_pseudo_tokens(tokens, dollar)  # one token broadcast to every row
        assert torch.allclose(out, b.encode_text(tokens), atol=1e-5)


def test_pseudo_token_encoding_on_vit_b32_random_init():
    b = OpenCLIPBackbone(model_name="ViT-B-32", pretrained=None).eval()
    assert b.token_dim == 512 and b.placeholder_token_id == 259
    tokens = b.tokenize(["a photo of $ that is red", "$ photo"])
    dollar = b.model.token_embedding.weight[259]
    with torch.no_grad():
        assert torch.allclose(
            b.encode_text_with_pseudo_tokens(tokens, dollar.expand(2, -1)), b.encode_text(tokens), atol=1e-4
        )
    v = torch.randn(2, 512, requires_grad=True)
    b.encode_text_with_pseudo_tokens(tokens, v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_prompt_without_placeholder_is_an_error():
    b = tiny_random()
    with pytest.raises(CirlabError, match="placeholder"):
        b.encode_text_with_pseudo_tokens(b.tokenize(["no placeholder here"]), torch.zeros(1, b.token_dim))


def test_phi_layers_and_output_shape():
    phi = Phi(128, 512, 64, dropout=0.5)
    assert sorted(phi.state_dict()) == [f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("bias", "weight")]
    assert phi(torch.randn(5, 128)).shape == (5, 64)


def test_distillation_loss_hand_computed_2x2():
    v1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v2 = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # scale must not matter (cosine)
    e4 = math.exp(1 / 0.25)
    # rows: v1_0 pos e^4 / (1 + 2e^4); v1_1 pos 1 / 3; v2_0 pos e^4 / (1 + 2e^4); v2_1 pos 1 / (1 + 2e^4)
    expected = -(2 * math.log(e4 / (1 + 2 * e4)) + math.log(1 / 3) + math.log(1 / (1 + 2 * e4))) / 4
    assert distillation_loss(v1, v2, 0.25).item() == pytest.approx(expected, rel=1e-5)


def test_template_phrases_contain_their_concept_and_filter():
    phrases = st.template_phrases(["red circle", "blue square"], per_concept=5)
    assert all(
        len(v) == 5 and all(p.startswith(f"a photo of {c} that ") for p in v) for c, v in phrases.items()
    )
    phrases["odd"] = ["a photo of odd that x", "nothing here"]
    assert st.usable_concepts(phrases) == {"red circle", "blue square"}
    assert st.clean_phrase("a photo of x that\n\nis..  big") == "a photo of x that. is.  big"


def test_lm_phrases_with_a_local_tiny_gpt2():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "a", "photo", "of", "red", "circle", "that", "is", "big", "on", "the", "left"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(words),
            n_positions=64,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw) or generate(**kw)
    out = st.lm_phrases(model, hf_tok, ["red circle"], num_return_sequences=8)
    assert {k: calls[0][k] for k in st.LM_SETTINGS} == {**st.LM_SETTINGS, "num_return_sequences": 8}
    assert st.LM_SETTINGS == dict(
        do_sample=True, max_length=35, num_return_sequences=256, temperature=0.5, no_repeat_ngram_size=2
    )  # the reference's generate() arguments
    assert list(out) == ["red circle"] and len(out["red circle"]) == 8
    for p in out["red circle"]:
        assert p.startswith("a photo of red circle that")  # the decoded text keeps the prompt
        assert len(p.split()) <= 35
    assert any(len(p.split()) > 6 for p in out["red circle"])  # something was generated
    assert st.usable_concepts(out) == {"red circle"}


def test_phrases_file_is_read_and_checked(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"red circle": ["a photo of red circle that is big"]}))
    assert st.load_phrases(f) == {"red circle": ["a photo of red circle that is big"]}
    f.write_text("[1, 2]")
    with pytest.raises(CirlabError, match="must map"):
        st.load_phrases(f)


@pytest.fixture(scope="module")
def pretrained_tiny_backbone():
    from cirlab.pretrain import pretrained_tiny

    return pretrained_tiny(
        str(CACHE), OmegaConf.to_container(TINY.model_cfg), OmegaConf.to_container(TINY.pretrain)
    ).eval()


@pytest.fixture(scope="module")
def synthetic_images(synthetic_root):
    rows = [json.loads(line) for line in (synthetic_root / "captions.jsonl").read_text().splitlines()[:64]]
    return synthetic_root, rows


def image_features(backbone, root: Path, rows) -> torch.Tensor:
    from cirlab.data.features import encode_images

    return encode_images(backbone, [root / r["image"] for r in rows])


def test_concept_association_finds_objects_of_the_image(pretrained_tiny_backbone, synthetic_images):
    root, rows = synthetic_images
    b = pretrained_tiny_backbone
    vocab = st.default_vocabulary(JsonlSource(root))
    assert len(vocab) == 24 and "red circle" in vocab
    emb = st.concept_embeddings(b, vocab)
    top = st.associate(image_features(b, root, rows), emb, top_k=3)
    hits = [any(vocab[i] in r["captions"][0] for i in top[k].tolist()) for k, r in enumerate(rows)]
    assert sum(hits) / len(hits) >= 0.7, sum(hits)


def test_synthetic_vocabulary_without_its_file_comes_from_the_spec(synthetic_root, tmp_path):
    (tmp_path / "spec.json").write_text((synthetic_root / "spec.json").read_text())
    assert JsonlSource(tmp_path).concept_vocabulary() is None
    assert SyntheticSource(tmp_path).concept_vocabulary() == JsonlSource(synthetic_root).concept_vocabulary()
    with pytest.raises(CirlabError, match="ships no concept vocabulary"):
        st.default_vocabulary(JsonlSource(tmp_path))


def searle_text(backbone, tmp_path, vocab=("red circle", "blue square", "green triangle", "yellow cross")):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return SearleText(backbone, None, {"vocabulary": str(path)}, {"generator": "template", "per_concept": 8})


def test_oti_lowers_its_loss_on_a_fixed_image(pretrained_tiny_backbone, synthetic_images, tmp_path):
    root, rows = synthetic_images
    b = pretrained_tiny_backbone
    text = searle_text(b, tmp_path)
    feats = image_features(b, root, rows[:1])
    tokens, ema, losses = oti(b, text, feats, {**OTI, "steps": 40, "top_k": 2})
    assert tokens.shape == ema.shape == (1, b.token_dim)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert not torch.equal(tokens, ema)  # EMA lags behind the raw token


def test_oti_resumes_without_redoing_finished_images(pretrained_tiny_backbone, synthetic_images, tmp_path):
    root, rows = synthetic_images
    b = pretrained_tiny_backbone
    text = searle_text(b, tmp_path)
    names = [r["image"] for r in rows[:8]]
    feats = image_features(b, root, rows[:8])
    seen: list[torch.Tensor] = []

    def invert(x):
        seen.append(x.clone())
        tok, ema, _ = oti(b, text, x, {**OTI, "steps": 3, "top_k": 2})
        return tok, ema

    path = tmp_path / "tokens.pt"
    first = OTIStore(path, "k").compute(names[:4], feats[:4], invert, chunk=2, save_every=2)
    assert [len(x) for x in seen] == [2, 2]
    seen.clear()
    store = OTIStore(path, "k")  # a new process: only the file carries over
    assert store.names == names[:4]
    everything = store.compute(names, feats, invert, chunk=2, save_every=2)
    assert torch.equal(torch.cat(seen), feats[4:])  # only the second half was optimised
    assert torch.equal(everything[:4], first)  # the first half's tokens were loaded, not recomputed
    assert OTIStore(path, "k").names == names

    # a run killed after its first chunk keeps what it saved
    killed = tmp_path / "killed.pt"
    calls = []

    def dies_on_second_chunk(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return invert(x)

    with pytest.raises(KeyboardInterrupt):
        OTIStore(killed, "k").compute(names, feats, dies_on_second_chunk, chunk=2, save_every=2)
    seen.clear()
    OTIStore(killed, "k").compute(names, feats, invert, chunk=2, save_every=2)
    assert torch.equal(torch.cat(seen), feats[2:])
    with pytest.raises(CirlabError, match="other settings"):
        OTIStore(killed, "another key")


@pytest.mark.slow
def test_searle_and_searle_oti_beat_single_modality_zero_shot(tmp_path, shared_run):
    """The bar: both variants >= 3 points R@10 over image-only and text-only on the held-out test
    split, zero-shot (no triplet is used). Measured: image 21.50, text 13.50, SEARLE-OTI 28.25, SEARLE 26.00."""

    def r10(*args):
        name = re.sub(r"\W+", "_", "_".join(args))[:60]
        run_cli(tmp_path, *args, run_dir=tmp_path / name)
        return results(tmp_path / name)["metrics"]["test/recall_at_10"]

    image, text = (
        results(shared_run("+method=zeroshot", f"method.fusion={f}"))["metrics"]["test/recall_at_10"]
        for f in ("image", "text")
    )
    tokens = f"method.token_dir={tmp_path / 'tokens'}"
    searle_oti = r10(
        "+method=searle_oti",
        tokens,
        "method.oti.steps=100",
        "method.oti.ema_decay=0.95",
        "method.oti.batch_size=256",
    )
    searle = r10("+experiment=searle_synthetic", tokens)  # the README's SEARLE row
    print(f"test R@10: image-only {image}, text-only {text}, SEARLE-OTI {searle_oti}, SEARLE {searle}")
    assert searle_oti >= max(image, text) + 3
    assert searle >= max(image, text) + 3


def test_fashioniq_queries_average_both_caption_orders():
    """SEARLE's FashionIQ rule: strip '.?, ', join the two captions in both orders, average the two
    normalised prompt features and renormalise (not CLIP4Cir's capitalised single order)."""
    from cirlab.data.records import CIRQuery
    from cirlab.data.sources.base import CIRSource
    from cirlab.data.sources.fashioniq import FashionIQSource
    from cirlab.methods.searle import SearleOTI

    b = tiny_random()
    module = SearleOTI(b)
    query = CIRQuery("dress/0", "ref", ("is red.", " has long sleeves?"), ("tgt",))
    assert FashionIQSource.query_texts(None, query) == [
        "is red and has long sleeves",
        "has long sleeves and is red",
    ]
    assert CIRSource().query_texts(query) == ["is red."]

    token = torch.randn(1, b.token_dim)
    one = [
        module.encode_queries(token, [[t]])
        for t in ("is red and has long sleeves", "has long sleeves and is red")
    ]
    both = module.encode_queries(token, [["is red and has long sleeves", "has long sleeves and is red"]])
    expected = torch.nn.functional.normalize(one[0] + one[1], dim=-1)
    assert torch.allclose(both, expected, atol=1e-6)
    assert not torch.allclose(both, one[0], atol=1e-3)  # the order matters to the encoder: both count


def _jpegs(folder: Path, names: list[str]) -> None:
    from PIL import Image

    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i * 7 % 255, 80, 160)).save(folder / name, format="JPEG")


def test_imagenet_folder_source(tmp_path):
    from cirlab.data.sources.imagefolder import ImageFolderSource

    root = tmp_path / "ImageNet1K"
    _jpegs(root / "test", ["ILSVRC2012_test_00000002.JPEG", "n01/ILSVRC2012_test_00000001.JPEG"])
    (root / "test" / "notes.txt").write_text("not an image")
    (root / "test" / "small.jpg").write_bytes(b"")  # the reference globs *.JPEG only
    src = ImageFolderSource(root)
    assert src.unlabeled_images() == ["ILSVRC2012_test_00000002.JPEG", "n01/ILSVRC2012_test_00000001.JPEG"]
    assert src.image_path("n01/ILSVRC2012_test_00000001.JPEG").is_file()
    with pytest.raises(CirlabError, match=r"without CIR queries: .*\+dataset@method.unlabeled=imagenet"):
        src.eval_sets("val")
    with pytest.raises(
        CirlabError, match=r"test images folder not found.*\n.*Expected layout(.|\n)*ILSVRC2012"
    ):
        ImageFolderSource(tmp_path / "nowhere").unlabeled_images()
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(CirlabError, match="no .JPEG images under"):
        ImageFolderSource(tmp_path / "empty").unlabeled_images()


def test_phi_trains_on_an_imagenet_folder(tmp_path, synthetic_root):
    """+dataset@method.unlabeled=imagenet: phi's OTI targets and features come from the folder's images,
    evaluation from the CIR dataset (sanity check on, as trainer=gpu); dataset=imagenet alone says how
    to use it."""
    root = tmp_path / "ImageNet1K"
    from PIL import Image

    for i, png in enumerate(sorted((synthetic_root / "images").iterdir())[:40]):
        (root / "test" / f"n{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(root / "test" / f"n{i % 2}" / f"ILSVRC2012_test_{i:08d}.JPEG")
    run = tmp_path / "run"
    proc = run_cli(
        tmp_path,
        "+method=searle",
        "+dataset@method.unlabeled=imagenet",
        f"method.unlabeled.root={root}",
        f"method.token_dir={tmp_path / 'tokens'}",
        "method.oti.steps=3",
        "method.phi.batch_size=16",
        "method.phi.max_epochs=1",
        "trainer.num_sanity_val_steps=2",
        run_dir=run,
    )
    assert "OTI targets for 40 unlabeled images" in proc.stdout + proc.stderr
    assert [p.name.split("-")[0] for p in (tmp_path / "tokens").iterdir()] == ["imagenet"]
    assert "test/recall_at_10" in results(run)["metrics"]

    proc = run_cli(tmp_path, "+method=zeroshot", "dataset=imagenet", f"dataset.root={root}", check=False)
    assert proc.returncode == 2
    assert "without CIR queries" in proc.stderr and "+dataset@method.unlabeled=imagenet" in proc.stderr


def test_phi_token_norm_option():
    """token_norm=null is the reference (phi's raw output); a number or `oti` keeps phi's direction and
    fixes the norm (the distillation loss sees only directions)."""
    from cirlab.methods.searle import Searle

    b = tiny_random()
    x = torch.randn(3, b.embed_dim)
    raw = Searle(b, dropout=0.0).eval()
    assert torch.equal(raw.tokens(x), raw.phi(x))
    fixed = Searle(b, dropout=0.0, token_norm=2.0).eval()
    fixed.phi.load_state_dict(raw.phi.state_dict())
    out = fixed.tokens(x)
    assert torch.allclose(out.norm(dim=-1), torch.full((3,), 2.0))
    assert torch.allclose(torch.nn.functional.cosine_similarity(out, raw.phi(x)), torch.ones(3), atol=1e-6)
    assert "target_norm" in fixed.state_dict()  # `oti`'s measured norm travels with the checkpoint
    with pytest.raises(CirlabError, match="token_norm"):
        Searle(b, token_norm="mean")
