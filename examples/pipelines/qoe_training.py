"""The QoE training pipeline: learns the mean downlink throughput per UE (`throughputDl`) of a cell from its other
KPIs. Compiled to qoe_training.yaml by compile.py; see examples/README.md for the contract with the training manager.
"""
from kfp import dsl

from qoe_components import check_target_column, train_model


@dsl.pipeline(
    name="qoe-training",
    description="Trains a QoE regressor (StandardScaler + SGDRegressor) on a cell-KPI dataset (CSV).",
)
def qoe_training(
    dataset_uri: str,
    trainingjob_id: str = "",
    featurepath: str = "",
    modelname: str = "qoe",
    modelversion: str = "1",
    artifactversion: str = "1.0.0",
    epochs: str = "10",
    target: str = "throughputDl",
):
    check = check_target_column(dataset_uri=dataset_uri, target=target)
    check.set_caching_options(False)  # the same dataset_uri may hold new data
    train = train_model(
        dataset_uri=dataset_uri,
        features=check.output,
        target=target,
        epochs=epochs,
        modelname=modelname,
        modelversion=modelversion,
        artifactversion=artifactversion,
        trainingjob_id=trainingjob_id,
        featurepath=featurepath,
        warm_start=False,
        previous_model_uri="",
    )
    train.set_caching_options(False)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(qoe_training, "qoe_training.yaml")
