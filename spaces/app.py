"""Hugging Face Space entry point: the `fastinst-hf demo` app for the model named by the Space variable
`FASTINST_MODEL` (a Hub repo id, an official variant name such as `fastinst-d3-r50`, or `default`: the demo model
embedded in the package, trained on synthetic shapes)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fastinst_hf.demo.app import build_app  # noqa: E402

MODEL = os.environ.get("FASTINST_MODEL", "fastinst-d3-r50")

app = build_app(MODEL)

if __name__ == "__main__":
    app.queue().launch()
