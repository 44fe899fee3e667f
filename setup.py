"""Which folders install as which packages; everything else is in pyproject.toml.

The Triton ops live in `kernels/` and install as `limoe_kernels` (a top-level `kernels` would
clash with other distributions of that name). The YAML files in `configs/` install inside the
package as `limoe.configs`, so `limoe info limoe-h14` and the recipes work from a wheel too.

Editable installs (`pip install -e .`) are strict by default: a tree of links to the checkout's
files, put on sys.path. setuptools' default (lenient) editable install of a layout with renamed
folders like these is an import hook that Python asks only after searching sys.path, so a folder
named `limoe` in the script's or the current folder (the checkout itself, seen from its parent)
would be imported instead, as an empty namespace package. A regular package on sys.path wins over
such a folder; the price is that a new module needs `pip install -e .` again to be importable.
`--config-settings editable_mode=lenient` picks setuptools' default.
"""

from setuptools import find_packages, setup
from setuptools.command.editable_wheel import editable_wheel


class StrictEditableWheel(editable_wheel):
    """setuptools' editable install, strict unless `--config-settings editable_mode=…` says otherwise."""

    def initialize_options(self):
        super().initialize_options()
        self.mode = "strict"


setup(
    packages=[*find_packages(include=["limoe", "limoe.*"]), "limoe_kernels", "limoe.configs"],
    package_dir={"limoe_kernels": "kernels", "limoe.configs": "configs"},
    package_data={"limoe.configs": ["models/*.yaml", "train/*.yaml", "pretrain/*.yaml"]},
    cmdclass={"editable_wheel": StrictEditableWheel},
)
