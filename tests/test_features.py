"""The frozen-feature cache: reused when nothing changed, rebuilt when the backbone, the image
list or the file itself changed."""

import torch
from PIL import Image

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.features import FeatureCache

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
