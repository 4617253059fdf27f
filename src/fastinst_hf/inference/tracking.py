"""Persistent instance ids across video frames: ByteTrack of the `trackers` library, fed with our boxes and scores."""

from __future__ import annotations

import numpy as np


def mask_boxes(masks) -> np.ndarray:
    """`(N, 4)` float `(x0, y0, x1, y1)` boxes (x1, y1 exclusive) of `(N, H, W)` non-empty bool masks."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[index] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


class InstanceTracker:
    """ByteTrack (class-agnostic, as upstream) over one video; `update` once per processed frame, in order.

    Every instance kept by the predictor (score >= `threshold`) is a high-confidence detection, so that each one is
    either matched to a track or starts one, and gets an id on its first frame.
    """

    def __init__(self, fps: float, threshold: float, lost_seconds: float = 1.0):
        import supervision  # a dependency of trackers (the optional `track` extra; `Predictor` checks it is there)
        from trackers import ByteTrackTracker

        self._detections = supervision.Detections
        self._tracker = ByteTrackTracker(
            lost_track_buffer=max(1, round(fps * lost_seconds)),
            frame_rate=fps,
            track_activation_threshold=threshold,
            high_conf_det_threshold=threshold,
            minimum_consecutive_frames=1,
        )

    def update(self, masks, scores) -> list[int | None]:
        """Track ids of this frame's instances (`(N, H, W)` masks, `(N,)` scores), in their order; None for an
        instance the tracker left unmatched."""
        index = np.arange(len(scores))  # carried through: the tracker may reorder the detections
        confidence = np.asarray(scores, dtype=np.float32)
        detections = self._detections(xyxy=mask_boxes(masks), confidence=confidence, data={"index": index})
        tracked = self._tracker.update(detections)
        ids: list[int | None] = [None] * len(scores)
        for position, track_id in zip(tracked.data.get("index", ()), tracked.tracker_id):
            ids[int(position)] = int(track_id) if track_id >= 0 else None
        return ids
