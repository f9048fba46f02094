"""Python API over a finished run: `cirlab.load(run_dir_or_ckpt)` -> a `Retriever`.

    import cirlab
    r = cirlab.load("outputs/runs/2026-..._clip4cir-synthetic-tiny")
    r.index(sorted(Path("gallery").glob("*.png")))
    r.search("reference.png", "has a red circle on the left", k=10)  # [(path, score), ...]

The run's `.hydra/config.yaml` rebuilds the backbone and the final stage's module (Hydra
instantiate) as the pipeline started it, the run folder read as data: a `_target_` other than cirlab's
own, torch.optim's and Lightning's Trainer is refused (cirlab/trusted.py); weights come from the best checkpoints listed in
`stages/<stage>/done.json` (the backbone from the latest stage that trained, the module from the final
stage) or the stage's weights file. This is evaluation's path: images of the run's dataset take the
features the run cached (other images are encoded and cached by backbone weights, preprocessing and
file list), queries are embedded by the module's `query_embedding` and ranked by
`cirlab.retrieval.search`, so a test query's top-k is its row of the run's predictions.test.json.
Console: `cirlab-query --run RUN --gallery DIR --image IMG --text "..." -k 10` (no --image for a
cross-modal run).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from cirlab.errors import CirlabError, user_cause


def _run_and_stage(path: Path) -> tuple[Path, str | None, Path | None]:
    """(run folder, stage name or None = final, checkpoint or None) from a run folder or a .ckpt."""
    if path.is_file() and path.suffix == ".ckpt":
        # <run>/stages/<stage>/checkpoints/<name>.ckpt (a short relative path: its absolute parents)
        full = path if len(path.parts) >= 5 else path.absolute()
        if len(full.parts) < 5 or full.parent.name != "checkpoints" or full.parents[2].name != "stages":
            raise CirlabError(
                f"{path} is not inside <run>/stages/<stage>/checkpoints/: give the run folder instead"
            )
        return full.parents[3], full.parents[1].name, path
    if path.is_dir():
        return path, None, None
    raise CirlabError(f"{path} is neither a run folder nor a checkpoint file")


def _checkpoint_of(run_dir: Path, stage: str) -> Path | None:
    from cirlab.io import read_json

    done = run_dir / "stages" / stage / "done.json"
    if not done.is_file():
        return None
    best = read_json(done).get("best_checkpoint")
    if not best:
        return None
    best = Path(best)
    if not best.is_file():  # the run folder was moved: same layout under the new location
        moved = run_dir / "stages" / stage / "checkpoints" / best.name
        if not moved.is_file():
            raise CirlabError(f"stage {stage}: checkpoint {best} listed in {done} is missing")
        best = moved
    return best


class Retriever:
    """A trained CIR model with an indexed gallery. Images of the run's dataset take the features the run
    cached (the bits evaluation used) and queries rank with `cirlab.retrieval.search.search`, the ranking of
    evaluation: a dataset query's top-k is its row of the run's predictions.<split>.json."""

    def __init__(self, module, cfg, run_dir: Path | None = None, stage: str | None = None, data=None):
        self.module, self.cfg, self.run_dir, self.stage = module, cfg, run_dir, stage
        self.module.eval()
        self.backbone = module.backbone
        self.data = data  # the run's datamodule (None: its dataset is not on this machine)
        self.paths: list[Path] = []
        self.gallery: torch.Tensor | None = None  # [N, D] gallery embeddings
        self._row: dict[Path, int] = {}  # resolved gallery path -> row
        self._known: dict[Path, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _run_features(self) -> dict[Path, torch.Tensor]:
        """resolved path -> the run's cached raw features, for the images of its dataset."""
        if self._known is None:
            features = getattr(self.data, "features", None) or {}
            self._known = {Path(self.data.source.image_path(n)).resolve(): f for n, f in features.items()}
        return self._known

    @torch.no_grad()
    def raw_features(self, paths: Sequence[Path], cache: bool = True) -> torch.Tensor:
        """Raw image features of `paths` by the module's feature encoder: the run's own for its dataset's
        images, the others encoded (through the feature cache when `cache` and the run has one)."""
        from cirlab.data.features import FeatureCache, encode_images

        encoder = self.module.feature_encoder()
        paths = [Path(p).resolve() for p in paths]
        known = self._run_features()
        new = [p for p in paths if p not in known]
        encoded: dict[Path, torch.Tensor] = {}
        if new:
            cache_dir = self.cfg.paths.get("cache_dir") if self.cfg is not None else None
            if cache and cache_dir:
                feats = FeatureCache(cache_dir, batch_size=self.cfg.eval.batch_size).get(
                    encoder, [str(p) for p in new], new
                )
                encoded = {p: feats[str(p)] for p in new}
            else:
                encoded = dict(zip(new, encode_images(encoder, new)))
        return torch.stack([known[p] if p in known else encoded[p] for p in paths])

    def _batch_size(self) -> int:
        return self.cfg.eval.batch_size if self.cfg is not None else 256

    @torch.no_grad()
    def index(self, gallery_paths: Sequence[str | Path]) -> Retriever:
        """Embed the gallery images, in evaluation's batches (new images are cached on disk by backbone
        weights + file list)."""
        paths = [Path(p) for p in gallery_paths]
        if not paths:
            raise CirlabError("index() needs at least one gallery image")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise CirlabError(f"{len(missing)} gallery images do not exist, e.g. {missing[0]}")
        raw = self.raw_features(paths)
        self.gallery = torch.cat(
            [
                self.module.gallery_embedding(chunk.to(self.device)).float().cpu()
                for chunk in raw.split(self._batch_size())
            ]
        )
        self.paths = paths
        self._row = {p.resolve(): i for i, p in enumerate(paths)}
        return self

    @torch.no_grad()
    def embed_query(self, reference_image: str | Path | None, text: str | Sequence[str]) -> torch.Tensor:
        """The query embedding of evaluation [1, D] (the run's caption view of the text); methods whose
        queries are texts alone (cross-modal) take no reference image. `text` as a list: a query of the
        run's dataset by its raw captions (FashionIQ's two), composed by the dataset's rule as evaluation
        composes it (SEARLE: both caption orders averaged)."""
        ref = None
        if self.module.query_has_image:
            if reference_image is None:
                raise CirlabError(f"{type(self.module).__name__} needs a reference image with the text")
            ref_path = Path(reference_image)
            if not ref_path.is_file():
                raise CirlabError(f"reference image {ref_path} does not exist")
            ref = self.raw_features([ref_path], cache=False).to(self.device)
        if not isinstance(text, str):
            from cirlab.data.records import CIRQuery

            if self.module.eval_data is None:
                raise CirlabError("a query given by its captions needs the run's dataset on this machine")
            query = CIRQuery(qid="query", reference=str(reference_image), captions=tuple(text))
            return self.module.dataset_query_embedding(ref, query).float().cpu()
        view = self.module.text_views.get("text")  # e.g. BLIP4CIR+Bi's forward marker, as at evaluation
        return self.module.query_embedding(ref, [view(text) if view else text]).float().cpu()

    def search(
        self,
        reference_image: str | Path | None,
        text: str | Sequence[str],
        k: int = 10,
        exclude_reference: bool = True,
    ) -> list[tuple[Path, float]]:
        """Top-k (gallery path, score) for reference image + modification text (cross-modal runs: the text
        alone, reference_image=None). The reference itself is left out of the ranking if it is in the
        gallery (as the benchmarks do), unless exclude_reference=False."""
        from cirlab.retrieval.search import search

        if self.gallery is None:
            raise CirlabError("call index(gallery_paths) before search()")
        query = self.embed_query(reference_image, text)
        exclude = None
        if exclude_reference and reference_image is not None and self.module.query_has_image:
            row = self._row.get(Path(reference_image).resolve())
            exclude = None if row is None else torch.tensor([row])
        scores, rows = search(
            query,
            self.gallery,
            k,
            exclude=exclude,
            backend=self.module.search_backend,
            **self.module.search_options,
        )
        return [(self.paths[i], s) for s, i in zip(scores[0].tolist(), rows[0].tolist())]


def data_kind(cfg) -> str:
    """ "cir" or "captions": the kind of data the run's dataset config serves (its datamodule's `kind`)."""
    from hydra.utils import get_class

    return get_class(cfg.dataset.datamodule._target_).kind


def build_source(cfg):
    """The run's dataset source as the pipeline built it (its config rebuilds it, unreadable images left
    out under dataset.missing_images=skip); CirlabError when its data is not here."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from cirlab.data.sources.readable import ReadableOnly

    try:
        source = instantiate(cfg.dataset.source)
    except InstantiationException as err:
        cause = user_cause(err)
        if cause is None:
            raise
        raise cause from None
    return ReadableOnly(source) if cfg.dataset.get("missing_images") == "skip" else source


def run_datamodule(cfg):
    """The run's datamodule over its dataset, as the pipeline built it; None when the dataset is not on
    this machine (the model still loads and indexes other images)."""
    from cirlab.stage import build_datamodule

    try:
        return build_datamodule(cfg, build_source(cfg))
    except CirlabError:
        return None


def _pin_paths(cfg, run_dir: Path) -> None:
    """Use the folders the run used (its resolved paths, relative ones taken from the run's working
    directory), not whatever the environment and current directory would give now: otherwise a
    load from elsewhere would miss the backbone / feature caches."""
    import yaml

    from cirlab.trusted import read_results

    results = run_dir / "results.json"
    paths = None
    if results.is_file():
        paths = read_results(results)["config"].get("paths")
        if paths is not None and not isinstance(paths, dict):
            raise CirlabError(f"{results}: config.paths is not a mapping; is the file damaged?")
    if paths is None:
        from omegaconf import OmegaConf

        paths = OmegaConf.to_container(cfg.paths, resolve=True)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    cwd = None
    if hydra_yaml.is_file():
        try:
            node = yaml.safe_load(hydra_yaml.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise CirlabError(f"{hydra_yaml} is damaged ({type(err).__name__}: {err})") from None
        for key in ("hydra", "runtime", "cwd"):
            node = node.get(key) if isinstance(node, dict) else None
        cwd = node if isinstance(node, str) else None
    for key, value in paths.items():
        if isinstance(value, str) and cwd and not Path(value).is_absolute():
            value = str(Path(cwd) / value)
        cfg.paths[key] = value


def load(run_dir_or_ckpt: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> Retriever:
    """Rebuild a run's final-stage model (or the stage of a given checkpoint) with its trained weights.
    `overrides` are OmegaConf dotlist overrides of the run's config, e.g. ["paths.cache_dir=/x"].
    What the user can fix raises CirlabError (also from inside Hydra's instantiate), as the commands say it."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cirlab.trusted import check_targets, read_run_config

    run_dir, stage, ckpt = _run_and_stage(Path(run_dir_or_ckpt))
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise CirlabError(f"{cfg_path} not found: {run_dir} is not a cirlab run folder")
    cfg = read_run_config(cfg_path)  # the run folder is data: only cirlab's targets are built
    _pin_paths(cfg, run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    check_targets(cfg, f"{cfg_path} (with the paths of results.json)")  # pinned paths are strings too
    if "method" not in cfg:
        raise CirlabError(f"{run_dir} is not a training run (no method in its config)")
    try:
        return _rebuild(cfg, run_dir, stage, ckpt, device)
    except OmegaConfBaseException as err:  # a key the run's config lacks or mistypes
        key = getattr(err, "full_key", None) or "?"
        raise CirlabError(
            f"{cfg_path}: {key}: {str(err).splitlines()[0]}; is the run's config damaged or edited?"
        ) from None
    except InstantiationException as err:  # a target's CirlabError (e.g. weights it cannot download)
        cause = user_cause(err)
        if cause is None:
            raise
        raise cause from None


def _rebuild(cfg, run_dir: Path, stage: str | None, ckpt: Path | None, device: str | None) -> Retriever:
    """load() once the run's config is read and checked."""
    from hydra.utils import instantiate

    from cirlab.checkpoints import load_backbone_weights
    from cirlab.stage import build_stage

    stages = list(cfg.method.stages)
    stage = stage or stages[-1]
    if stage not in stages:
        raise CirlabError(f"stage {stage!r} is not one of the run's stages {stages}")

    backbone = instantiate(cfg.backbone.model)
    # earlier stages may have changed the backbone: their best checkpoint, or the weights file they started
    # from when they did not train (e.g. BLIP4CIR+Bi's released text encoder)
    for name in stages[: stages.index(stage)]:
        best = _checkpoint_of(run_dir, name)
        if best is not None:
            load_backbone_weights(backbone, best, name)
        elif cfg.method[name].get("checkpoint"):
            build_stage(cfg, name, backbone, None, run_dir / "stages" / name, mode="load")
    best = ckpt or _checkpoint_of(run_dir, stage)
    if best is None and cfg.method[stage].max_epochs > 0:
        raise CirlabError(
            f"stage {stage} of {run_dir} has no finished checkpoint (done.json); "
            "finish or resume the run first"
        )
    built = build_stage(
        cfg, stage, backbone, run_datamodule(cfg), run_dir / "stages" / stage, mode="load", trained=best
    )
    if device:
        built.module.to(device)
    return Retriever(built.module, cfg, run_dir, stage, built.datamodule)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cirlab-query", description="Composed image search with a trained run."
    )
    parser.add_argument("--run", required=True, help="run folder (or a stage checkpoint .ckpt)")
    parser.add_argument("--gallery", required=True, help="folder of gallery images (searched recursively)")
    parser.add_argument("--image", default=None, help="reference image (none for a cross-modal run)")
    parser.add_argument("--text", required=True, help="modification text")
    parser.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    args = parser.parse_args(argv)
    from cirlab.data.image_files import IMAGE_EXTS, list_images
    from cirlab.errors import exit_on_user_error

    with exit_on_user_error("cirlab-query"):
        paths = list_images(args.gallery)
        if not paths:
            raise CirlabError(f"no images ({', '.join(IMAGE_EXTS)}) under {Path(args.gallery)}")
        retriever = load(args.run, device=args.device).index(paths)
        for rank, (path, score) in enumerate(retriever.search(args.image, args.text, args.k), 1):
            print(f"{rank:3d}  {score:.4f}  {path}")


if __name__ == "__main__":
    main()
