"""Choosing the tf.distribute strategy: one device, all local devices, or several machines."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import tensorflow as tf

from cp2image_tf.training.config import STRATEGIES
from tfrecords_tools.errors import UserInputError


def cluster_spec():
    """The parsed TF_CONFIG, or None when it is not set."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
        cluster = config["cluster"]
        task = config["task"]
        workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
        _ = task["type"], int(task["index"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserInputError(
            f"TF_CONFIG does not parse ({type(err).__name__}: {err}). Expected JSON like "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}.'
        ) from None
    return {"cluster": cluster, "task": task, "workers": workers}


def local_devices():
    """Visible GPUs, or else the (logical) CPU devices."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def task_address(spec: dict) -> str:
    """This task's host:port in TF_CONFIG."""
    task = spec["task"]
    try:
        return spec["cluster"][task["type"]][int(task["index"])]
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserInputError(f"TF_CONFIG: task {task} is not in the cluster "
                             f"{spec['cluster']}.") from None


def wait_for_peers(spec: dict, timeout: float, poll: float = 0.5) -> None:
    """Meet every other worker of TF_CONFIG on its own port before TensorFlow does.

    TensorFlow's collective start-up waits for missing workers without end, deaf to SIGTERM.
    Here each worker listens on its TF_CONFIG port and connects to every other's until all
    have answered both ways (then frees the port for TensorFlow), or gives up after `timeout`
    seconds with an error naming the workers that never answered. Python stays in control
    meanwhile, so SIGTERM and Ctrl+C stop the process.
    """
    me = task_address(spec)
    peers = [w for w in spec["workers"] if w != me]
    if not peers:
        return
    port = int(me.rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as err:
        listener.close()
        raise UserInputError(f"TF_CONFIG: this worker's port {port} ({me}) is busy ({err.strerror}); "
                             "free it or give the worker another port.") from None
    listener.listen(len(peers) + 4)
    listener.settimeout(poll)
    print(f"Waiting up to {timeout:.0f} s (--peer-timeout) for the other worker(s) of "
          f"TF_CONFIG: {', '.join(peers)}.", file=sys.stderr)
    reached, heard, accepted = set(), 0, []
    deadline = time.monotonic() + timeout
    try:
        while len(reached) < len(peers) or heard < len(peers):
            if time.monotonic() > deadline:
                missing = [p for p in peers if p not in reached]
                raise UserInputError(
                    f"TF_CONFIG: worker(s) {', '.join(missing) or '(one connecting to us)'} did "
                    f"not answer within {timeout:.0f} s (--peer-timeout). Start every worker "
                    "named in TF_CONFIG, each with its own task index, or raise --peer-timeout.")
            for peer in peers:
                if peer in reached:
                    continue
                host, peer_port = peer.rsplit(":", 1)
                try:
                    with socket.create_connection((host, int(peer_port)), timeout=poll):
                        reached.add(peer)
                except OSError:
                    pass
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
                heard += 1
            except (socket.timeout, BlockingIOError):
                pass
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def choose_strategy(name: str = "auto", peer_timeout: float = 300.0):
    """auto: MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of several tasks,
    MirroredStrategy when more than one GPU is visible, else the default strategy."""
    if name not in STRATEGIES:
        raise UserInputError(f"--strategy {name}: choose auto, default, mirrored or multiworker.")
    spec = cluster_spec()
    if name == "auto":
        if spec and len(spec["workers"]) > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        if not spec:
            raise UserInputError("--strategy multiworker: set TF_CONFIG to describe the cluster "
                                 "and this worker's task.")
        wait_for_peers(spec, peer_timeout)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(local_devices())
    return tf.distribute.get_strategy()


def is_chief(strategy) -> bool:
    """True for the one process that writes checkpoints, logs and pictures."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return (resolver.task_type == "chief"
            or (resolver.task_type == "worker" and resolver.task_id == 0
                and "chief" not in resolver.cluster_spec().as_dict()))
