"""Which folders install as which packages; everything else is in pyproject.toml.

The Triton ops live in `kernels/` and install as `limoe_kernels` (a top-level `kernels` would
clash with other distributions of that name). The YAML files in `configs/` install inside the
package as `limoe.configs`, so `limoe info limoe-h14` and the recipes work from a wheel too.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["limoe", "limoe.*"]), "limoe_kernels", "limoe.configs"],
    package_dir={"limoe_kernels": "kernels", "limoe.configs": "configs"},
    package_data={"limoe.configs": ["models/*.yaml", "train/*.yaml", "pretrain/*.yaml"]},
)
