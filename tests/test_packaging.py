"""The installed package is the whole package: a non-editable install (the image's) has every module."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_the_wheel_holds_every_package_of_the_tree(tmp_path):
    src = tmp_path / "src"  # a copy: building in the tree would leave build/ there
    for top in ("kftune", "components", "pipelines"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("kftune-*.whl"))
    shipped = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/__init__.py")}
    tree = {str(p.parent.relative_to(ROOT)) for top in ("kftune", "components", "pipelines")
            for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert tree and tree <= shipped, f"packages missing from the wheel: {sorted(tree - shipped)}"
