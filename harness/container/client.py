"""Connecting to a Docker engine.

:func:`connect` honours ``DOCKER_HOST`` (and the SDK's other ``DOCKER_*`` variables) when it is set;
otherwise it tries the system socket and then the socket of the private engine that
``scripts/dockerd-local.sh start`` runs. When no engine answers it raises :class:`EngineUnavailable`,
whose message lists what was tried and how to start one.
"""
from __future__ import annotations

import os
from pathlib import Path

SYSTEM_SOCKET = "/var/run/docker.sock"
LOCAL_DIR_ENV = "HARNESS_DOCKER_DIR"
LOCAL_DIR_DEFAULT = "/var/tmp/medsam-harness-docker"
DEFAULT_TIMEOUT_S = 900  # per API call; an image build streams for minutes


class EngineUnavailable(RuntimeError):
    """No Docker engine answers (nothing at DOCKER_HOST, the system socket or the local engine's socket)."""


def local_socket() -> Path:
    """The socket of the engine that ``scripts/dockerd-local.sh`` manages."""
    return Path(os.environ.get(LOCAL_DIR_ENV) or LOCAL_DIR_DEFAULT) / "docker.sock"


def start_hint() -> str:
    script = Path(__file__).resolve().parents[2] / "scripts" / "dockerd-local.sh"
    shown = script if script.is_file() else Path("scripts/dockerd-local.sh")
    return (
        f"Start one with `{shown} start` (needs dockerd on PATH; Debian/Ubuntu: apt-get install docker.io), "
        f"then run the line it prints: export DOCKER_HOST=unix://{local_socket()}"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def connect(timeout: int = DEFAULT_TIMEOUT_S):
    """A ``docker.DockerClient`` whose engine answered a ping.

    Raises:
        EngineUnavailable: no engine answers; the message names every address tried and why it failed.
    """
    import docker
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    host = os.environ.get("DOCKER_HOST", "").strip()
    tried: list[str] = []

    def attempt(make, where: str):
        client = None
        try:
            client = make()
            client.ping()
            return client
        except (DockerException, RequestException, OSError) as exc:
            tried.append(f"{where}: {_short(exc)}")
            if client is not None:
                client.close()
            return None

    if host:
        # Explicit: use it or fail; falling back elsewhere would hide a typo in DOCKER_HOST.
        client = attempt(lambda: docker.from_env(timeout=timeout), f"DOCKER_HOST={host}")
    else:
        client = None
        for sock in (Path(SYSTEM_SOCKET), local_socket()):
            if not sock.exists():
                tried.append(f"unix://{sock}: no such socket")
                continue
            client = attempt(lambda s=sock: docker.DockerClient(base_url=f"unix://{s}", timeout=timeout),
                             f"unix://{sock}")
            if client is not None:
                break
    if client is None:
        raise EngineUnavailable(
            "no Docker engine answers (tried " + "; ".join(tried) + "). " + start_hint()
        )
    return client
