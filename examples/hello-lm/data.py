"""hello-lm's data: the Python standard library's own source files, which ship with every
Python, so the example runs offline on any machine.

Files are grouped by their top-level module or package (`asyncio/...` and `asyncio.py` alike
belong to `asyncio`). The packages in VALIDATION are kept out of every site: their files are
the common validation set. The rest are dealt to the sites whole, largest first, each to the
site holding the fewest bytes so far, so the sites hold about as many bytes each but different
code (non-IID: one site may learn from `email` and `tkinter`, another from `asyncio`). With up
to 16 sites, every site holds at least one package (the largest are about 0.7 MB). The stdlib's
own test suite (`test`, `idlelib/idle_test`, ...) is left out, 17 MB that would swamp one site,
and so are the 1.4 MB of codec tables in `encodings`.

Bytes are the tokens (uint8, vocabulary 256); a site reads at most `mib` MiB of its files.
"""

import functools
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch

VALIDATION = ("argparse", "json", "logging", "string", "textwrap")
LEFT_OUT = ("test", "tests", "idle_test", "encodings", "site-packages", "dist-packages")
SEPARATOR = b"\n\n"  # between files


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def packages() -> dict[str, list[Path]]:
    """Every top-level module or package of the standard library and its .py files, sorted."""
    root, found = stdlib(), {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in LEFT_OUT)  # not walked at all
        for file in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, file)
            found.setdefault(path.relative_to(root).parts[0].removesuffix(".py"), []).append(path)
    return dict(sorted(found.items()))


def package_bytes(name: str) -> int:
    return sum(path.stat().st_size for path in packages()[name])


def assignment(sites: int) -> list[list[str]]:
    """The packages each of `sites` sites holds: dealt largest first (ties broken by a hash
    of the name, so the order is fixed) to the site with the fewest bytes so far."""
    held: list[list[str]] = [[] for _ in range(sites)]
    sizes = [0] * sites
    names = [name for name in packages() if name not in VALIDATION]
    names.sort(key=lambda name: (-package_bytes(name), zlib.crc32(name.encode())))
    for name in names:
        site = sizes.index(min(sizes))
        held[site].append(name)
        sizes[site] += package_bytes(name)
    return held


def _read(names: list[str], mib: float) -> np.ndarray:
    """The bytes of the packages' files, separated, up to `mib` MiB, as uint8 tokens."""
    limit, pieces, total = int(mib * 2**20), [], 0
    for name in sorted(names):
        for path in packages()[name]:
            piece = path.read_bytes()[: limit - total] + SEPARATOR
            pieces.append(piece)
            total += len(piece)
            if total >= limit:
                return _tokens(b"".join(pieces)[:limit])
    return _tokens(b"".join(pieces))


def _tokens(raw: bytes) -> np.ndarray:
    """Bytes as a writable uint8 array (torch refuses to view read-only memory)."""
    return np.frombuffer(bytearray(raw), np.uint8)


@functools.cache
def site_tokens(site: int, sites: int, mib: float) -> np.ndarray:
    """Training tokens of site `site` (0-based) among `sites`."""
    if not 0 <= site < sites <= 16:
        raise ValueError(f"site {site} of {sites}: hello-lm splits its data for 1 to 16 sites")
    return _read(assignment(sites)[site], mib)


def all_tokens(sites: int, mib: float) -> np.ndarray:
    """Every site's training tokens together: what the central baseline trains on."""
    return np.concatenate([site_tokens(site, sites, mib) for site in range(sites)])


@functools.cache
def validation_windows(context: int, count: int) -> torch.Tensor:
    """`count` fixed windows of `context` + 1 bytes, evenly spaced over the validation files."""
    tokens = _read(list(VALIDATION), 1.0)
    starts = np.linspace(0, len(tokens) - context - 1, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]))


def batches(tokens: np.ndarray, context: int, size: int, generator: torch.Generator):
    """Endless batches of `size` random windows of `context` + 1 bytes from `tokens`."""
    data = torch.from_numpy(tokens)
    offsets = torch.arange(context + 1)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (size, 1), generator=generator)
        yield data[starts + offsets]
