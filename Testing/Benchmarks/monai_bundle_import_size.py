"""Write two MONAI bundles of Model Zoo size with random weights, for timing `cimis import-model`
(docs/benchmarks.md): wholeBody_ct_segmentation's SegResNet (104 classes, 1.5 mm, 96^3 windows) and
swin_unetr_btcv_segmentation's SwinUNETR (13 classes, feature size 48).

    PYTHONPATH=CIMISLearner/Logic:Testing/Python/engine python Testing/Benchmarks/monai_bundle_import_size.py OUT
"""

import sys
from pathlib import Path

from monai.networks.nets import SegResNet, SwinUNETR
from model.conftest import write_bundle  # Testing/Python/engine/model/conftest.py


def channel_def(count: int) -> dict:
    names = {str(i): f"organ{i}" for i in range(1, count + 1)}
    return {"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", **names}}}}}


def main(out: Path) -> None:
    window = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96]}
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 105, "init_filters": 32,
            "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    write_bundle(out / "wholebody_segresnet", "SegResNet", net=SegResNet(**args), metadata_changes=channel_def(104),
                 inference_changes={"network_def": {"_target_": "SegResNet", **args}, "spacing": [1.5, 1.5, 1.5],
                                    "inferer": window})
    args = {"in_channels": 1, "out_channels": 14, "feature_size": 48}
    write_bundle(out / "btcv_swinunetr", "SwinUNETR", net=SwinUNETR(**args), metadata_changes=channel_def(13),
                 inference_changes={"network_def": {"_target_": "SwinUNETR", **args}, "spacing": [1.5, 1.5, 2.0],
                                    "inferer": window})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
