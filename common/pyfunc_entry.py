"""The code of a prism MLflow Model (models-from-code: MLflow runs this file to build the
model; see ``common/pyfunc.py``)."""

from mlflow.models import set_model

from common.pyfunc import PrismModel

set_model(PrismModel())
