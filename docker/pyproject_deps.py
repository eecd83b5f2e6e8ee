"""Print the dependencies of the project's pyproject.toml, one requirement a line.

The Dockerfile installs them in layers of their own before copying the source, so that
editing the code does not re-download torch: ``--only NAME`` prints just the named
distributions, ``--exclude NAME`` all the others. Standard library only (Python 3.11+).
"""

from __future__ import annotations

import argparse
import re

import tomllib  # standard library from Python 3.11 (ruff's target is 3.10)


def requirement_name(requirement: str) -> str:
    """The normalised distribution name at the start of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", action="append", default=[], metavar="NAME")
    group.add_argument("--exclude", action="append", default=[], metavar="NAME")
    ns = parser.parse_args()
    with open(ns.pyproject, "rb") as f:
        requirements = tomllib.load(f)["project"].get("dependencies", [])
    only = {requirement_name(n) for n in ns.only}
    exclude = {requirement_name(n) for n in ns.exclude}
    for requirement in requirements:
        name = requirement_name(requirement)
        if (only and name not in only) or name in exclude:
            continue
        print(requirement)


if __name__ == "__main__":
    main()
