"""An epoch's evaluation: the val metrics with BN statistics of ``eval.bn_stats``, and of every mode on request."""

from __future__ import annotations

import time

from normlab.engine import bn_eval
from normlab.engine.build import Job
from normlab.run_spec import RunSpec

PRECISE_EPOCH = 0  # the training images PreciseBN draws: epoch 0's order and crops, which training never uses


def evaluate_epoch(spec: RunSpec, job: Job, epoch: int) -> dict[str, float]:
    """The epoch's val metrics with BN statistics of eval.bn_stats, and of every mode with eval.compare_bn_stats
    (columns val_error_<mode>, val_loss_<mode>). The running statistics training keeps are left as they were."""
    modes = bn_eval.MODES if spec.eval.compare_bn_stats else (str(spec.eval.bn_stats),)
    results, seconds = {}, {}
    for mode in modes:
        start = time.perf_counter()
        results[mode] = bn_eval.evaluate_bn(
            mode, job.model, job.loaders.test.epoch(epoch, shuffled=mode == "batch"),  # chunks that mix classes
            train_batches=job.loaders.train.epoch(PRECISE_EPOCH),
            per_worker=spec.batch.per_worker, total_batch=spec.batch.total_batch,
            precise_images=spec.eval.precise_images, device=spec.runtime.device, precision=spec.runtime.precision,
            ema_model=job.forward)
        seconds[mode] = time.perf_counter() - start  # results are read on the host: the device is done
    val = results[str(spec.eval.bn_stats)]
    row = {"val_loss": val["loss"], "val_error": val["error"]}
    if job.loaders.shape.num_classes > 10:
        row["val_error_top5"] = val["error_top5"]
    if spec.eval.compare_bn_stats:
        for mode, result in results.items():
            row.update({f"val_error_{mode}": result["error"], f"val_loss_{mode}": result["loss"],
                        f"eval_time_{mode}_s": seconds[mode]})
    return row
