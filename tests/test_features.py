"""The frozen-feature cache: reused when nothing changed, rebuilt when the backbone, the image
list or the file itself changed."""

import torch
from PIL import Image

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.features import FeatureCache, TextFeatureCache

CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=8, head_width=8),
    text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=2, layers=1),
)


def _images(tmp_path, n=5):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(p)
        paths.append(p)
    return [p.stem for p in paths], paths


def test_cache_hit_miss_and_rebuild(tmp_path, caplog):
    torch.manual_seed(0)
    bb = OpenCLIPBackbone(model_cfg=CFG, name="t")
    names, paths = _images(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(bb, names, paths)
    assert cache.last_hit is False and set(first) == set(names)
    again = cache.get(bb, names, paths)
    assert cache.last_hit is True and all(torch.equal(first[n], again[n]) for n in names)

    cache.get(bb, names[:3], paths[:3])  # another image list: another entry
    assert cache.last_hit is False
    with torch.no_grad():
        bb.model.visual.attnpool.c_proj.bias.add_(1.0)  # changed weights: never the stale features
    changed = cache.get(bb, names, paths)
    assert cache.last_hit is False and not torch.equal(changed[names[0]], first[names[0]])

    files = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(files) == 3
    target = cache.dir / f"{cache.key(bb, names, paths)}.pt"
    target.write_bytes(target.read_bytes()[:100])  # truncated file
    rebuilt = cache.get(bb, names, paths)
    assert cache.last_hit is False and torch.equal(rebuilt[names[1]], changed[names[1]])
    assert "corrupt or foreign" in caplog.text
    assert cache.get(bb, names, paths) and cache.last_hit is True


def test_cache_entry_records_its_key_and_checksum(tmp_path, caplog):
    from cirlab.cache import CacheEntry, checksum

    builds = []

    def build():
        builds.append(1)
        return {"names": ["a"], "features": torch.arange(4.0)}

    entry = CacheEntry(tmp_path / "e.pt", key="k1")
    blob = entry.get(build)
    assert entry.hit is False and blob["key"] == "k1" and blob["checksum"] == checksum(torch.arange(4.0))
    assert torch.equal(entry.get(build)["features"], torch.arange(4.0)) and entry.hit is True

    assert CacheEntry(tmp_path / "e.pt", key="k2").read() == (None, "was made with other settings")
    assert CacheEntry(tmp_path / "e.pt", key="k1").read(valid=lambda b: b["names"] == ["b"])[1] == (
        "holds something else"
    )
    damaged = {**blob, "features": torch.zeros(4)}
    torch.save(damaged, tmp_path / "e.pt")
    assert entry.read()[1] == "fails its checksum (damaged)"
    entry.get(build)
    assert len(builds) == 2 and entry.hit is False and "corrupt or foreign" in caplog.text
    assert entry.read()[0] is not None


# ---- frozen text features ------------------------------------------------------------------------
def _fashioniq_combiner(tmp_path):
    """CLIP4Cir's Combiner on a random tiny CLIP over the FashionIQ fixture layout (random caption
    orders per epoch), fed as the pipeline feeds a stage: cached image features and the text table."""
    import lightning as L
    from fixtures.make_images import materialize

    from cirlab.data.datamodule import CIRDataModule
    from cirlab.data.sources.fashioniq import FashionIQSource
    from cirlab.methods.clip4cir import CLIP4CirCombiner

    torch.manual_seed(0)
    bb = OpenCLIPBackbone(model_cfg=CFG, name="t")
    source = FashionIQSource(materialize("fashioniq", tmp_path / "fiq"))
    dm = CIRDataModule(source, batch_size=4, seed=0)
    names = dm.all_images()
    dm = dm.for_stage(
        4, features=FeatureCache(tmp_path / "cache").get(bb, names, [source.image_path(n) for n in names])
    )
    L.seed_everything(0, verbose=False)
    module = CLIP4CirCombiner(bb, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    module.eval_data = dm
    module.text_table = TextFeatureCache(tmp_path / "cache", batch_size=8).get(
        bb, dm.frozen_texts(("train", "val", "test"), module.text_views)
    )
    return module, dm


def test_text_table_holds_every_caption_order_fashioniq_can_draw(tmp_path):
    module, dm = _fashioniq_combiner(tmp_path)
    ds = dm.train_dataset()
    drawn = set()
    for epoch in range(8):
        ds.epoch = epoch
        drawn |= {ds[i]["text"] for i in range(len(ds))}
    assert len(drawn) > len(ds)  # the orders really vary between epochs
    assert drawn <= module.text_table.keys()
    # each row is the text encoded in the table's sorted batches, whatever batch asks for it
    texts = sorted(drawn)[:5]
    module.train()
    batch = module.text_features(texts[::-1])
    assert all(torch.equal(batch[i], module.text_table[t]) for i, t in enumerate(texts[::-1]))


def test_a_training_text_outside_the_table_is_an_error_not_a_silent_encoding(tmp_path):
    import pytest

    from cirlab.errors import CirlabError

    module, _ = _fashioniq_combiner(tmp_path)
    module.train()
    with pytest.raises(CirlabError, match="not in the stage's text-feature table"):
        module.text_features(["a text no dataset has"])
    module.eval()  # evaluation may see a typed query (cirlab.load().search): encoded, then kept
    assert module.text_features(["a text no dataset has"]).shape == (1, 16)


def test_combiner_resumed_from_epoch_one_equals_two_straight_epochs_with_random_caption_orders(tmp_path):
    """The text table is the same floats in a fresh process-state, so a resume reads what the
    uninterrupted run read (a memo filled batch by batch would not be)."""
    import lightning as L

    from cirlab.pipeline import BatchSeed

    def trainer(epochs, root):  # BatchSeed: the dropout masks follow (seed, step), as in cirlab runs
        return L.Trainer(
            callbacks=[BatchSeed(0)],
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(root),
        )

    module, dm = _fashioniq_combiner(tmp_path)
    trainer(2, tmp_path / "straight").fit(module, train_dataloaders=dm.train_dataloader())
    straight = module.combiner.state_dict()

    module, dm = _fashioniq_combiner(tmp_path)
    first = trainer(1, tmp_path / "first")
    first.fit(module, train_dataloaders=dm.train_dataloader())
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    module, dm = _fashioniq_combiner(tmp_path)  # a new process's state: the table read from the cache
    trainer(2, tmp_path / "resumed").fit(
        module, train_dataloaders=dm.train_dataloader(), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    for key, value in module.combiner.state_dict().items():
        assert torch.equal(value, straight[key]), key


def test_encoding_leaves_every_submodule_in_its_own_mode():
    """A BLIP sits in eval mode inside its train-mode wrapper; encoding the cache must not switch its
    dropout on (a cold and a warm cache then trained BLIP4CIR+Bi stage I differently)."""
    from cirlab.data.features import evaluating

    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    outer[1].eval()
    with evaluating(outer):
        assert not any(m.training for m in outer.modules())
    assert outer.training and outer[0].training and not outer[1].training and not outer[1][0].training


def test_text_cache_read_only_lookup_never_encodes(tmp_path):
    """`cirlab.load` reads a run's text table when it is there and never encodes a dataset's texts."""
    torch.manual_seed(0)
    bb = OpenCLIPBackbone(model_cfg=CFG, name="t")
    cache = TextFeatureCache(tmp_path / "cache", batch_size=2)
    texts = ["a red circle", "a blue square", "a red circle"]
    assert cache.cached(bb, texts) is None and not (tmp_path / "cache").exists()
    built = cache.get(bb, texts)
    read = cache.cached(bb, list(reversed(texts)))  # the same set: the same entry
    assert read.keys() == built.keys() == {"a red circle", "a blue square"}
    assert all(torch.equal(read[t], built[t]) for t in built)
