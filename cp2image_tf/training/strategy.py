"""Choosing the tf.distribute strategy: one device, all local devices, or several machines."""
from __future__ import annotations

import json
import os

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


def choose_strategy(name: str = "auto"):
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
