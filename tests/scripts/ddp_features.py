"""Feature extraction on two gloo DDP ranks or one process (argv[1]: devices); run by tests/test_callbacks_features.py."""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from _dist import assert_gloo_threads_joined
from _fakes import tiny_config

from m6lit.cli import finish_distributed
from m6lit.callbacks import FeatureWriter
from m6lit.data.datamodule import ImageTextDataModule
from m6lit.module import M6LitModule


def main(devices: int) -> None:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(vocab_size=384, max_seq_len=256), predict_task="features")
    data = ImageTextDataModule(predict=[{"kind": "demo", "num_samples": 9, "seed": 3}], batch_size=2, image_size=16)
    out = Path(os.environ["M6LIT_TEST_OUT"])
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                        callbacks=[FeatureWriter(str(out / f"features{devices}"), shard_size=2)])
    trainer.predict(module, data, return_predictions=False)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    finally:
        finish_distributed()
    assert_gloo_threads_joined()
