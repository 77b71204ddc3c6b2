"""Entry point of the agent process: ``python -m rpg.agent --config agent.json``.

The pilot token is not in agent.json but in the file its ``token_file`` names (agent.token,
owner-only); the agent reads it and deletes it before anything else, so that no unit (same
user, same sandbox) can find it on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rpg.launch_config import AgentConfig
from rpg.log import get_logger


def take_token(path: str) -> str:
    """Read the token file (never through a link) and delete it. Blocking: before any loop."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.unlink(path)
        token = os.read(fd, 4096).decode("ascii").strip()
    finally:
        os.close(fd)
    if not token:
        raise ValueError("empty token file")
    return token


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rpg.agent")
    ap.add_argument("--config", required=True, help="agent configuration (JSON)")
    args = ap.parse_args(argv)
    log = get_logger("agent")
    try:
        with open(args.config, encoding="utf-8") as fh:  # before any loop runs
            cfg = AgentConfig.from_json(json.load(fh))
    except (OSError, ValueError) as exc:
        log.error("agent_config_unreadable", path=args.config, error=str(exc))
        return 2
    if cfg.token_file is not None:
        try:
            cfg.token = take_token(cfg.token_file)
        except (OSError, ValueError) as exc:
            log.error("agent_token_unreadable", path=cfg.token_file, error=str(exc))
            return 2
    if cfg.token is None:
        log.error("agent_config_incomplete", path=args.config, missing=["token_file"])
        return 2
    from rpg.agent.agent import Agent
    from rpg.gc_policy import FullCollections

    # This process is the agent's alone: it may choose when its full collections run.
    code = Agent(cfg, gc_policy=FullCollections().install()).run()
    if cfg.exit_code_file:  # for launchers that watch the agent from afar (ssh)
        try:
            with open(cfg.exit_code_file, "w", encoding="utf-8") as fh:  # the loop is done
                fh.write(f"{code}\n")
        except OSError as exc:
            log.error("agent_exit_code_not_written", path=cfg.exit_code_file, error=str(exc))
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything the agent started is stopped and reaped by now; a zmq or lane thread stuck in a
    # blocking call (a vanished hub, a dead disk) must not keep the process alive.
    os._exit(code)
