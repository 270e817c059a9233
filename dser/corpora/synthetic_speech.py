"""Synthetic emotional speech, one clip at a time: the voices and the DSP behind ``dser synth``.

``dser.corpora.synthetic`` writes the demo corpora; this module makes their audio. A clip is
drawn from an emotion profile, a speaker's voice and the clip's own random generator (the same
generator gives the same samples), by source-filter synthesis in numpy only::

    emotion profile x speaker voice x clip intensity
        |
        v
    prosody plan: words of syllables and pauses, pitch accents, vowel targets, consonant
                  onsets  ->  control tracks at the STFT frame rate (8 ms)
        |
        v
    glottal pulses (Rosenberg, F0(t); open quotient = voice quality) + aspiration noise
        --STFT--> x vocal-tract envelope (5 formant resonances, spectral tilt) --+
    fricative / burst noise --STFT--> x fricative envelope -------------------+--ISTFT--> speech
        |
        v
    level by emotion and speaker --> [natural: channel EQ, reverb, background noise, gain] --> WAV

The emotion cues follow the vocal-affect literature (Scherer 2003; Juslin & Laukka 2003):
anger is loud, fast, tense (bright spectrum) with high, wide-ranging pitch; happiness has the
highest pitch and widest range, fast and moderately loud; sadness is quiet, slow, breathy
(steep spectral tilt) with low, flat pitch and long pauses; neutral sits in between.
Valence/arousal/dominance are drawn around each class's position and scale with the same
per-clip intensity that scales the acoustic cues, so they agree with what one hears.
``measure_cues`` measures the cues back (tests check them).

Usage::

    from dser.corpora.synthetic_speech import clip_rng, make_voices, measure_cues, render_clip

    voice = make_voices("acted", speakers=4, seed=0)[1]
    audio, attributes = render_clip(clip_rng("acted", seed=0, index=7), voice, "angry", "acted")
    measure_cues(audio, 16000)["level_db"]
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from dser.labels import STYLES, get_label_set

# The standard 4-class set; a corpus's utterance i has emotion CLASSES[i % 4] (``synthesize``).
CLASSES = get_label_set("4class").classes

# Separate random streams per style: natural speakers are never acted speakers re-used,
# even under the same --seed.
_STREAM = {"acted": 101, "natural": 202}

# Clip length (s), before rounding to whole samples.
_DURATION = {"acted": (1.0, 3.5), "natural": (1.5, 4.5)}

# Speech level (dBFS RMS over active samples) of a neutral clip before natural's random gain.
_REFERENCE_DB = -30.0

# Vowel formant targets F1-F3 (Hz) for an adult male (Peterson & Barney 1952, rounded);
# F4 is fixed at 3500 Hz. Speakers scale them by their vocal-tract factor.
_VOWELS = np.array([
    [730, 1090, 2440],   # a
    [530, 1840, 2480],   # e
    [270, 2290, 3010],   # i
    [570, 840, 2410],    # o
    [300, 870, 2240],    # u
    [640, 1190, 2390],   # schwa
    [660, 1720, 2410],   # ae
], dtype=float)
_BANDWIDTHS = np.array([70.0, 100.0, 160.0, 220.0])
_FORMANT_WEIGHTS = (1.0, 0.6, 0.35, 0.25, 0.15)        # F1..F5 peak levels, parallel synthesis


@dataclass(frozen=True)
class EmotionProfile:
    """How one emotion sounds at full (acted) strength, relative to a speaker's habit.

    Attributes:
        f0_st: pitch level vs the speaker's base F0, in semitones.
        range_st: size of pitch accents, in semitones.
        level_db: loudness vs neutral.
        rate: speaking rate, syllables per second.
        open_quotient: glottal open quotient; low = tense and bright, high = lax and breathy.
        breath: share of aspiration noise in the voice source.
        tilt_db: spectral slope added above 500 Hz, dB per octave (positive = brighter).
        formant_shift: relative shift of all formants (smiling raises them).
        f1_shift: extra relative shift of F1 (a wider jaw opening raises it).
        pause_prob: probability of a pause between words.
        final_rise: probability that a phrase ends with a rising pitch.
        declination_st: pitch fall across the utterance, semitones.
        attack: exponent of the syllable envelope's onset; < 1 gives abrupt, forceful onsets.
        valence, arousal, dominance: the class's position in [0, 1].
    """

    f0_st: float
    range_st: float
    level_db: float
    rate: float
    open_quotient: float
    breath: float
    tilt_db: float
    formant_shift: float
    f1_shift: float
    pause_prob: float
    final_rise: float
    declination_st: float
    attack: float
    valence: float
    arousal: float
    dominance: float


PROFILES: dict[str, EmotionProfile] = {
    "neutral": EmotionProfile(f0_st=0.0, range_st=2.5, level_db=0.0, rate=4.3, open_quotient=0.6,
                              breath=0.08, tilt_db=0.0, formant_shift=0.0, f1_shift=0.0,
                              pause_prob=0.25, final_rise=0.1, declination_st=2.0, attack=1.0,
                              valence=0.5, arousal=0.4, dominance=0.5),
    "happy": EmotionProfile(f0_st=4.0, range_st=6.5, level_db=4.0, rate=5.0, open_quotient=0.5,
                            breath=0.06, tilt_db=2.0, formant_shift=0.05, f1_shift=0.02,
                            pause_prob=0.15, final_rise=0.6, declination_st=1.0, attack=0.8,
                            valence=0.85, arousal=0.7, dominance=0.6),
    "angry": EmotionProfile(f0_st=3.0, range_st=5.0, level_db=9.0, rate=5.5, open_quotient=0.35,
                            breath=0.03, tilt_db=5.0, formant_shift=0.0, f1_shift=0.10,
                            pause_prob=0.15, final_rise=0.05, declination_st=3.0, attack=0.4,
                            valence=0.15, arousal=0.85, dominance=0.8),
    "sad": EmotionProfile(f0_st=-2.5, range_st=1.2, level_db=-7.0, rate=3.0, open_quotient=0.8,
                          breath=0.35, tilt_db=-5.0, formant_shift=-0.04, f1_shift=-0.03,
                          pause_prob=0.5, final_rise=0.0, declination_st=3.0, attack=1.6,
                          valence=0.2, arousal=0.2, dominance=0.25),
}


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker's habits, shared by all of their clips.

    Attributes:
        speaker: speaker id (``acted_spk03``, ``natural_spk03``).
        gender: ``"F"`` or ``"M"``.
        f0: base pitch, Hz.
        tract: formant scale; shorter vocal tracts (women) have higher formants.
        open_quotient, breath, tilt_db, level_db: offsets added to every clip's value.
        rate: multiplier on speaking rate.
        range: multiplier on pitch-accent size.
        expressivity: multiplier on how strongly emotions show in this speaker's voice.
    """

    speaker: str
    gender: str
    f0: float
    tract: float
    open_quotient: float
    breath: float
    tilt_db: float
    level_db: float
    rate: float
    range: float
    expressivity: float


def make_voices(style: str, speakers: int, seed: int) -> list[Voice]:
    """Draw the speakers of one style (deterministic by ``seed``).

    Acted speakers are a homogeneous cast of trained actors; natural speakers come from a
    separate random stream with wider ranges (pitch, vocal tract, voice quality, level,
    rate, expressiveness), so the two corpora never share a voice.

    Args:
        style: ``acted`` or ``natural``.
        speakers: how many.
        seed: the corpus seed.

    Returns:
        One ``Voice`` per speaker; genders alternate F, M, F, ...
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    rng = np.random.default_rng([seed, _STREAM[style], 0])
    acted = style == "acted"
    voices = []
    for i in range(speakers):
        gender = "F" if i % 2 == 0 else "M"
        if acted:
            f0 = rng.uniform(195, 235) if gender == "F" else rng.uniform(105, 130)
            tract = rng.uniform(1.12, 1.2) if gender == "F" else rng.uniform(0.97, 1.03)
        else:
            f0 = rng.uniform(160, 260) if gender == "F" else rng.uniform(85, 150)
            tract = rng.uniform(1.05, 1.25) if gender == "F" else rng.uniform(0.9, 1.06)
        spread = 1.0 if acted else 1.6
        voices.append(Voice(
            speaker=f"{style}_spk{i:02d}", gender=gender, f0=f0, tract=tract,
            open_quotient=rng.normal(0, 0.03 * spread), breath=abs(rng.normal(0, 0.02 * spread)),
            tilt_db=rng.normal(0, 0.7 * spread), level_db=rng.normal(0, 1.0 * spread),
            rate=float(np.exp(rng.normal(0, 0.05 * spread))),
            range=rng.uniform(0.9, 1.1) if acted else rng.uniform(0.6, 1.4),
            expressivity=rng.uniform(0.95, 1.05) if acted else rng.uniform(0.6, 1.4)))
    return voices


def clip_rng(style: str, seed: int, index: int) -> np.random.Generator:
    """The random generator of a corpus's clip ``index``: everything random about the clip
    comes from it, in a stream of its own (apart from the voices', ``make_voices``)."""
    return np.random.default_rng([seed, _STREAM[style], 1, index])


# ---------------------------------------------------------------------------------------------
# One clip


def _clip_profile(rng: np.random.Generator, voice: Voice, emotion: str, style: str
                  ) -> tuple[EmotionProfile, float]:
    """The emotion's profile at this clip's intensity, plus speaker habit and clip-level spread.

    Every cue is interpolated from neutral toward the emotion by the clip's intensity (about 1
    for acted; 0.7 on average for natural, times a speaker expressivity of 0.6-1.4), and
    natural clips and speakers scatter more around it, so natural classes overlap.
    """
    acted = style == "acted"
    if acted:
        intensity = rng.uniform(0.85, 1.15) * voice.expressivity
    else:
        intensity = float(np.clip(rng.normal(0.7, 0.15), 0.2, 1.0)) * voice.expressivity
    neutral, target = PROFILES["neutral"], PROFILES[emotion]
    mixed = {f.name: (1 - intensity) * getattr(neutral, f.name) + intensity * getattr(target, f.name)
             for f in fields(EmotionProfile)}
    mixed["rate"] = neutral.rate * (target.rate / neutral.rate) ** intensity
    spread = 1.0 if acted else 1.2
    p = replace(
        EmotionProfile(**mixed),
        f0_st=mixed["f0_st"] + rng.normal(0, 0.7 * spread),
        range_st=max(0.3, mixed["range_st"] * voice.range * np.exp(rng.normal(0, 0.1 * spread))),
        level_db=mixed["level_db"] + voice.level_db + rng.normal(0, 1.0 * spread),
        rate=mixed["rate"] * voice.rate * np.exp(rng.normal(0, 0.06 * spread)),
        open_quotient=float(np.clip(mixed["open_quotient"] + voice.open_quotient
                                    + rng.normal(0, 0.03 * spread), 0.3, 0.9)),
        breath=float(np.clip(mixed["breath"] + voice.breath + rng.normal(0, 0.02 * spread), 0.0, 0.7)),
        tilt_db=mixed["tilt_db"] + voice.tilt_db + rng.normal(0, 0.7 * spread),
        pause_prob=float(np.clip(mixed["pause_prob"] + (0.0 if acted else 0.15), 0, 0.9)),
    )
    return p, intensity


def _attributes(rng: np.random.Generator, emotion: str, style: str, intensity: float) -> dict:
    """Valence/arousal/dominance around the class position, scaled by the clip's intensity."""
    target = PROFILES[emotion]
    if style == "acted":
        strength, noise = intensity, 0.05
    else:
        # Annotators of natural speech still hear the emotion fairly clearly: the ratings are
        # less extreme than acted ones but not squeezed as much as the acoustic cues.
        strength, noise = min(1.0, 0.3 + 0.7 * intensity), 0.08
    out = {}
    for name in ("valence", "arousal", "dominance"):
        v = 0.5 + strength * (getattr(target, name) - 0.5) + rng.normal(0, noise)
        out[name] = float(np.clip(v, 0.0, 1.0))
    return out


def _plan(rng: np.random.Generator, p: EmotionProfile, voice: Voice, duration: float,
          frame_s: float, n_frames: int) -> dict[str, np.ndarray]:
    """Lay out words, syllables and pauses; return control tracks at the frame rate.

    Tracks (each ``(n_frames,)``): ``voice_amp`` and ``noise_amp`` (linear), ``noise_hz``
    (fricative centre), ``f0`` (Hz), ``formants`` ``(n_frames, 4)`` in Hz.
    """
    voice_amp = np.zeros(n_frames)
    noise_amp = np.zeros(n_frames)
    noise_hz = np.full(n_frames, 4000.0)
    pitch_st = np.zeros(n_frames)
    formants = np.full((n_frames, 3), np.nan)

    def frames(t0, t1):
        return slice(int(round(t0 / frame_s)), max(int(round(t0 / frame_s)) + 1, int(round(t1 / frame_s))))

    t = rng.uniform(0.12, 0.3)
    end = duration - rng.uniform(0.1, 0.25)
    while t < end - 0.1:
        for _ in range(int(rng.integers(1, 5))):
            d = rng.uniform(0.7, 1.3) / p.rate
            if t + d > end:
                d = end - t
                if d < 0.08:
                    break
            onset = rng.choice(3, p=[0.35, 0.35, 0.3])       # none / fricative / stop
            c = 0.0 if onset == 0 else rng.uniform(0.2, 0.35) * d
            if onset == 1:
                sl = frames(t, t + c)
                noise_amp[sl] = np.sin(np.linspace(0, np.pi, sl.stop - sl.start)) * rng.uniform(0.2, 0.5)
                noise_hz[sl] = rng.uniform(2500, 6500)
            elif onset == 2:   # closure is silence; a short broadband burst releases it
                sl = frames(t + 0.7 * c, t + 0.7 * c + 0.015)
                noise_amp[sl] = rng.uniform(0.3, 0.6)
                noise_hz[sl] = rng.uniform(1500, 4000)
            sl = frames(t + c, t + d)
            n = sl.stop - sl.start
            u = np.linspace(0, 1, n + 2)[1:-1]
            # Onset sharpness (attack < 1 is abrupt) and a slower decay.
            env = np.sin(np.pi * u ** p.attack) ** 0.8
            stressed = rng.random() < 0.35
            voice_amp[sl] = env * (1.4 if stressed else 1.0) * rng.uniform(0.85, 1.15)
            accent = p.range_st * (rng.uniform(0.6, 1.0) if stressed else rng.uniform(-0.2, 0.3))
            peak = rng.uniform(0.3, 0.7)
            pitch_st[sl] = accent * np.exp(-0.5 * ((u - peak) / 0.25) ** 2)
            formants[sl] = _VOWELS[rng.integers(len(_VOWELS))]
            t += d
        # Between words: a pause (more often when sad, and in natural speech) or a short gap.
        if rng.random() < p.pause_prob:
            t += rng.uniform(0.12, 0.45)
        else:
            t += rng.uniform(0.0, 0.03)

    times = np.arange(n_frames) * frame_s
    active = np.nonzero(voice_amp)[0]
    last = active[-1] if len(active) else n_frames - 1
    pitch_st -= p.declination_st * times / duration
    if rng.random() < p.final_rise:
        start = max(0, last - int(0.25 / frame_s))
        pitch_st[start:last + 1] += np.linspace(0, p.range_st, last + 1 - start)
    # Slow wander and jitter on top of the intended contour.
    wander = _smooth(rng.normal(0, 1, n_frames), int(0.15 / frame_s)) * 2.0
    jitter = _smooth(rng.normal(0, 1, n_frames), 2) * 0.12
    f0 = voice.f0 * 2 ** ((p.f0_st + pitch_st + wander + jitter) / 12)

    # Coarticulation: hold the previous vowel through consonants and pauses, then glide.
    idx = np.where(np.isnan(formants[:, 0]), 0, np.arange(n_frames))
    np.maximum.accumulate(idx, out=idx)
    formants = formants[idx]
    formants[np.isnan(formants[:, 0])] = _VOWELS[5]
    formants = np.stack([_smooth(formants[:, k], int(0.04 / frame_s)) for k in range(3)], axis=1)
    scale = voice.tract * (1 + p.formant_shift)
    formants = np.concatenate([formants * scale, np.full((n_frames, 1), 3500.0 * scale)], axis=1)
    formants[:, 0] *= 1 + p.f1_shift
    return {"voice_amp": _smooth(voice_amp, 2), "noise_amp": noise_amp, "noise_hz": noise_hz,
            "f0": f0, "formants": formants}


def render_clip(rng: np.random.Generator, voice: Voice, emotion: str, style: str,
                sample_rate: int = 16000) -> tuple[np.ndarray, dict]:
    """Synthesize one clip.

    Args:
        rng: the clip's random generator (everything random about the clip comes from it).
        voice: the speaker.
        emotion: one of ``CLASSES``.
        style: ``acted`` or ``natural``.
        sample_rate: Hz.

    Returns:
        ``(audio (T,) float32 in [-1, 1], {"valence", "arousal", "dominance"})``.

    Raises:
        ValueError: an unknown emotion or style.
    """
    if emotion not in PROFILES:
        raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(CLASSES)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    p, intensity = _clip_profile(rng, voice, emotion, style)
    attributes = _attributes(rng, emotion, style, intensity)
    hop = sample_rate // 125                                   # 8 ms frames
    n_fft = 4 * hop
    duration = rng.uniform(*_DURATION[style])
    n = int(duration * sample_rate)
    n_frames = n // hop + 1
    tracks = _plan(rng, p, voice, duration, hop / sample_rate, n_frames)

    # Sample-rate source signals.
    frame_pos = np.arange(n_frames) * hop
    pos = np.arange(n)
    f0 = np.interp(pos, frame_pos, tracks["f0"])                  # (T,)
    amp = np.interp(pos, frame_pos, tracks["voice_amp"])          # (T,)
    phase = np.cumsum(f0 / sample_rate) % 1.0
    oq = p.open_quotient
    op, cp = 0.7 * oq, 0.3 * oq                                  # opening / closing phase
    flow = np.where(phase < op, 0.5 * (1 - np.cos(np.pi * phase / op)),
                    np.where(phase < oq, np.cos(0.5 * np.pi * (phase - op) / cp), 0.0))
    # Flow derivative (lip radiation included) and pulse-synchronous aspiration, each scaled to
    # unit RMS while voiced: voice quality shapes the spectrum, the level is set separately.
    voiced = amp > 0.05
    pulses = np.diff(flow, prepend=0.0)
    pulses /= _rms(pulses[voiced]) + 1e-12
    aspiration = rng.normal(0, 1, n) * (0.3 + flow)
    aspiration /= _rms(aspiration[voiced]) + 1e-12
    source = amp * ((1 - p.breath) * pulses + p.breath * aspiration)
    noise_src = rng.normal(0, 1, n) * np.interp(pos, frame_pos, tracks["noise_amp"])

    # Filter in the STFT domain with time-varying envelopes.
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)                # (F,)
    tract = _formant_envelope(freqs, tracks["formants"], p.breath)  # (frames, F)
    tilt = 10 ** (p.tilt_db / 20 * np.log2(np.maximum(freqs, 500.0) / 500.0))  # (F,)
    octaves_off = np.log2(np.maximum(freqs, 50.0)[None, :] / tracks["noise_hz"][:, None])  # (frames, F)
    fric = np.exp(-0.5 * (octaves_off / 0.6) ** 2) + 0.01
    channel = _channel(rng, freqs) if style == "natural" else np.ones_like(freqs)
    spec = (_stft(source, n_fft, hop) * tract * tilt + _stft(noise_src, n_fft, hop) * fric * 0.8) * channel
    speech = _istft(spec, n_fft, hop, n)

    active = (amp + np.interp(pos, frame_pos, tracks["noise_amp"])) > 0.05
    if style == "natural" and rng.random() < 0.5:
        speech = _reverb(rng, speech, sample_rate)
    speech = speech / (_rms(speech[active]) + 1e-12) * 10 ** ((_REFERENCE_DB + p.level_db) / 20)

    if style == "natural":
        snr = rng.uniform(5, 25)
        noise = _background(rng, n, sample_rate, channel, freqs)
        audio = speech + noise * _rms(speech[active]) / 10 ** (snr / 20)
        audio = audio * 10 ** (rng.uniform(-6, 4) / 20)            # recording level
    else:
        audio = speech + rng.normal(0, 10 ** (-75 / 20), n)          # studio noise floor
    peak = np.abs(audio).max()
    if peak > 0.95:
        audio = audio * (0.95 / peak)
    return audio.astype(np.float32), attributes


# ---------------------------------------------------------------------------------------------
# Signal pieces


def _formant_envelope(freqs: np.ndarray, formants: np.ndarray, breath: float) -> np.ndarray:
    """Vocal-tract magnitude as parallel formant resonances, ``(frames, F)``.

    Each resonance is ``1 / sqrt((1 - x^2)^2 + (x B / F)^2)`` with ``x = f / F``, divided by its
    peak ``F / B`` and weighted (F1 strongest). A parallel sum rather than a cascade keeps the
    skirts above F4 from falling at 48 dB/octave; a fixed F5 keeps some energy up high. Breathy
    voices have damped (wider) formants.
    """
    widths = _BANDWIDTHS * (1 + 1.5 * breath)
    f5 = formants[:, 3:4] * 1.3                                     # (frames, 1)
    centres = np.concatenate([formants, f5], axis=1)                # (frames, 5)
    env = np.zeros((formants.shape[0], freqs.shape[0]))
    for k, weight in enumerate(_FORMANT_WEIGHTS):
        fk = centres[:, k:k + 1]                                    # (frames, 1)
        bk = widths[min(k, 3)]
        x = freqs[None, :] / fk
        env += weight * (bk / fk) / np.sqrt((1 - x ** 2) ** 2 + (x * bk / fk) ** 2)
    return env


def _channel(rng: np.random.Generator, freqs: np.ndarray) -> np.ndarray:
    """A random recording channel's magnitude response ``(F,)``: microphone colouring, and on
    some clips a telephone band (300-3400 Hz) or a low-pass from a cheap codec."""
    octave = np.log2(np.maximum(freqs, 50.0) / 1000.0)
    gain_db = rng.normal(0, 1.0) * octave
    for _ in range(3):
        centre, width = rng.uniform(-3, 3), rng.uniform(0.3, 1.0)       # octaves re 1 kHz
        gain_db += rng.normal(0, 3.0) * np.exp(-0.5 * ((octave - centre) / width) ** 2)
    h = 10 ** (gain_db / 20)
    kind = rng.random()
    f = np.maximum(freqs, 1.0)
    if kind < 0.25:
        h = h / np.sqrt(1 + (300 / f) ** 8) / np.sqrt(1 + (f / 3400) ** 8)
    elif kind < 0.5:
        h = h / np.sqrt(1 + (f / rng.uniform(3500, 7000)) ** 8)
    return h


def _background(rng: np.random.Generator, n: int, sample_rate: int, channel_h: np.ndarray,
                channel_f: np.ndarray) -> np.ndarray:
    """Unit-RMS background noise ``(T,)``: coloured noise (white to brown), sometimes mains
    hum, sometimes speech-shaped babble, all through the clip's channel."""
    size = _fast_size(n)
    f = np.fft.rfftfreq(size, 1 / sample_rate)
    shape = np.maximum(f, 20.0) ** (-rng.uniform(0.0, 1.0))        # amplitude: white .. brown
    if rng.random() < 0.3:   # babble: energy around speech formants, syllable-rate modulation
        shape = shape + 3 * np.exp(-0.5 * (np.log2(np.maximum(f, 20.0) / 600) / 1.2) ** 2) * shape.max()
    spec = (rng.normal(0, 1, f.shape) + 1j * rng.normal(0, 1, f.shape)) * shape
    spec *= np.interp(f, channel_f, channel_h)
    noise = np.fft.irfft(spec, size)[:n]
    if rng.random() < 0.3:
        t = np.arange(n) / sample_rate
        noise *= 1 + 0.6 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
    noise /= _rms(noise) + 1e-12
    if rng.random() < 0.2:
        t = np.arange(n) / sample_rate
        mains = rng.choice([50.0, 60.0])
        noise += sum(np.sin(2 * np.pi * mains * k * t) / k for k in (1, 2, 3)) * rng.uniform(0.3, 1.0)
        noise /= _rms(noise)
    return noise


def _reverb(rng: np.random.Generator, x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Room reverberation: direct path plus an exponentially decaying noise tail (RT60 0.15-0.6 s)."""
    rt60 = rng.uniform(0.15, 0.6)
    length = int(rt60 * sample_rate)
    t = np.arange(length) / sample_rate
    ir = rng.normal(0, 1, length) * np.exp(-6.9 * t / rt60)
    ir *= rng.uniform(0.3, 1.0) / np.sqrt(np.sum(ir ** 2))     # reverberant vs direct energy
    ir[0] = 1.0
    size = _fast_size(len(x) + length)
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)
    return y[:len(x)]


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Hann-windowed STFT with frames centred on ``k * hop``: ``(len(x) // hop + 1, n_fft // 2 + 1)``."""
    n_frames = len(x) // hop + 1
    padded = np.zeros((n_frames + 3) * hop + n_fft)
    padded[n_fft // 2:n_fft // 2 + len(x)] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]  # (frames, n_fft)
    return np.fft.rfft(frames * _hann(n_fft), axis=1)


def _istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """Inverse of ``_stft`` (weighted overlap-add; n_fft = 4 hop, so Hann^2 sums to 1.5)."""
    frames = np.fft.irfft(spec, n_fft, axis=1) * _hann(n_fft)     # (frames, n_fft)
    n_frames = frames.shape[0]
    parts = frames.reshape(n_frames, 4, hop)
    out = np.zeros((n_frames + 3) * hop)
    for k in range(4):
        out[k * hop:k * hop + n_frames * hop] += parts[:, k, :].reshape(-1)
    return out[n_fft // 2:n_fft // 2 + length] / 1.5


def _fast_size(n: int) -> int:
    """The next power of two: FFTs of arbitrary (possibly prime) lengths are many times slower."""
    return 1 << (int(n) - 1).bit_length()


def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over ``2 * width + 1`` frames (edges padded with the end values)."""
    if width <= 0:
        return x
    kernel = np.ones(2 * width + 1) / (2 * width + 1)
    return np.convolve(np.pad(x, width, mode="edge"), kernel, mode="valid")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0


# ---------------------------------------------------------------------------------------------
# Measuring the cues back


def measure_cues(audio: np.ndarray, sample_rate: int) -> dict[str, float]:
    """Crude per-clip acoustic measurements, to check that the planted cues are there.

    Cheap enough for tests; not a substitute for the model's log-mel features.

    Args:
        audio: ``(T,)`` float samples.
        sample_rate: Hz.

    Returns:
        ``level_db`` (dBFS RMS over active frames), ``floor_db`` (10th-percentile frame level:
        the noise floor in pauses), ``active_ratio`` (frames within 30 dB of the loudest),
        ``f0_hz`` and ``f0_range_st`` (median and 10-90 % spread of an autocorrelation pitch
        estimate over voiced frames), ``voiced_ratio``, ``hf_db`` (energy above 2 kHz vs
        below 1 kHz over active frames: spectral tilt / brightness).
    """
    audio = np.asarray(audio, dtype=np.float64)
    win, hop = int(0.032 * sample_rate), int(0.01 * sample_rate)
    if len(audio) < win:
        audio = np.pad(audio, (0, win - len(audio)))
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop] * _hann(win)  # (frames, win)
    power = np.mean(frames ** 2, axis=1) + 1e-12
    db = 10 * np.log10(power)
    active = db > db.max() - 30
    spec = np.abs(np.fft.rfft(frames, 2 * win, axis=1)) ** 2          # (frames, win + 1)
    freqs = np.fft.rfftfreq(2 * win, 1 / sample_rate)
    hf = spec[active][:, freqs > 2000].sum() + 1e-12
    lf = spec[active][:, (freqs > 60) & (freqs < 1000)].sum() + 1e-12
    # Autocorrelation peak in the 70-400 Hz lag range, divided by the window's own
    # autocorrelation so long periods are not penalised, with a small cost per octave of lag
    # against picking a multiple of the period (Boersma 1993).
    ac = np.fft.irfft(spec, axis=1)[:, :win]                           # (frames, lags)
    ac_win = np.fft.irfft(np.abs(np.fft.rfft(_hann(win), 2 * win)) ** 2)[:win]
    ac = ac / (ac[:, :1] + 1e-12) / np.maximum(ac_win / ac_win[0], 1e-3)
    lo, hi = int(sample_rate / 400), int(sample_rate / 70)
    octave_cost = 0.1 * np.log2(np.arange(lo, hi) / lo)
    peak_lag = lo + np.argmax(ac[:, lo:hi] - octave_cost, axis=1)
    strength = ac[np.arange(len(ac)), peak_lag]
    voiced = active & (strength > 0.45)
    f0 = sample_rate / peak_lag[voiced]
    return {
        "level_db": float(10 * np.log10(power[active].mean())),
        "floor_db": float(np.percentile(db, 10)),
        "active_ratio": float(active.mean()),
        "f0_hz": float(np.median(f0)) if len(f0) else 0.0,
        "f0_range_st": (float(12 * np.log2(np.percentile(f0, 90) / np.percentile(f0, 10)))
                        if len(f0) > 2 else 0.0),
        "voiced_ratio": float(voiced.sum() / max(1, active.sum())),
        "hf_db": float(10 * np.log10(hf / lf)),
    }
