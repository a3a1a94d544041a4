"""`python -m recipe.dry_run [--save-config PATH] [--config-name NAME] OVERRIDES...`: exit 0 and print the plan,
or exit 1 naming every key that would make the run fail (see recipe/dry_run/__init__.py). `--save-config PATH`
writes the composed config (resolved YAML, every setting of the run) to PATH, also when a check fails."""

from __future__ import annotations

import sys
from pathlib import Path

from .core import DryRunError, dry_run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    save_config = None
    if args[:1] == ["--save-config"]:
        if len(args) < 2 or args[1].startswith("-") or "=" in args[1]:
            print("error: --save-config takes a file path (e.g. runs/logs/<run>/config.yaml)", file=sys.stderr)
            return 2
        save_config, args = args[1], args[2:]
        Path(save_config).unlink(missing_ok=True)  # a file left from an earlier dry run is not this run's
    try:
        result = dry_run(args, save_config)
    except DryRunError as e:
        print(e, file=sys.stderr)
        if save_config and Path(save_config).is_file():
            print(f"composed config: {save_config}", file=sys.stderr)
        return 1
    print("dry run: configuration OK (composition, verl validate_config, dataclasses: "
          f"{', '.join(result.dataclasses_built)}; cluster checks)")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(result.plan.text())
    if save_config:
        print(f"composed config: {save_config}", file=sys.stderr)  # stdout: the plan alone (the README shows it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
