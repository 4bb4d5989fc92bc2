"""What a person sees: each stage's own few lines. Ray's worker output, Ray Data's per-dataset
progress and vLLM's start-up logs stay in Ray's session logs (their folder is printed once)
unless ``--verbose`` (``VECLIP_VERBOSE=1``, which Ray jobs and workers inherit) asks for them."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

VERBOSE_ENV = "VECLIP_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def eta(remaining: float, rate: float) -> str:
    """The time left at ``rate`` units per second, in the unit a person reads it in."""
    if rate <= 0:
        return "unknown"
    seconds = remaining / rate
    return (
        f"{seconds / 3600:.1f} h"
        if seconds > 5400
        else f"{seconds / 60:.1f} min"
        if seconds > 90
        else f"{seconds:.0f} s"
    )


def stale_cluster_address() -> tuple[str, str] | None:
    """``(address, file)`` when no RAY_ADDRESS is set and the cluster Ray last started on this machine (its
    ``ray_current_cluster`` file) no longer answers: ``ray.init()`` would retry it forever, silently."""
    from ray._common.utils import get_ray_address_file

    if os.environ.get("RAY_ADDRESS"):
        return None
    path = get_ray_address_file(None)
    try:
        address = Path(path).read_text().strip()
        host, _, port = address.rpartition(":")
        socket.create_connection((host, int(port)), timeout=2).close()
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return address, path


NODE_DEAD = re.compile(r"node id: (\w+) and address: ([\w.:-]+).*has been marked dead", re.S)


def quiet_cluster_events(path: Path, log=print) -> None:
    """One line per node lost instead of Ray's raylet dumps and retry warnings on the driver's console;
    every message Ray sends the driver goes whole to ``path``. (Ray prints them from its error listener
    whatever ``log_to_driver`` says; its printer is a module global, swapped here.)"""
    import ray._private.worker as ray_worker

    printer, told = ray_worker.print_to_stdstream, set()

    def to_file_and_a_line(data, ignore_prefix):
        if data.get("pid") != "raylet":
            return printer(data, ignore_prefix)
        with open(path, "a") as f:
            f.write("\n".join(data.get("lines", [])) + "\n")
        for line in data.get("lines", []):
            if (dead := NODE_DEAD.search(line)) and dead.group(1) not in told:
                told.add(dead.group(1))
                log(
                    f"ray: node {dead.group(1)[:8]}… ({dead.group(2)}) lost; Ray restarts its actors and retries "
                    f"its work on the nodes left (Ray's messages: {path})"
                )

    ray_worker.print_to_stdstream = to_file_and_a_line


def start_ray(log=print) -> None:
    """Connect to (or start) Ray as a stage's driver, quiet unless verbose."""
    import ray
    from ray.data import DataContext

    loud = verbose()
    if not ray.is_initialized():
        if not loud:  # "token authentication is enabled ...": Ray's default for a local head, said on every start
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        address = None
        if stale := stale_cluster_address():
            log(f"ray: the cluster at {stale[0]} (named in {stale[1]}) is gone; starting a fresh local one")
            address = "local"
        context = ray.init(address=address, log_to_driver=loud, logging_level=logging.INFO if loud else logging.WARNING)
        session = context.address_info.get("session_dir")
        if not loud and session:
            log(f"ray: worker and engine logs in {session}/logs (--verbose shows them here)")
            quiet_cluster_events(Path(session) / "logs" / "veclip-cluster-events.log", log)
    data = DataContext.get_current()
    data.enable_progress_bars = loud  # our own progress lines say how far a stage is
    data.print_on_execution_start = loud
    if not loud:  # its memory warnings repeat every 30 s for actors that hold a model (rewrite, eval)
        data.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # "execution finished" per dataset
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we did


def alive_nodes() -> set[str]:
    """The ids of the Ray nodes alive now (the cluster this process is attached to)."""
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}
