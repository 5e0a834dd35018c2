"""`fbhook`: the one command-line tool. Each subcommand lives in its own module of `cli/`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from redis.exceptions import RedisError

from cli import (
    attribution,
    config,
    deadletters,
    dev,
    events,
    failover,
    forward,
    report,
    services,
    simulate,
)
from cli.common import CommandFailed
from shared.errors import ConfigError

EPILOG = """\
configuration comes from the environment only (FB_APP_SECRET, FB_VERIFY_TOKEN, API_TOKEN,
REDIS_URL, ...): `fbhook check-config` validates it. Commands that only read Redis need no
secrets and take --redis-url. Run `fbhook COMMAND --help` for each command; docs/cli.md has
examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbhook",
        description="Facebook Messenger webhook receiver: run it, feed it, inspect what it kept.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    services.add_parsers(sub)
    dev.add_parser(sub)
    config.add_parser(sub)
    simulate.add_parser(sub)
    attribution.add_parser(sub)
    events.add_parser(sub)
    deadletters.add_parser(sub)
    forward.add_parser(sub)
    report.add_parser(sub)
    failover.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"fbhook: configuration error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"fbhook: {exc}", file=sys.stderr)
        return 1
    except RedisError as exc:
        print(f"fbhook: Redis error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fbhook ... | head`): not an error; silence the final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
