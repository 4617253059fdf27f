"""Sharing models on the Hugging Face Hub: model cards and pushing."""
