"""slmflow: small language models as first-class MLflow models.

Kept import-light on purpose: the ONNX GenAI flavor loads this package inside model servers.
"""

__version__ = "0.1.0"
