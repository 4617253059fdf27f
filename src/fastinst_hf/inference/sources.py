"""What `predict` reads: images, video files, URLs (files and live streams) and webcams, decoded by PyAV (FFmpeg).

Spellings: a path (image or video, by extension; a folder or glob gives both kinds), `http(s)://...`, `rtsp://...`
(also rtmp, srt, udp, tcp), and `webcam:N` for camera N (`/dev/videoN` through V4L2 on Linux, AVFoundation device N
on macOS).
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import numpy as np

from ..utils.errors import InputError, one_line
from ..utils.images import IMAGE_EXTENSIONS, collect_image_paths, is_image_name

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "srt", "udp", "tcp")
URL_SCHEMES = ("http", "https", *STREAM_SCHEMES)
WEBCAM_PREFIX = "webcam:"
# Seconds to wait for a URL or camera to answer (opening) and for each read after that.
OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Source:
    """One input: `kind` "image", "video" (a file or URL) or "camera"; `name` (a file name: a path's, a URL's
    last path part) gives its outputs' stem."""

    spec: str
    kind: str
    name: str

    @property
    def is_url(self) -> bool:
        return is_url(self.spec)


def is_url(spec: str) -> bool:
    return urllib.parse.urlsplit(spec).scheme.lower() in URL_SCHEMES


def is_video_name(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def url_name(url: str) -> str:
    """A URL's file name: its last path part (else its host)."""
    parts = urllib.parse.urlsplit(url)
    return PurePosixPath(urllib.parse.unquote(parts.path)).name or parts.hostname or "stream"


def collect_sources(specs: Sequence[str]) -> list[Source]:
    """Every SOURCE as `Source`s, in order: URLs and `webcam:N` as given, paths expanded like images (a folder or
    glob contributes its images and videos). Raises `InputError` for a missing file, an empty folder or a pattern
    without matches, or a bad `webcam:` number."""
    sources, seen = [], set()
    for spec in specs:
        if spec.startswith(WEBCAM_PREFIX):
            camera_index(spec)  # checked now, before the model loads
            sources.append(Source(spec, "camera", spec.replace(":", "")))
        elif is_url(spec):
            sources.append(Source(spec, "video", url_name(spec)))
        else:
            for path in collect_image_paths([spec], IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
                if os.path.realpath(path) in seen:  # the same file reached twice is done once
                    continue
                seen.add(os.path.realpath(path))
                kind = "video" if is_video_name(path) and not is_image_name(path) else "image"
                sources.append(Source(str(path), kind, path.name))
    return sources


def camera_index(spec: str) -> int:
    number = spec[len(WEBCAM_PREFIX) :]
    if not number.isdigit():
        raise InputError(f"{spec}: expected webcam:N with N a camera number (webcam:0 is the first camera)")
    return int(number)


def _open_container(spec: str):
    """`av.open` for a path, URL or `webcam:N`, with timeouts; `InputError` naming the source when it fails."""
    import av

    options, file, format_name = {}, spec, None
    if spec.startswith(WEBCAM_PREFIX):
        index = camera_index(spec)
        if sys.platform == "darwin":
            file, format_name = str(index), "avfoundation"
        else:
            file, format_name = f"/dev/video{index}", "v4l2"
            if not Path(file).exists():
                raise InputError(f"{spec}: no webcam ({file} does not exist)")
    elif urllib.parse.urlsplit(spec).scheme.lower() in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"  # UDP loses packets through NAT and firewalls
    try:
        return av.open(file, format=format_name, options=options, timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
    except av.EOFError as error:
        raise InputError(f"cannot read video {spec}: it ends before its first frame (no frames)") from error
    except (av.FFmpegError, OSError) as error:
        raise InputError(f"cannot read video {spec}: {ffmpeg_message(error)}") from error


def ffmpeg_message(error: BaseException) -> str:
    """FFmpeg's message without the errno and file name PyAV adds around it."""
    return one_line(getattr(error, "strerror", None) or error)


class VideoSource:
    """The frames of a video file, URL or camera: `width`, `height`, `rate` (frames/s, `Fraction`), `frames`
    (expected count, 0 when unknown), `live` (a camera or stream without an end: the newest frame is taken).

    After iteration, `error` holds the message of a decoding error that ended it early (a truncated or corrupt
    clip: the frames before it were yielded), else None.
    """

    def __init__(self, source: Source | str):
        self.source = source if isinstance(source, Source) else collect_sources([source])[0]
        self.container = _open_container(self.source.spec)
        if not self.container.streams.video:
            self.close()
            raise InputError(f"cannot read video {self.source.spec}: it has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # FFmpeg's frame + slice threads
        context = self.stream.codec_context
        self.width, self.height = context.width, context.height
        self.rate = Fraction(self.stream.average_rate or self.stream.guessed_rate or 30)
        duration = self.container.duration  # microseconds, None for live streams
        self.live = self.source.kind == "camera" or (
            self.source.is_url and (duration is None or self.source.spec.lower().startswith(STREAM_SCHEMES))
        )
        self.frames = self.stream.frames or (round(duration / 1e6 * self.rate) if duration else 0)
        self.error: str | None = None

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        """`(frame index, time in s from the first frame, (H, W, 3) uint8 RGB)` for every frame."""
        import av

        start = None
        index = -1
        try:
            for index, frame in enumerate(self.container.decode(self.stream)):
                time = frame.time if frame.time is not None else index / self.rate
                start = time if start is None else start
                yield index, round(float(time - start), 6), frame.to_ndarray(format="rgb24")
        except (av.FFmpegError, OSError) as error:
            self.error = ffmpeg_message(error)
        if not self.live and self.error is None and 0 <= index < self.frames - 2:  # (duration-based count: +-1)
            self.error = f"the clip ends after {index + 1} of its {self.frames} frames (truncated?)"
        if index < 0:
            reason = f": {self.error}" if self.error else ""
            raise InputError(f"cannot read video {self.source.spec}: no frame could be decoded{reason}")

    def close(self) -> None:
        self.container.close()
