"""Which packages `pip install .` installs (the rest of the metadata is in pyproject.toml).

Every package under dit/ (found, so that a new subpackage needs no edit here), plus the hydra
configs: the top-level conf/, where they are written and edited, installed as the data package
`dit.conf`, where dit/cli/__init__.py's `config_dir()` finds them in an installed copy.
pyproject.toml alone cannot say both: its `packages` is either a fixed list or `find`.
"""

from setuptools import find_packages, setup


def dit_packages() -> list[str]:
    return sorted(find_packages(include=["dit", "dit.*"]) + ["dit.conf"])


if __name__ == "__main__":
    setup(
        packages=dit_packages(),
        package_dir={"dit.conf": "conf"},
        package_data={"dit.conf": ["*.yaml", "**/*.yaml"]},
        include_package_data=False,
    )
