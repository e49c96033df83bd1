"""The bundled example (examples/): its dataset, its compiled pipelines, and real runs of them.

No mocks: each run is the service's own runner, `python -m trainingmgr.adapters.kfp_local_runner RUN_DIR`, on a
RUN_DIR laid out as the embedded pipeline engine lays it out (request.json in, result.json and output.log out),
running the committed YAMLs with kfp.local.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PIPELINES = EXAMPLES / "pipelines"
DATASET = EXAMPLES / "data" / "cell_kpis.csv"
TRAINING_YAML = PIPELINES / "qoe_training.yaml"
RETRAINING_YAML = PIPELINES / "qoe_retraining.yaml"
RUNNER_MODULE = "trainingmgr.adapters.kfp_local_runner"

# What a feature group's feature_list could hold: a subset of the columns, with non-numeric ones among them.
FEATURES = ["time", "cellId", "prbUsageDl", "activeUes", "pdcpBytesDl", "rsrpMean", "sinrMean", "throughputDl"]
PARAMETERS = {
    "featurepath": "cell_kpis_1",
    "modelname": "qoe",
    "modelversion": "1",
    "artifactversion": "1.0.0",
    "epochs": "3",
    "trainingjob_id": "1",
}
# Fields of a compiled YAML that may differ between two compilations of the same source.
VOLATILE = {"sdkVersion", "createTime", "creationTime", "timestamp"}


def _strip_volatile(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_volatile(v) for k, v in node.items() if k not in VOLATILE}
    if isinstance(node, list):
        return [_strip_volatile(v) for v in node]
    return node


def run_pipeline(run_dir: Path, pipeline_file: Path, parameters: dict[str, str]) -> tuple[dict[str, Any], str]:
    """One run exactly as the service makes it; returns result.json and the run's log."""
    run_dir.mkdir(parents=True)
    (run_dir / "request.json").write_text(
        json.dumps({"pipeline_file": str(pipeline_file), "parameters": parameters})
    )
    with open(run_dir / "output.log", "wb") as output:
        subprocess.run(
            [sys.executable, "-m", RUNNER_MODULE, str(run_dir)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    log = (run_dir / "output.log").read_text(errors="replace")
    result_file = run_dir / "result.json"
    assert result_file.is_file(), f"the runner wrote no result.json; its output:\n{log[-3000:]}"
    return json.loads(result_file.read_text()), log


def _succeeded(result: dict[str, Any], log: str) -> None:
    assert result["state"] == "SUCCEEDED", f"{result}\n--- log ---\n{log[-3000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="module")
def dataset_csv(work: Path) -> Path:
    """The dataset as data extraction would hand it over: exactly the feature group's feature_list columns."""
    path = work / "cell_kpis_1.csv"
    pd.read_csv(DATASET)[FEATURES].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def training_run(work: Path, dataset_csv: Path) -> tuple[dict[str, Any], str]:
    return run_pipeline(work / "run-training", TRAINING_YAML, {**PARAMETERS, "dataset_uri": str(dataset_csv)})


# ----------------------------------------------------------------------------------------------- the sources
def test_dataset_is_the_generators_output() -> None:
    spec = importlib.util.spec_from_file_location("make_dataset", EXAMPLES / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.make().to_csv(index=False, lineterminator="\n") == DATASET.read_text()
    committed = pd.read_csv(DATASET)
    assert 1500 <= len(committed) <= 2500
    assert {"time", "cellId", "throughputDl", "prbUsageDl", "sinrMean"} <= set(committed.columns)
    assert committed["cellId"].nunique() >= 3
    assert not committed.isna().any().any()


def test_committed_yamls_are_the_compiled_sources(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(PIPELINES / "compile.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for committed in (TRAINING_YAML, RETRAINING_YAML):
        fresh = yaml.safe_load((tmp_path / committed.name).read_text())
        assert _strip_volatile(fresh) == _strip_volatile(yaml.safe_load(committed.read_text())), (
            f"{committed} is stale: run `python examples/pipelines/compile.py`"
        )


@pytest.mark.parametrize(
    "pipeline_file, extra",
    [(TRAINING_YAML, []), (RETRAINING_YAML, ["previous_model_uri"])],
    ids=["training", "retraining"],
)
def test_pipeline_inputs_follow_the_contract(pipeline_file: Path, extra: list[str]) -> None:
    inputs = yaml.safe_load(pipeline_file.read_text())["root"]["inputDefinitions"]["parameters"]
    expected = ["dataset_uri", "trainingjob_id", "featurepath", "modelname", "modelversion", "artifactversion"]
    assert set(inputs) == set(expected + ["epochs", "target"] + extra)
    for name, spec in inputs.items():
        assert spec["parameterType"] == "STRING", name
        if name == "dataset_uri":
            assert not spec.get("isOptional") and "defaultValue" not in spec
        else:
            assert spec.get("isOptional") is True and "defaultValue" in spec, name
    assert inputs["target"]["defaultValue"] == "throughputDl"


# ----------------------------------------------------------------------------------------------- real runs
def test_training_run_succeeds_with_a_usable_model(training_run: tuple[dict[str, Any], str], dataset_csv: Path) -> None:
    result, log = training_run
    _succeeded(result, log)
    metrics = result["metrics"]
    assert metrics["r2"] > 0.5
    assert metrics["mae"] > 0 and metrics["rmse"] >= metrics["mae"]
    assert (metrics["rows_train"], metrics["rows_test"]) == (1600, 400)
    assert "warm_started" not in metrics

    folder = Path(result["model_path"])
    assert folder.is_dir()
    assert {p.name for p in folder.iterdir()} == {"model.joblib", "metadata.json"}
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["modelname"] == "qoe" and metadata["modelversion"] == "1"
    assert metadata["artifactversion"] == "1.0.0" and metadata["trainingjob_id"] == "1"
    assert metadata["featurepath"] == "cell_kpis_1" and metadata["target"] == "throughputDl"
    assert metadata["features"] == ["prbUsageDl", "activeUes", "pdcpBytesDl", "rsrpMean", "sinrMean"]
    assert metadata["epochs"] == 3 and metadata["trained_at"]
    assert metadata["metrics"] == metrics

    model = joblib.load(folder / "model.joblib")
    rows = pd.read_csv(dataset_csv).head(50)
    predicted = model.predict(rows[metadata["features"]])
    assert predicted.shape == (50,)
    assert abs(predicted.mean() - rows["throughputDl"].mean()) < rows["throughputDl"].std()


def test_retraining_warm_starts_from_the_previous_model_zip(
    training_run: tuple[dict[str, Any], str], work: Path, dataset_csv: Path
) -> None:
    first, log = training_run
    _succeeded(first, log)
    model_zip = work / "previous" / "Model.zip"
    model_zip.parent.mkdir()
    with zipfile.ZipFile(model_zip, "w") as archive:  # the folder's files at the top, as the service zips them
        for file in Path(first["model_path"]).iterdir():
            archive.write(file, file.name)

    parameters = {
        **PARAMETERS,
        "artifactversion": "1.0.1",
        "trainingjob_id": "2",
        "featurepath": "cell_kpis_2",
        "dataset_uri": str(dataset_csv),
        "previous_model_uri": str(model_zip),
    }
    result, log = run_pipeline(work / "run-retraining", RETRAINING_YAML, parameters)
    _succeeded(result, log)
    metrics = result["metrics"]
    assert metrics["warm_started"] == 1
    assert metrics["previous_r2"] == pytest.approx(first["metrics"]["r2"])  # same test rows, same model
    assert metrics["r2"] > 0.5

    metadata = json.loads((Path(result["model_path"]) / "metadata.json").read_text())
    assert metadata["artifactversion"] == "1.0.1"
    assert metadata["warm_start"]["previous_model_uri"] == str(model_zip)
    assert metadata["warm_start"]["previous_artifactversion"] == "1.0.0"
    assert metadata["warm_start"]["previous_trainingjob_id"] == "1"
    model = joblib.load(Path(result["model_path"]) / "model.joblib")
    assert model.predict(pd.read_csv(dataset_csv).head(5)[metadata["features"]]).shape == (5,)


def test_retraining_without_a_previous_model_trains_from_scratch(work: Path, dataset_csv: Path) -> None:
    parameters = {**PARAMETERS, "dataset_uri": str(dataset_csv), "previous_model_uri": ""}
    result, log = run_pipeline(work / "run-retraining-scratch", RETRAINING_YAML, parameters)
    _succeeded(result, log)
    assert result["metrics"]["warm_started"] == 0
    assert result["metrics"]["r2"] > 0.5
    metadata = json.loads((Path(result["model_path"]) / "metadata.json").read_text())
    assert metadata["warm_start"] is None
    assert "previous_model_uri is empty" in metadata["warm_start_skipped"]


def test_a_dataset_without_the_target_fails_naming_the_target(work: Path, dataset_csv: Path) -> None:
    no_target = work / "no_target.csv"
    pd.read_csv(dataset_csv).drop(columns=["throughputDl"]).to_csv(no_target, index=False)
    result, log = run_pipeline(work / "run-no-target", TRAINING_YAML, {**PARAMETERS, "dataset_uri": str(no_target)})
    assert result["state"] == "FAILED"
    # kfp.local reports only the failed task's name, which names the check; the task's exception is in the log,
    # where the service's pipeline engine picks it up for the job's error message.
    assert "check-target-column" in result["error"]
    assert "ValueError: the target column 'throughputDl' is not among the dataset's columns" in log
    assert "model_path" not in result
