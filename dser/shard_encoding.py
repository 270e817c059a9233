"""One input clip in, 16 kHz mono 16-bit FLAC bytes out: the sharder's encoding side.

``dser.shards.build_shards`` hands every record's audio path to ``encode_all``, which runs
``encode_clip`` in this process or in a pool of spawned workers and yields the results in input
order (so the shards are byte-identical for any ``workers``)::

    soundfile read ─ checks: missing, unreadable, empty, truncated, non-finite
        ─ down-mix (mean of channels) ─ soxr resample (HQ) ─ int16, clipped samples counted
        ─ checks: too short, silent, clipped past --max-clipped ─ FLAC (PCM_16) bytes
                                         … or the reason the input is skipped

A clip longer than ``BLOCK_FRAMES`` input frames goes through the same steps block by block
(soxr's streaming resampler), in memory that does not grow with the clip. Workers die with the
sharder, SIGKILL included (``_worker_init``), and SIGINT/SIGTERM are held while the pool starts
(``_signals_held``), so a stop during start-up never leaves half-started workers behind.

Usage::

    from dser.shard_encoding import encode_all, encode_clip

    encode_clip(("a.wav", 16000, 0.25, 0.01))   # (flac_bytes, seconds, clipped) or a skip reason
    for result in encode_all(tasks, workers=8):  # the same, for each task, in order
        ...
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import soxr

__all__ = ["BLOCK_FRAMES", "encode_all", "encode_clip"]

# Bytes per sample of the uncompressed subtypes whose WAV data length tells the frame count.
_SAMPLE_WIDTH = {"PCM_U8": 1, "PCM_S8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3,
                 "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}

# Clips longer than this many input frames are decoded, resampled and encoded block by block
# (bounded memory); shorter ones in one go, as before. Tests lower it to stream small clips.
BLOCK_FRAMES = 1 << 22


class _BadAudio(Exception):
    """An input's audio cannot be used; the message is the reason recorded for the skip."""


def _wav_data_frames(path: str, subtype: str, channels: int) -> int | None:
    """Frames a RIFF/WAVE file's ``data`` chunk header promises, or None when unknowable.

    libsndfile quietly shortens a WAV whose data chunk runs past the end of the file, so a
    truncated WAV reads "fine" unless the header is checked by hand.
    """
    width = _SAMPLE_WIDTH.get(subtype)
    if width is None:
        return None
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                # 0 and 0xFFFFFFFF are what streaming writers leave when they never knew the length.
                return None if size in (0, 0xFFFFFFFF) else size // (width * channels)
            f.seek(size + (size & 1), os.SEEK_CUR)


def _open(path: str) -> sf.SoundFile:
    """``path`` opened for reading; a missing or unreadable file is ``_BadAudio`` with the reason."""
    if not os.path.isfile(path):
        raise _BadAudio("audio file missing")
    try:
        return sf.SoundFile(path)
    except sf.LibsndfileError as e:
        raise _BadAudio(f"unreadable audio ({e.error_string})") from e
    except RuntimeError as e:
        raise _BadAudio(f"unreadable audio ({e})") from e


def _to_int16(path: str, sample_rate: int) -> tuple[np.ndarray, int]:
    """Decode ``path`` to mono int16 at ``sample_rate``.

    Returns:
        (T,) int16 samples, and how many of them had to be clipped to 16-bit full scale
        (float input above 0 dBFS, or resampler overshoot).

    Raises:
        _BadAudio: missing, unreadable, empty, truncated or non-finite audio.
    """
    with _open(path) as f:
        sr_in, channels, subtype, frames, fmt = f.samplerate, f.channels, f.subtype, f.frames, f.format
        if frames == 0:
            raise _BadAudio("empty audio (0 samples)")
        # The bit-exact path: already what we store, so never scale through floats.
        exact = subtype == "PCM_16" and channels == 1 and sr_in == sample_rate
        try:
            data = f.read(dtype="int16" if exact else "float64", always_2d=True)  # (T, C)
        except RuntimeError as e:  # a FLAC/OGG cut short fails in the decoder
            raise _BadAudio(f"unreadable or truncated audio ({getattr(e, 'error_string', e)})") from e
    promised = _wav_data_frames(path, subtype, channels) if fmt == "WAV" else None
    if len(data) == 0:
        raise _BadAudio("empty audio (0 samples)")
    promised = max(frames, promised or 0)
    if len(data) < promised:
        raise _BadAudio(f"truncated audio: the header promises {promised} samples, "
                        f"the file holds {len(data)}")
    if exact:
        return data[:, 0], 0
    if not np.isfinite(data).all():
        raise _BadAudio("non-finite samples (NaN or inf) in the audio")
    x = data.mean(axis=1)  # (T,) down-mix: the mean keeps the level of correlated channels
    if sr_in != sample_rate:
        x = soxr.resample(x, sr_in, sample_rate, quality="HQ")  # (T',)
    # round(x * 32768) inverts the loader's int16 / 32768; what lies past full scale is clipped
    # (and counted: float input above 0 dBFS, resampler overshoot).
    x = np.round(x * 32768.0)
    clipped = int(np.count_nonzero((x > 32767) | (x < -32768)))
    return np.clip(x, -32768, 32767).astype(np.int16), clipped


def _encode_streamed(path: str, sample_rate: int, min_duration: float, max_clipped: float) -> tuple[bytes, float, int]:
    """``_to_int16`` + FLAC for a clip longer than one block, ``BLOCK_FRAMES`` input frames at a time.

    Memory stays at a few blocks plus the FLAC being written, whatever the clip's length: blocks
    are decoded, down-mixed, resampled by soxr's streaming resampler and written to the FLAC
    one after another, with clipped samples, silence and truncation counted per block.
    """
    with _open(path) as f:
        sr_in, channels, subtype, frames, fmt = f.samplerate, f.channels, f.subtype, f.frames, f.format
        exact = subtype == "PCM_16" and channels == 1 and sr_in == sample_rate
        promised = max(frames, (_wav_data_frames(path, subtype, channels) if fmt == "WAV" else None) or 0)
        stream = None if exact or sr_in == sample_rate else soxr.ResampleStream(
            sr_in, sample_rate, 1, dtype="float64", quality="HQ")
        buf = io.BytesIO()
        read = written = clipped = 0
        sound = False
        with sf.SoundFile(buf, "w", samplerate=sample_rate, channels=1, format="FLAC", subtype="PCM_16") as flac:
            while True:
                try:
                    block = f.read(BLOCK_FRAMES, dtype="int16" if exact else "float64", always_2d=True)  # (B, C)
                except RuntimeError as e:
                    raise _BadAudio(f"unreadable or truncated audio ({getattr(e, 'error_string', e)})") from e
                read += len(block)
                last = len(block) < BLOCK_FRAMES
                if exact:
                    out = block[:, 0]
                else:
                    if not np.isfinite(block).all():
                        raise _BadAudio("non-finite samples (NaN or inf) in the audio")
                    x = block.mean(axis=1)  # (B,)
                    del block
                    if stream is not None:
                        x = stream.resample_chunk(x, last=last)  # (B',)
                    x = np.round(x * 32768.0)
                    clipped += int(np.count_nonzero((x > 32767) | (x < -32768)))
                    out = np.clip(x, -32768, 32767).astype(np.int16)
                    del x
                sound = sound or bool(out.any())
                written += len(out)
                flac.write(out)
                del out
                if last:
                    break
    if read < promised:
        raise _BadAudio(f"truncated audio: the header promises {promised} samples, the file holds {read}")
    duration = written / sample_rate
    _check_clip(written, duration, sound, clipped, min_duration, max_clipped)
    data = buf.getvalue()
    del buf  # one copy of the FLAC, not two, goes back through the pool
    return data, duration, clipped


def _check_clip(samples: int, duration: float, sound: bool, clipped: int, min_duration: float,
                max_clipped: float) -> None:
    """The checks on a converted clip: too short, silent, clipped past ``max_clipped``."""
    if duration < min_duration:
        raise _BadAudio(f"too short: {duration:.3f} s (< min_duration {min_duration:g} s)")
    if not sound:
        raise _BadAudio("silent audio: every sample is zero")
    if clipped > max_clipped * samples:
        raise _BadAudio(f"clipped: {clipped} of {samples} samples ({clipped / samples:.1%}) lie past "
                        f"full scale (> --max-clipped {max_clipped:g}); lower its level, or raise --max-clipped")


def encode_clip(task: tuple) -> tuple[bytes, float, int] | str:
    """Worker entry point (top level, so spawned processes can import it).

    Args:
        task: ``(path, sample_rate, min_duration, max_clipped[, max_duration])``.

    Returns:
        ``(flac_bytes, duration_seconds, clipped_samples)``, or the reason the input is skipped.
    """
    path, sample_rate, min_duration, max_clipped, *rest = task
    max_duration = rest[0] if rest else None
    try:
        with _open(path) as f:
            frames, sr_in = f.frames, f.samplerate
        if max_duration is not None and frames / sr_in > max_duration:
            raise _BadAudio(f"too long: {frames / sr_in:.1f} s by its header (> --max-duration {max_duration:g} s)")
        if frames > BLOCK_FRAMES:
            return _encode_streamed(path, sample_rate, min_duration, max_clipped)
        # One block: today's one-shot path, so these shards stay byte-identical.
        audio, clipped = _to_int16(path, sample_rate)  # (T,) int16
        duration = len(audio) / sample_rate
        _check_clip(len(audio), duration, bool(audio.any()), clipped, min_duration, max_clipped)
        buf = io.BytesIO()
        sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
        return buf.getvalue(), duration, clipped
    except _BadAudio as e:
        return str(e)
    except (ValueError, OSError, RuntimeError) as e:  # soxr, file system, libsndfile on odd input
        return f"could not encode audio ({type(e).__name__}: {e})"



# prctl(2) option: the signal a process gets when the thread that created it dies.
_PR_SET_PDEATHSIG = 1


def _worker_init(parent: int) -> None:
    """Pool initializer: a worker dies with the sharder, however the sharder ends.

    A SIGKILLed parent runs no cleanup, so each worker asks the kernel for SIGKILL when its
    parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``) and also watches ``os.getppid()`` from a
    thread (any POSIX system; re-parenting changes it). SIGINT is ignored: a Ctrl-C reaches
    the whole process group, and the parent alone decides to stop, then terminates the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog below still works
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watchdog():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watchdog, name="dser-parent-watchdog", daemon=True).start()


def encode_all(tasks: list[tuple[str, int, float, float]], workers: int) -> Iterator[tuple[bytes, float, int] | str]:
    """Encode in input order, in this process or a pool of spawned ones."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(encode_clip, tasks)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with _signals_held() as held:
        pool = ctx.Pool(min(workers, len(tasks)), initializer=_worker_init, initargs=(os.getpid(),))
    with pool:
        held.deliver()  # a signal during start-up stops here, where leaving the block terminates the pool
        yield from pool.imap(encode_clip, tasks, chunksize=4)


class _signals_held:
    """Hold SIGINT and SIGTERM while a pool starts; ``deliver()`` raises the first one after.

    A signal while ``Pool()`` starts its workers (KeyboardInterrupt, ``Stopped``) would cut a
    worker's start-up data short, and ``Pool`` cleans up only after an ``Exception``: the
    half-started workers printed tracebacks after the sharder's last line. Held signals go to
    the handlers they were meant for, once the pool exists and the ``with pool`` block can
    terminate it. Outside the main thread (no handlers can be set) nothing is held.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "_signals_held":
        self.got: list[int] = []
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, lambda signum, _frame: self.got.append(signum)) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def deliver(self) -> None:
        if self.got:
            signal.raise_signal(self.got[0])
