"""``tokenrelay up | gateway | worker``: one console script for every process."""

from __future__ import annotations

import argparse
import os
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


def openmp_defaults() -> None:
    """Before torch loads: idle OpenMP threads sleep instead of spinning.

    libgomp's default keeps torch's intra-op threads spinning for a while after every operator.
    A worker shares the CPUs with its own event loop (and, on one machine, with Redis and the
    gateway): measured here with a small model, the spinning took ~60% of the worker's CPU time
    and halved what the whole path delivered, while SmolLM2's own speed did not change
    (docs/benchmarks-notes.md). An OMP_WAIT_POLICY the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
            openmp_defaults()
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
