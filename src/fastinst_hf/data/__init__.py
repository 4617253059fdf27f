"""Training and evaluation data: COCO parsing and validation, augmentation, datasets, collation, synthetic data."""
