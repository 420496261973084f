"""Hard-link the main environment's PyTorch into the MONAI Label environment (`make venv-monailabel`).

torch 2.14.1 with its CUDA libraries takes 5.3 GB. Both environments pin the same torch and torchvision
(``apps/medcam/constraints.txt``), so the MONAI Label environment links the main one's files instead of
holding a second copy: no extra disk on the same file system. pip then finds torch and torchvision
installed and leaves them alone. Where linking fails (another file system), nothing is left behind and
pip installs its own copy as before.

Run with the main environment's Python: ``.venv/bin/python apps/medcam/share_torch.py SITE_PACKAGES``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path

ROOTS = ("torch", "torchvision")
HEAVY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def heavy_distributions() -> list[md.Distribution]:
    """torch, torchvision and the CUDA-only packages they pull (nvidia-*, cuda-*, triton), as installed."""
    seen: dict[str, md.Distribution] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()  # a normalised name: lower case, "-" for "_"
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker or extra does not apply here
        seen[name] = dist
        for req in dist.requires or []:
            dep = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
            if HEAVY.match(dep):
                todo.append(dep)
    return list(seen.values())


def top_entries(dists: list[md.Distribution]) -> dict[str, Path]:
    """Top-level names in site-packages that the distributions own (folders and files) -> their path."""
    entries: dict[str, Path] = {}
    for dist in dists:
        for file in dist.files or []:
            top = file.parts[0]
            if top == "..":  # console scripts live in bin/, outside site-packages
                continue
            entries[top] = Path(dist.locate_file(top))
    return entries


def link_into(entries: dict[str, Path], site: Path) -> list[Path]:
    """Hard-link each entry into ``site``; return what was created. Undo everything on the first error."""
    made: list[Path] = []
    try:
        for name, src in sorted(entries.items()):
            dst = site / name
            if dst.exists():
                continue
            made.append(dst)
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=os.link, symlinks=True)
            else:
                os.link(src, dst)
    except OSError:
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    return made


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: share_torch.py SITE_PACKAGES (an existing site-packages folder)", file=sys.stderr)
        return 2
    site = Path(argv[0])
    dists = heavy_distributions()
    if not any(d.metadata["Name"].lower() == "torch" for d in dists):
        print("share_torch: no torch in this Python; the MONAI Label environment installs its own")
        return 0
    entries = top_entries(dists)
    try:
        made = link_into(entries, site)
    except OSError as err:
        print(f"share_torch: could not hard-link into {site} ({err}); pip installs its own copy")
        return 0
    names = ", ".join(sorted(f"{d.metadata['Name']} {d.version}" for d in dists if not d.metadata["Name"].startswith("nvidia")))
    print(f"share_torch: linked {len(made)} entries ({names} and {len(dists)} packages in all) into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
