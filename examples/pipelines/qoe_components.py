"""The two components of the QoE example pipelines (qoe_training.py, qoe_retraining.py).

Lightweight kfp v2 components: the compiler copies each function's source into the pipeline YAML, so every import
a component needs is inside its function, and nothing outside a function (no helper) is available when it runs.

Both are declared with `install_kfp_package=False, packages_to_install=[]`: the task then runs in the image as it
is, with no `pip install` at run time. That is what makes them run offline with `kfp.local.SubprocessRunner
(use_venv=False)` (the training manager's embedded engine), where the task runs in the service's own Python, which
has kfp, pandas and scikit-learn.
"""
from kfp import dsl
from kfp.dsl import Metrics, Model, Output

# The image of the tasks on a real Kubeflow cluster. kfp.local's SubprocessRunner ignores it. `python:3.11-slim`
# does NOT have the packages the tasks need: a real cluster needs an image with Python 3.11 and kfp (2.17.x),
# pandas, numpy, scikit-learn and joblib installed (for instance one built `FROM python:3.11-slim` with
# `pip install kfp==2.17.3 pandas scikit-learn joblib`), and this constant set to it before compiling.
BASE_IMAGE = "python:3.11-slim"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, packages_to_install=[])
def check_target_column(dataset_uri: str, target: str) -> str:
    """Checks the dataset before training: a readable CSV file with a header row, holding the numeric column
    `target` and at least one other numeric column (the features), with enough complete rows.

    Returns the feature columns, as a JSON list. Its task is named after the check that matters most, because
    kfp.local reports only the name of the task that failed ("Inner task failed: 'check-target-column'"); the
    full reason goes to the task's log.
    """
    import json
    import os

    import pandas as pd

    if not dataset_uri:
        raise ValueError("dataset_uri is empty: the pipeline needs the path of the dataset's CSV file")
    if not os.path.isfile(dataset_uri):
        raise FileNotFoundError(f"dataset_uri {dataset_uri!r} is not a file")
    frame = pd.read_csv(dataset_uri)
    columns = [str(c) for c in frame.columns]
    if target not in columns:
        raise ValueError(
            f"the target column {target!r} is not among the dataset's columns {columns}: "
            f"add it to the feature group's feature_list, or set the pipeline parameter 'target'"
        )
    if not pd.api.types.is_numeric_dtype(frame[target]):
        raise ValueError(f"the target column {target!r} is not numeric (dtype {frame[target].dtype})")
    features = [
        c for c in columns if c != target and pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any()
    ]
    if not features:
        raise ValueError(f"the dataset has no numeric column besides the target {target!r}: nothing to learn from")
    complete = int(frame[features + [target]].dropna().shape[0])
    if complete < 10:
        raise ValueError(f"the dataset has only {complete} complete rows (numeric features and target): need 10")
    print(f"dataset {dataset_uri}: {len(frame)} rows, target {target!r}, features {features}")
    return json.dumps(features)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False, packages_to_install=[])
def train_model(
    dataset_uri: str,
    features: str,
    target: str,
    epochs: str,
    modelname: str,
    modelversion: str,
    artifactversion: str,
    trainingjob_id: str,
    featurepath: str,
    warm_start: bool,
    previous_model_uri: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fits StandardScaler + SGDRegressor on 80 % of the rows (fixed seed), `epochs` passes of partial_fit, and
    scores it on the other 20 %.

    With warm_start, if previous_model_uri names an existing Model.zip of this pipeline (model.joblib inside),
    training continues from that model: its scaler is kept and its regressor runs `epochs` more passes on the new
    data. Otherwise (no previous model, or one this pipeline cannot continue) it trains from scratch; metadata.json
    and the metric warm_started (1 or 0) say which happened.

    Writes the folder `model`: model.joblib (a fitted sklearn Pipeline: predict(DataFrame of the features)) and
    metadata.json.
    """
    import datetime
    import json
    import math
    import os
    import tempfile
    import zipfile
    from pathlib import Path

    import joblib
    import numpy as np
    import pandas as pd
    import sklearn
    from sklearn.linear_model import SGDRegressor
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    seed = 42
    try:
        passes = int(str(epochs).strip())
    except ValueError:
        raise ValueError(f"epochs must be a whole number, got {epochs!r}") from None
    if passes < 1:
        raise ValueError(f"epochs must be at least 1, got {passes}")
    feature_names = list(json.loads(features))
    frame = pd.read_csv(dataset_uri)

    # ------------------------------------------------------------------ the previous model, when retraining
    previous = None  # the loaded sklearn Pipeline
    warm_start_info = None
    skipped = None  # why a retraining started from scratch
    if warm_start:
        source = (previous_model_uri or "").strip()
        if not source:
            skipped = "previous_model_uri is empty"
        elif not os.path.isfile(source):
            skipped = f"previous_model_uri {source!r} is not a file"
        elif not zipfile.is_zipfile(source):
            skipped = f"previous_model_uri {source!r} is not a zip file"
        else:
            unpacked = Path(tempfile.mkdtemp(prefix="previous-model-"))
            with zipfile.ZipFile(source) as archive:
                archive.extractall(unpacked)
            found = sorted(unpacked.rglob("model.joblib"), key=lambda p: len(p.parts))
            if not found:
                skipped = f"{source!r} holds no model.joblib: not a model of this pipeline"
            else:
                candidate = joblib.load(found[0])
                metadata_file = found[0].parent / "metadata.json"
                old = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
                old_features = [str(f) for f in getattr(candidate, "feature_names_in_", old.get("features", []))]
                missing = [f for f in old_features if f not in frame.columns]
                if not isinstance(candidate, Pipeline) or not hasattr(candidate[-1], "partial_fit"):
                    skipped = f"the model in {source!r} is not a Pipeline ending in a partial_fit regressor"
                elif old.get("target", target) != target:
                    skipped = f"the previous model predicts {old.get('target')!r}, not {target!r}"
                elif not old_features or missing:
                    skipped = f"the dataset lacks the previous model's features {missing or '(unknown)'}"
                else:
                    previous = candidate
                    feature_names = old_features  # the previous model's inputs, in its order
                    warm_start_info = {
                        "previous_model_uri": source,
                        "previous_modelname": old.get("modelname"),
                        "previous_modelversion": old.get("modelversion"),
                        "previous_artifactversion": old.get("artifactversion"),
                        "previous_trainingjob_id": old.get("trainingjob_id"),
                        "previous_trained_at": old.get("trained_at"),
                    }
        if skipped:
            print(f"retraining from scratch: {skipped}")
        else:
            print(f"warm start from {source}")

    # ------------------------------------------------------------------ data
    data = frame[feature_names + [target]].dropna()
    x = data[feature_names].astype(float)
    y = data[target].astype(float).to_numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)

    # ------------------------------------------------------------------ training
    if previous is not None:  # keep its scaler (the regressor's weights fit that scaling), train its regressor on
        pipeline = previous
        previous_r2 = float(r2_score(y_test, pipeline.predict(x_test)))
    else:
        pipeline = Pipeline(
            [("scaler", StandardScaler().fit(x_train)), ("regressor", SGDRegressor(random_state=seed))]
        )
        previous_r2 = None
    regressor = pipeline[-1]
    scaled = pipeline[:-1].transform(x_train) if len(pipeline) > 1 else x_train.to_numpy()
    order = np.random.RandomState(seed)
    for _ in range(passes):
        shuffled = order.permutation(len(y_train))
        regressor.partial_fit(scaled[shuffled], y_train[shuffled])

    # ------------------------------------------------------------------ scores
    predicted = pipeline.predict(x_test)
    scores = {
        "r2": float(r2_score(y_test, predicted)),
        "mae": float(mean_absolute_error(y_test, predicted)),
        "rmse": float(math.sqrt(mean_squared_error(y_test, predicted))),
        "rows_train": int(len(y_train)),
        "rows_test": int(len(y_test)),
    }
    if warm_start:
        scores["warm_started"] = 1 if previous is not None else 0
        if previous_r2 is not None:
            scores["previous_r2"] = previous_r2
    for name, value in scores.items():
        metrics.log_metric(name, value)
    print(f"scores: {scores}")

    # ------------------------------------------------------------------ the model folder
    os.makedirs(model.path, exist_ok=True)
    joblib.dump(pipeline, os.path.join(model.path, "model.joblib"))
    metadata = {
        "modelname": modelname,
        "modelversion": modelversion,
        "artifactversion": artifactversion,
        "trainingjob_id": trainingjob_id,
        "featurepath": featurepath,
        "features": feature_names,
        "target": target,
        "epochs": passes,
        "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": scores,
        "framework": f"scikit-learn {sklearn.__version__}",
        "estimator": "Pipeline(StandardScaler, SGDRegressor)",
    }
    if warm_start:
        metadata["warm_start"] = warm_start_info  # None: trained from scratch
        if skipped:
            metadata["warm_start_skipped"] = skipped
    with open(os.path.join(model.path, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    model.metadata.update({"framework": "scikit-learn", "target": target, "features": feature_names})
