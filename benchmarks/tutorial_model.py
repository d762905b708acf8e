"""The reference tutorial's custom MLflow wrapper, ported faithfully to ONNX Runtime GenAI 0.18.

Kept here, never in the package: it is the baseline the benchmarks measure against. Faithful means
its design is kept: one `GeneratorParams` shared by every call (set up once in `load_context`), a
lock so that only one request runs at a time (the shared object is not safe otherwise), row 0
only, no batching, no streaming. The only changes are the API renames since 0.6 (`params.input_ids`
and `model.generate` are gone: a `Generator` loop replaces them) and `min_length`, which the
benchmark needs so every system generates the same number of tokens.
"""

from __future__ import annotations

import threading

import mlflow


class Phi3Model(mlflow.pyfunc.PythonModel):
    def __init__(self, max_length: int = 300, min_new_tokens: int = 0) -> None:
        self.max_length = max_length
        self.min_new_tokens = min_new_tokens

    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(context.artifacts["phi3-mini-onnx"])
        self.tokenizer = og.Tokenizer(self.model)
        self.params = og.GeneratorParams(self.model)
        self.lock = threading.Lock()

    def predict(self, context, model_input):
        import numpy as np

        prompt = model_input["prompt"][0]
        with self.lock:
            input_ids = self.tokenizer.encode(prompt)
            self.params.set_search_options(
                max_length=len(input_ids) + self.max_length,
                min_length=len(input_ids) + self.min_new_tokens,
                temperature=0.2,
            )
            generator = self.og.Generator(self.model, self.params)
            generator.append_tokens(input_ids)
            output = []
            while not generator.is_done():
                generator.generate_next_token()
                output.append(int(generator.get_next_tokens()[0]))
            return self.tokenizer.decode(np.array(output, dtype=np.int32))


def save(onnx_dir: str, path: str, new_tokens: int) -> None:
    """Save the baseline as the tutorial logs it: a pickled PythonModel plus the ONNX folder."""
    from mlflow.models import infer_signature

    example = {"prompt": "<|user|>\nHi<|end|>\n<|assistant|>\n"}
    mlflow.pyfunc.save_model(
        path,
        python_model=Phi3Model(max_length=new_tokens, min_new_tokens=new_tokens),
        artifacts={"phi3-mini-onnx": onnx_dir},
        signature=infer_signature(example, ["Run"]),
        pip_requirements=["onnxruntime-genai==0.18.0", "numpy"],
        code_paths=[__file__],
    )
