"""`python -m recipe.dry_run [--config-name NAME] OVERRIDES...`: exit 0 and print the plan, or exit 1 naming
every key that would make the run fail (see recipe/dry_run/__init__.py)."""

from __future__ import annotations

import sys

from .core import DryRunError, dry_run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        result = dry_run(args)
    except DryRunError as e:
        print(e, file=sys.stderr)
        return 1
    print("dry run: configuration OK (composition, verl validate_config, dataclasses: "
          f"{', '.join(result.dataclasses_built)}; cluster checks)")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(result.plan.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
