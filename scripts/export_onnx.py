"""Export a bundle's user tower as an ONNX graph (BUNDLE/user_tower.onnx), checked against torch.

    python scripts/export_onnx.py bundles/ml100k
    llmkd serve bundles/ml100k --backend onnx

Needs onnx, onnxruntime and onnxscript (`pip install -e '.[onnx]'`). The graph maps left-padded histories
(B, L) int64 to user vectors (B, d) float32; see llmkd/serving/onnx.py.
"""

import argparse

from llmkd.commands.cli import run
from llmkd.serving.onnx import export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder (llmkd export)")
    args = p.parse_args()
    print(f"user tower -> {export_onnx(args.bundle)}")


if __name__ == "__main__":
    run(main)
