"""Regenerate ``example_project/``: the copier template rendered with its default answers.

    uv run python -m scripts.render_example          # rewrite example_project/
    uv run python -m scripts.render_example --check  # exit 1 and show what differs

The render uses the working tree (``vcs_ref="HEAD"`` includes uncommitted changes). Two
things are made reproducible: the answers file records ``_src_path: ..`` (the template is this
repository) and no ``_commit``; and ``.env`` (random passwords, git-ignored) is never compared
nor replaced once it exists.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example_project"
ANSWERS_FILE = ".copier-answers.yml"
# Per-machine files: generated once, git-ignored, never part of the comparison.
LOCAL_ONLY = frozenset({".env"})
# Build and test leftovers that may sit in a checked-out example_project.
IGNORED_PARTS = frozenset(
    {"__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "uv.lock", ".dagster_home"}
)


def render(dst: Path, data: Mapping[str, Any] | None = None) -> Path:
    """Render the template at HEAD (plus uncommitted changes) into ``dst``."""
    from copier import run_copy

    with warnings.catch_warnings():
        # "Dirty template changes included automatically" is exactly what we want here.
        warnings.simplefilter("ignore")
        run_copy(
            str(REPO),
            str(dst),
            data=dict(data or {}),
            defaults=True,
            vcs_ref="HEAD",
            quiet=True,
            overwrite=True,
        )
    normalize_answers(dst)
    return dst


def normalize_answers(project: Path) -> None:
    """Replace the answers file's machine- and commit-specific lines with stable ones."""
    path = project / ANSWERS_FILE
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("_commit:"):
            continue
        if line.startswith("_src_path:"):
            line = "_src_path: .."
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def project_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file that belongs to the rendered project."""
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_dir() or relative.as_posix() in LOCAL_ONLY:
            continue
        if IGNORED_PARTS.intersection(relative.parts) or relative.parts[0].startswith(
            ".tmp_dagster_home_"
        ):
            continue
        files[relative.as_posix()] = path.read_bytes()
    return files


def differences(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences between two project trees (empty when identical)."""
    want, have = project_files(expected), project_files(actual)
    report = [f"missing: {name}" for name in sorted(want.keys() - have.keys())]
    report += [f"unexpected: {name}" for name in sorted(have.keys() - want.keys())]
    for name in sorted(want.keys() & have.keys()):
        if want[name] == have[name]:
            continue
        try:
            diff = difflib.unified_diff(
                have[name].decode().splitlines(),
                want[name].decode().splitlines(),
                f"example_project/{name}",
                f"fresh render/{name}",
                lineterm="",
            )
            report.append("\n".join(diff))
        except UnicodeDecodeError:
            report.append(f"differs: {name}")
    return report


def write_example(fresh: Path) -> None:
    """Make example_project/ hold exactly ``fresh`` (keeping an existing local .env)."""
    keep = {name: (EXAMPLE / name).read_bytes() for name in LOCAL_ONLY if (EXAMPLE / name).exists()}
    if EXAMPLE.exists():
        shutil.rmtree(EXAMPLE)
    shutil.copytree(fresh, EXAMPLE, symlinks=True)
    for name, content in keep.items():
        (EXAMPLE / name).write_bytes(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = render(Path(tmp) / "example_project")
        if args.check:
            report = differences(fresh, EXAMPLE)
            if report:
                print("example_project/ is stale; run: uv run python -m scripts.render_example")
                print("\n".join(report))
                return 1
            print("example_project/ matches a fresh render.")
            return 0
        write_example(fresh)
    print(f"Rendered {EXAMPLE.relative_to(REPO)}/ with the default answers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
