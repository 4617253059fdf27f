"""The Gradio demo app (`fastinst-hf demo`, and the Space in `spaces/`): `demo.app.build_app` builds it; it needs
the optional `demo` extra (gradio)."""
