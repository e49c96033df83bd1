"""Compiles the example pipelines to YAML: `python examples/pipelines/compile.py [OUTPUT_DIR]`.

Writes qoe_training.yaml and qoe_retraining.yaml into OUTPUT_DIR (default: this folder, where the committed
YAMLs are). Run it after changing qoe_components.py, qoe_training.py or qoe_retraining.py.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the pipeline modules import qoe_components from this folder

from kfp import compiler  # noqa: E402

from qoe_retraining import qoe_retraining  # noqa: E402
from qoe_training import qoe_training  # noqa: E402

PIPELINES = {"qoe_training.yaml": qoe_training, "qoe_retraining.yaml": qoe_retraining}


def main() -> None:
    output_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    output_dir.mkdir(parents=True, exist_ok=True)
    for file_name, pipeline in PIPELINES.items():
        compiler.Compiler().compile(pipeline, str(output_dir / file_name))
        print(f"wrote {output_dir / file_name}")


if __name__ == "__main__":
    main()
