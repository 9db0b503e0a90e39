"""Finding a checkpoint that reads: a run folder's checkpoints newest first, each read in full
before it is used, so a truncated or half-copied file is skipped (resume) or named (export)
instead of failing deep inside TensorFlow."""
from __future__ import annotations

from pathlib import Path


def checkpoint_step(path) -> int:
    """The step in a checkpoint prefix (ckpt-<step>)."""
    return int(str(path).rsplit("-", 1)[1])


def checkpoint_paths(folder) -> list[str]:
    """The checkpoint prefixes a CheckpointManager keeps in `folder`, newest first."""
    import tensorflow as tf

    # Absolute: TensorFlow joins the state file's relative entries with the folder as given,
    # so a relative RUN_DIR must not be joined again.
    folder = Path(folder).absolute()
    if not folder.is_dir():
        return []
    state = tf.train.get_checkpoint_state(str(folder))
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    paths = [p if Path(p).is_absolute() else str(folder / p) for p in paths if p]
    return sorted(dict.fromkeys(paths), key=checkpoint_step, reverse=True)


def unreadable(path) -> str | None:
    """Why the checkpoint `path` cannot be read (None when every tensor in it reads)."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(path))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - any failure to read is the answer
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return None


def newest_readable(folder) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint of `folder` that reads, [(skipped newer path, why)])."""
    skipped = []
    for path in checkpoint_paths(folder):
        problem = unreadable(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def restore_matching(checkpoint, path, partial: bool = False) -> None:
    """Restore `path` into a tf.train.Checkpoint whose objects must all be in it with the shapes
    this version builds. A checkpoint written by another version of cp2image-tf (or for
    another model) raises UserInputError naming it, instead of TensorFlow's shape traceback."""
    from tfrecords_tools.errors import UserInputError

    try:
        status = checkpoint.restore(str(path))
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except (ValueError, AssertionError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"{path}: this checkpoint does not fit the network this version of cp2image-tf "
            f"builds for the run's config.json ({text[:300]}). It was written by another "
            "version; export it with that version, or train a new RUN_DIR.") from None
