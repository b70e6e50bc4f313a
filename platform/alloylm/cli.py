"""The `alloylm` command: `validate`, `data` and `run` on a run config, with key=value overrides.

    alloylm validate configs/quickstart.yaml data.block_size=128
    alloylm data configs/quickstart.yaml
    alloylm run configs/quickstart.yaml

Exit codes: 0 done, 1 the work failed (the message says why), 2 the config or the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from alloylm import storage
from alloylm.config import ConfigError, RunConfig, load_config

EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alloylm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a config and print the resolved one")
    _add_config_arguments(validate)
    data = commands.add_parser("data", help="prepare the tokenizer and data sets on Ray Data")
    _add_config_arguments(data)
    data.add_argument("--only", action="append", default=None, metavar="NAME", help="prepare only this data set (repeatable)")
    run = commands.add_parser("run", help="run the whole pipeline of a config")
    _add_config_arguments(run)
    return parser


def _data(config: RunConfig, only: list[str] | None) -> dict:
    from alloylm.cluster import connect_ray
    from alloylm.data.prepare import prepare_all

    connect_ray()
    return prepare_all(config, only)


def _run(config: RunConfig) -> dict:
    # The pipeline runs the stages that exist so far: data preparation. Training, merging,
    # evaluation and serving stages join it as they are built.
    manifests = _data(config, None)
    summary = {
        "experiment": config.experiment,
        "run": config.run_uri,
        "datasets": {name: m["counts"] for name, m in manifests.items()},
    }
    if config.stages:
        logging.getLogger("alloylm").warning(
            "stages %s are declared but this version runs data preparation only", ", ".join(config.stage_order())
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate":
        print(config.resolved_yaml(), end="")
        return 0
    from alloylm.data.prepare import DataPreparationError
    from alloylm.data.sources import SourceError

    try:
        if args.command == "data":
            result = {name: m["counts"] for name, m in _data(config, args.only).items()}
        else:
            result = _run(config)
    except (SourceError, DataPreparationError, storage.StorageError) as exc:
        print(f"alloylm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
