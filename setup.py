"""The part of the packaging pyproject.toml cannot say: the top-level conf/ (experiments/ included,
through its `experiment` link) ships inside the package as cirlab/conf, where an installed `cirlab`
reads its configs. Every folder of conf/ is listed, so setuptools takes each one's YAML files."""

from pathlib import Path

from setuptools import find_packages, setup

CONF = ["cirlab.conf"] + sorted(
    ".".join(("cirlab.conf", *d.relative_to("conf").parts)) for d in Path("conf").rglob("*") if d.is_dir()
)

setup(
    packages=find_packages(include=["cirlab*"]) + CONF,
    package_dir={"cirlab.conf": "conf"},
    package_data={"cirlab": ["py.typed"], **{name: ["*.yaml"] for name in CONF}},
)
