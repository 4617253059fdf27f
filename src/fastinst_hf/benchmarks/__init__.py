"""Speed benchmarks: runtimes side by side (`runtimes`), the training step (`training_step`), and the official
code in worker processes (`timing`). Used by `fastinst-hf benchmark`."""
