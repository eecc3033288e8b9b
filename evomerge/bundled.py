"""Where the folders evomerge ships beside its code are: ``search_spaces/`` and ``evaluators/``.

Both are top-level folders of the repository, their one edited copy. A wheel or ``pip install .``
puts them inside the installed package (``evomerge/search_spaces``, ``evomerge/evaluators``: the
``package-dir`` mapping in pyproject.toml); an editable install or a checkout has them beside the
package folder. Standard library only: space.py imports this without pulling in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

BundledFolder = Literal["search_spaces", "evaluators"]
BUNDLED_FOLDERS: tuple[BundledFolder, ...] = ("search_spaces", "evaluators")

_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_folder(name: BundledFolder) -> Path:
    """The folder ``name``: the installed package's copy when present, else the checkout's
    top-level one (editable install, running from the source tree). It may not exist (a
    package built without it); callers check."""
    if name not in BUNDLED_FOLDERS:
        raise ValueError(f"no bundled folder {name!r}; bundled: {', '.join(BUNDLED_FOLDERS)}")
    installed = _PACKAGE_DIR / name
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / name
