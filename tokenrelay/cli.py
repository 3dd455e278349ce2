"""``tokenrelay up | gateway | worker``: one console script for every process."""

from __future__ import annotations

import argparse
import sys

from tokenrelay import config


def _parser() -> argparse.ArgumentParser:
    from gateway.settings import OPTIONS as GATEWAY_OPTIONS
    from tokenrelay.launcher import UP_OPTIONS
    from worker.settings import OPTIONS as WORKER_OPTIONS

    parser = argparse.ArgumentParser(prog="tokenrelay", description="OpenAI-compatible gateway with a queue")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, options, text in (
        ("up", UP_OPTIONS, "Redis (if none is reachable) + gateway + workers on this machine"),
        ("gateway", GATEWAY_OPTIONS, "the HTTP gateway alone (stateless; run as many as you like)"),
        ("worker", WORKER_OPTIONS, "one worker process holding one model"),
    ):
        config.add_options(sub.add_parser(name, help=text, description=text), options)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    program = f"tokenrelay {command}"
    try:
        if command == "gateway":
            from gateway.server import run as run_gateway
            from gateway.settings import OPTIONS as GATEWAY_OPTIONS
            from gateway.settings import GatewaySettings

            gateway_settings = GatewaySettings.from_values(config.resolve(GATEWAY_OPTIONS, args))
            run_gateway(gateway_settings)
        elif command == "worker":
            from worker.settings import OPTIONS as WORKER_OPTIONS
            from worker.settings import WorkerSettings

            worker_settings = WorkerSettings.from_values(config.resolve(WORKER_OPTIONS, args))
            from worker.main import run as run_worker

            run_worker(worker_settings)
        else:
            from tokenrelay.launcher import UP_OPTIONS, up

            up(config.resolve(UP_OPTIONS, args))
    except config.ConfigError as exc:
        config.fail(program, exc)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
