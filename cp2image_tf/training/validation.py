"""Validation during fit: pixel metrics of the validation cells against the mean training
image, the best checkpoint, and the real-vs-generated pictures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

def load_val_cells(data_dir, manifest, config, limit):
    """The first `limit` validation cells (deterministic order): features, crops, treatments."""
    from tfrecords_tools.reader import make_dataset

    split = "val" if manifest["counts"]["splits"]["val"] else "train"
    ds = make_dataset(data_dir, split, 256, shuffle=False, repeat=False, with_metadata=True,
                      scaling=config.scaling, normalization=config.normalization, manifest=manifest)
    feats, crops, treatments, ids = [], [], [], []
    total = 0
    for f, c, meta in ds:
        feats.append(f.numpy())
        crops.append(c.numpy())
        treatments += [t.decode() for t in meta["treatment"].numpy()]
        ids += [i.decode() for i in meta["cell_id"].numpy()]
        total += len(f)
        if total >= limit:
            break
    return (np.concatenate(feats)[:limit], np.concatenate(crops)[:limit], treatments[:limit],
            ids[:limit], split)

def mean_training_image(data_dir, manifest, config, limit=4096):
    """The mean training crop (the baseline a decoder must beat), over up to `limit` cells."""
    from tfrecords_tools.reader import make_dataset

    ds = make_dataset(data_dir, "train", 256, shuffle=False, repeat=False,
                      scaling=config.scaling, manifest=manifest)
    total, count = None, 0
    for _, crops in ds:
        crops = crops.numpy().astype(np.float64)
        total = crops.sum(0) if total is None else total + crops.sum(0)
        count += len(crops)
        if count >= limit:
            break
    return (total / count).astype(np.float32)

def grid_indices(treatments, n):
    """Up to n validation cells, one per treatment first, in a fixed order."""
    chosen, seen = [], set()
    for i, t in enumerate(treatments):
        if t not in seen and len(chosen) < n:
            chosen.append(i)
            seen.add(t)
    for i in range(len(treatments)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen

def pixel_metrics(generated, real):
    """Mean pixel MSE and SSIM over the cells (images in [0, 1]), as `evaluate` computes them."""
    from cp2image_tf.metrics import pixel_metrics as per_cell

    values = per_cell(generated, real)
    return float(values["mse"].mean()), float(values["ssim"].mean())

class Validator:
    """Validation pixel metrics against the mean training image, and the sample pictures."""

    def __init__(self, trainer, data_dir, run_dir: Path, manifest: dict, config,
                 chief: bool):
        import tensorflow as tf

        self.trainer, self.run_dir, self.manifest, self.chief = trainer, run_dir, manifest, chief
        (self.feats, self.crops, self.treatments, self.ids,
         self.split) = load_val_cells(data_dir, manifest, config, config.val_cells)
        mean_image = mean_training_image(data_dir, manifest, config)
        self.baseline_mse, self.baseline_ssim = pixel_metrics(
            np.broadcast_to(mean_image, self.crops.shape).copy(), self.crops)
        self.grid = grid_indices(self.treatments, config.grid_cells)
        self.writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
        self.infer = tf.function(trainer.generate)
        if chief:
            (run_dir / "samples").mkdir(exist_ok=True)

    def __call__(self, step: int) -> tuple[float, float]:
        import tensorflow as tf

        generated = np.concatenate([self.infer(tf.constant(self.feats[i:i + 256])).numpy()
                                    for i in range(0, len(self.feats), 256)])
        mse, ssim = pixel_metrics(generated, self.crops)
        if self.chief and self.grid:
            self.save_pictures(step, generated, mse, ssim)
        if self.chief:
            with self.writer.as_default(step=step):
                tf.summary.scalar("val/pixel_mse", mse)
                tf.summary.scalar("val/ssim", ssim)
                tf.summary.scalar("val/mean_image_mse", self.baseline_mse)
        return mse, ssim

    def save_pictures(self, step, generated, mse, ssim) -> None:
        import tensorflow as tf

        from cp2image_tf.viz import composite, save_grid

        grid = self.grid
        rows = {"real": self.crops[grid], "generated": generated[grid]}
        labels = [f"{self.treatments[i]}\n{self.ids[i]}" for i in grid]
        title = (f"step {step}: {self.split} cells, val MSE {mse:.4f} "
                 f"(mean image {self.baseline_mse:.4f}), SSIM {ssim:.3f}")
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        save_grid(path, rows, self.manifest["channels"], labels, title)
        shutil.copyfile(path, self.run_dir / "samples" / "latest.png")
        with self.writer.as_default(step=step):
            pair = np.concatenate([rows["real"], rows["generated"]], axis=2)
            tf.summary.image("val/real_vs_generated", composite(pair, self.manifest["channels"]),
                             max_outputs=len(grid))

def validate_and_keep_best(validator, step: int, row: dict, best: dict, best_manager,
                           best_file: Path) -> dict:
    """Validate at `step` (into `row`); save the best checkpoint when the pixel MSE improves,
    or at every validation for a trainer that is not judged by pixels (best_by_pixel_mse)."""
    mse, ssim = validator(step)
    row.update(val_mse=mse, val_ssim=ssim, baseline_mse=validator.baseline_mse)
    if mse < best["val_mse"] or not validator.trainer.best_by_pixel_mse:
        best_manager.save(checkpoint_number=step)
        best = {"step": step, "val_mse": mse, "val_ssim": ssim}
        if validator.chief:
            best_file.write_text(json.dumps(best, indent=1) + "\n")
    return best
