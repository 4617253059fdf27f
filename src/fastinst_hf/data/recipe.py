"""The upstream (SparseInst/FastInst) training recipe's numbers: standard library only, so that the command line
shows them as defaults without importing torch."""

# Augmentation, see FastInstInstanceDatasetMapper: resize to one of these short edges (long side capped), or resize
# then crop a random size in CROP_SIZE_RANGE.
TRAIN_SHORT_EDGES = (416, 448, 480, 512, 544, 576, 608, 640)
TRAIN_MAX_SIZE = 853
CROP_RESIZE_SHORT_EDGES = (400, 500, 600)
CROP_SIZE_RANGE = (384, 600)

# Schedule: 368,750 iterations at batch 16 (~50 COCO epochs), lr x0.1 at 327,778 and 355,092.
UPSTREAM_MAX_STEPS = 368_750
UPSTREAM_LR_STEPS = (round(327_778 / 368_750, 3), round(355_092 / 368_750, 3))  # (0.889, 0.963)
