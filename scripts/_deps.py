"""What of pyproject.toml's requirements is not installed yet, so that the scripts install only that.

    python3 scripts/_deps.py [--extras test,integration] [--torch 2.13.0] [--no-self] [--no-torch] [--unpinned]

Prints one pip requirement per line for each one that is missing or at another version (nothing
when all are satisfied) and exits 0. Checked: ``torch`` (at ``--torch`` if given, else at
pyproject's range), this package (installed from this checkout: ``kprodigy`` must import from
here, not from another clone; printed as ``--editable=.[extras]``; ``--no-self`` skips it) and the
requirements of each extra (``--no-torch``: not torch). Only the forms pyproject.toml uses are understood: ``name``,
``name==X``, ``name>=X``. Runs on any Python 3.10+ with nothing but the standard library.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(text: str, name: str) -> list[str]:
    m = re.search(rf"^{re.escape(name)} = \[(.*?)\]", text, re.S | re.M)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def requirements(extras: list[str]) -> tuple[list[str], list[str]]:
    """(the project's dependencies, the requirements of ``extras``) as written in pyproject.toml."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    deps = _block(text, "dependencies")
    reqs: list[str] = []
    for extra in extras:
        found = _block(text, extra)
        if not found:
            raise SystemExit(f"_deps.py: no extra {extra!r} in pyproject.toml")
        reqs += [r for r in found if r not in reqs]
    return deps, reqs


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def satisfied(req: str) -> bool:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:(==|>=)\s*([^\s;]+))?\s*", req)
    if not m:
        return False  # a form this checker does not read: let pip decide
    name, op, want = m.groups()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        return False
    if op is None:
        return True
    h, w = _version_tuple(have), _version_tuple(want)
    h, w = h + (0,) * (3 - len(h)), w + (0,) * (3 - len(w))  # 2.6 means 2.6.0, as pip reads it
    if op == ">=":
        return h >= w
    plain = re.fullmatch(r"[\d.]+", want) is not None  # no pre-, post- or dev-release part
    return h == w and re.fullmatch(r"[\d.]+", have.split("+")[0]) is not None if plain else have.split("+")[0] == want


def self_installed() -> bool:
    """``import kprodigy`` from outside the checkout finds this checkout's package."""
    code = "import importlib.util as u; s = u.find_spec('kprodigy'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.expanduser("~"))
    origin = out.stdout.strip()
    return bool(origin) and os.path.realpath(origin).startswith(os.path.realpath(ROOT) + os.sep)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extras", default="", help="comma-separated extras of pyproject.toml")
    p.add_argument("--torch", default="", help="the torch version wanted (default: pyproject's range)")
    p.add_argument("--no-self", action="store_true", help="do not check that this checkout is installed")
    p.add_argument("--no-torch", action="store_true", help="do not check torch")
    p.add_argument("--unpinned", action="store_true", help="the extras' packages at any version (names only)")
    args = p.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    deps, reqs = requirements(extras)
    missing = []
    torch_req = f"torch=={args.torch}" if args.torch else next((d for d in deps if d.startswith("torch")), "torch")
    if not args.no_torch and not satisfied(torch_req):
        missing.append(torch_req)
    if not args.no_self and not self_installed():
        missing.append("--editable=.[" + ",".join(extras) + "]" if extras else "--editable=.")
    if args.unpinned:
        reqs = [re.split(r"[=<>!~ ;]", r, maxsplit=1)[0] for r in reqs]
    missing += [r for r in deps + reqs if not r.startswith("torch") and not satisfied(r)]
    if missing:
        print("\n".join(missing))


if __name__ == "__main__":
    main()
