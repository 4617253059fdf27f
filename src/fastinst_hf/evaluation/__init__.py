"""COCO mask AP: the evaluator (faster-coco-eval) and the evaluation loop."""
