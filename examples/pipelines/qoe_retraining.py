"""The QoE retraining pipeline: like qoe_training, but continues from the previous model when the training manager
passes `previous_model_uri` (the path of the previous artifact's Model.zip). Compiled to qoe_retraining.yaml by
compile.py; see examples/README.md.
"""
from kfp import dsl

from qoe_components import check_target_column, train_model


@dsl.pipeline(
    name="qoe-retraining",
    description="Retrains the QoE regressor: warm start from the previous Model.zip when there is one.",
)
def qoe_retraining(
    dataset_uri: str,
    trainingjob_id: str = "",
    featurepath: str = "",
    modelname: str = "qoe",
    modelversion: str = "1",
    artifactversion: str = "1.0.0",
    epochs: str = "10",
    target: str = "throughputDl",
    previous_model_uri: str = "",
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
        warm_start=True,
        previous_model_uri=previous_model_uri,
    )
    train.set_caching_options(False)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(qoe_retraining, "qoe_retraining.yaml")
