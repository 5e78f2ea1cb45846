"""Each camera's video of the open episode, encoded while the episode runs (one thread per camera).

Why as it runs: staging every frame as a PNG and encoding the episode after its stop cost about a
core per two cameras on a small robot computer (PNG compression, then PNG decoding, then the encode),
and made the user wait for the encode after every episode. Here each camera has an encoder thread
fed by a bounded queue (about a second of frames; the writer blocks on it, so the recorder's own
bounded tick queue absorbs a slow moment, or drops and counts). Frames arrive as the cameras sent them:
raw RGB goes straight to the encoder, a JPEG camera's bytes are decoded by FFmpeg's MJPEG decoder to
YUV, which the encoder takes without an RGB round trip.

Crash safety: the encoder writes a *fragmented* MP4 (``movflags=frag_keyframe+empty_moov``; a fragment
per key frame, every 2 frames with LeRobot's GOP of 2) into the episode's work directory, so a
process killed by ``kill -9`` leaves a file whose complete fragments a demuxer still reads
(``read_stream``). When the episode is finished the packets are copied, without re-encoding, into
LeRobot's plain MP4 (``remux``).

Encoder settings are LeRobot's (``lerobot.datasets.video_utils.encode_video_frames``: GOP 2, CRF 30,
yuv420p; preset 12 for libsvtav1) plus, for h264/hevc, ``recorder.video_preset`` (x264's speed preset),
no B-frames (so packet order is frame order: a recovered stream is cut at any frame) and one encoder
thread per camera (several cameras share a small CPU better as several single-thread encoders).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.wire.images import JpegImage

log = logging.getLogger(__name__)

VIDEO_ENCODER_ALIASES = {"av1": "libsvtav1"}  # lerobot.configs.video.VIDEO_CODECS_ALIASES
_X26X = ("h264", "libx264", "hevc", "libx265")
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


def encoder_settings(vcodec: str, preset: str) -> tuple[str, dict[str, str]]:
    """FFmpeg encoder name and options: LeRobot's (GOP 2, CRF 30) plus the speed settings above."""
    encoder = VIDEO_ENCODER_ALIASES.get(vcodec, vcodec)
    options = {"g": "2", "crf": "30"}
    if encoder == "libsvtav1":
        options["preset"] = "12"
    elif encoder in _X26X:
        options.update(preset=preset, bf="0", threads="1")
    return encoder, options


def stats_sample(image: np.ndarray) -> np.ndarray:
    """A frame strided as LeRobot's ``compute_stats.auto_downsample_height_width`` (~150 px) for statistics."""
    side = max(image.shape[:2])
    step = side // 150 if side >= 300 else 1
    return np.ascontiguousarray(image[::step, ::step])


class PixelHistogram:
    """Per-channel counts of the 256 pixel values of every frame (strided as LeRobot strides for its
    statistics): the image statistics (min, max, mean, std, quantiles) follow exactly from it at the
    stop, in microseconds, instead of sorting millions of float pixels (seconds on a small CPU)."""

    def __init__(self) -> None:
        self.counts = np.zeros((3, 256), dtype=np.int64)

    def add(self, image: np.ndarray) -> None:
        sample = stats_sample(image)
        for channel in range(3):
            self.counts[channel] += np.bincount(sample[..., channel].ravel(), minlength=256)


@dataclass
class VideoResult:
    frames: int  # frames in the stream
    codec: str  # the encoder's codec name (e.g. "h264")
    histogram: PixelHistogram = field(default_factory=PixelHistogram)  # for the image statistics
    substituted: int = 0  # undecodable JPEG frames replaced by the previous frame (counted, logged)


class CameraVideo(threading.Thread):
    """Encodes one camera's frames into ``path`` (fragmented MP4) as they are ``put``."""

    def __init__(self, key: str, path: Path, *, width: int, height: int, fps: int, vcodec: str, preset: str,
                 max_pending: int) -> None:
        super().__init__(name=f"video-{key}", daemon=True)
        self.key = key
        self.path = path
        self.width, self.height, self.fps = width, height, fps
        self.encoder, self.options = encoder_settings(vcodec, preset)
        self.frames: queue.Queue[np.ndarray | JpegImage | None] = queue.Queue(maxsize=max(1, max_pending))
        self.result: VideoResult | None = None
        self.error: BaseException | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start()

    def put(self, image: np.ndarray | JpegImage) -> None:
        """Queue a frame (blocks while a second of frames waits: back-pressure on the recorder's writer)."""
        if self.error is not None:
            raise RuntimeError(f"{self.key}: the video encoder failed: {self.error}") from self.error
        self.frames.put(image)

    def pending(self) -> int:
        return self.frames.qsize()

    def close(self, *, discard: bool = False) -> VideoResult:
        """Encode what is queued, flush the encoder and close the file; raises if encoding failed.

        ``discard``: drop the frames still queued instead (a recorder being restarted exits sooner; the
        next one fills those ticks in from the actuator's backlog, without frames)."""
        while discard:
            try:
                self.frames.get_nowait()
            except queue.Empty:
                break
        self.frames.put(None)
        self.join()
        if self.error is not None or self.result is None:
            raise RuntimeError(f"{self.key}: the video encoder failed: {self.error}") from self.error
        return self.result

    def run(self) -> None:
        import av

        try:
            histogram = PixelHistogram()
            substituted = 0
            decoder = av.CodecContext.create("mjpeg", "r")
            with av.open(str(self.path), "w", format="mp4", options=FRAGMENTED_MP4) as output:
                stream = output.add_stream(self.encoder, self.fps, options=self.options)
                stream.pix_fmt, stream.width, stream.height = "yuv420p", self.width, self.height
                previous: Any = None
                index = 0
                while (image := self.frames.get()) is not None:
                    frame = self._frame(av, decoder, image)
                    if frame is None:  # an undecodable JPEG: keep the video aligned with the data
                        substituted += 1
                        if previous is None:
                            frame = av.VideoFrame.from_ndarray(np.zeros((self.height, self.width, 3), np.uint8),
                                                               format="rgb24")
                        else:
                            frame = previous
                    histogram.add(image if isinstance(image, np.ndarray) else frame.to_ndarray(format="rgb24"))
                    frame.pts = index
                    output.mux(stream.encode(frame))
                    previous = frame
                    index += 1
                output.mux(stream.encode())
                codec = stream.codec_context.name
            self.result = VideoResult(frames=index, codec=codec, histogram=histogram, substituted=substituted)
        except BaseException as exc:  # reported by put/close, which the writer thread calls
            log.exception("%s: video encoding failed", self.key)
            self.error = exc
            while True:  # unblock a writer waiting in put()
                try:
                    if self.frames.get(timeout=1.0) is None:
                        return
                except queue.Empty:
                    return

    def _frame(self, av: Any, decoder: Any, image: np.ndarray | JpegImage) -> Any:
        if isinstance(image, np.ndarray):
            return av.VideoFrame.from_ndarray(image, format="rgb24")
        try:
            frames = decoder.decode(av.Packet(image.payload.tobytes()))
        except av.error.FFmpegError as exc:
            log.warning("%s: undecodable JPEG frame (%s); the previous frame is repeated", self.key, exc)
            return None
        if not frames or (frames[0].height, frames[0].width) != (self.height, self.width):
            log.warning("%s: a JPEG frame did not decode to %dx%d; the previous frame is repeated", self.key,
                        self.width, self.height)
            return None
        return frames[0]


def readable_frames(path: Path) -> int:
    """Frames readable in a (possibly cut) fragmented MP4.

    A file cut by a crash ends inside a fragment: counting stops at the first error or damaged packet.
    """
    import av

    count = 0
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.dts is None or packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                if packet.is_corrupt:
                    break
                count += 1
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        log.info("%s: readable up to frame %d (%s)", path, count, exc)
    return count


def remux(source: Path, target: Path, frames: int) -> tuple[int, str]:
    """Copy the first ``frames`` frames of ``source`` (no re-encoding) into a plain MP4 at ``target``.

    Returns (frames copied, codec name)."""
    import av

    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as container:
        template = container.streams.video[0]
        codec = template.codec_context.name
        copied = 0
        with av.open(str(target), "w", format="mp4") as output:
            stream = output.add_stream_from_template(template)
            try:
                for packet in container.demux(template):
                    if packet.dts is None or packet.size == 0:
                        continue
                    if copied >= frames or packet.is_corrupt:
                        break
                    packet.stream = stream
                    output.mux(packet)
                    copied += 1
            except av.error.FFmpegError as exc:  # a cut file: what came before is kept
                log.info("%s: copied up to frame %d (%s)", source, copied, exc)
    return copied, codec


def decoded_histogram(path: Path, frames: int) -> PixelHistogram:
    """The pixel histogram of the first ``frames`` frames of a video (a recovered episode's statistics)."""
    import av

    histogram = PixelHistogram()
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= frames:
                break
            histogram.add(frame.to_ndarray(format="rgb24"))
    return histogram
