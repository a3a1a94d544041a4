"""`python -m recipe.data.tiny_assets --out DIR [--seed N] [--force] [--quiet]`: build (or find in the cache)
the tiny assets and print where they are."""

from __future__ import annotations

import argparse
import json

from . import __doc__ as PACKAGE_DOC
from .build import build_tiny_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.data.tiny_assets", description=PACKAGE_DOC.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="output directory (default: the cache, <repo>/.cache/tiny_assets/<key>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    assets = build_tiny_assets(args.out, seed=args.seed, force=args.force, verbose=not args.quiet)
    m = assets.manifest
    print(json.dumps({
        "root": str(assets.root),
        "model_dir": str(assets.model_dir),
        "train_file": str(assets.train_file),
        "test_file": str(assets.test_file),
        "from_cache": assets.from_cache,
        "accuracy": assets.accuracy,
        "expected_accuracy": assets.expected_accuracy,
        "n_params": m["n_params"],
        "recommended": m["recommended"],
        "build_seconds": m["build_seconds"],
    }, indent=2))
    return 0
