"""Named architectures: tiny presets (tests, demo) and the real ones (parameter counts, benchmark).

Both tables map a name to a function returning a fresh ``transformers`` config, which
``backbone_from_config`` builds with fixed-seed random weights; nothing here is downloaded::

    load_backbone("tiny-wavlm")            # TINY_PRESETS["tiny-wavlm"]()
    load_backbone("random:wavlm-large")    # REAL_CONFIGS["wavlm-large"]()

Every registered family (``registry.FAMILIES``) has a tiny preset here, so the unit tests run each
family on CPU in seconds (``tests/unit/model/test_backbone.py`` checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    Data2VecAudioConfig,
    HubertConfig,
    PretrainedConfig,
    Wav2Vec2BertConfig,
    Wav2Vec2Config,
    WavLMConfig,
    WhisperConfig,
)

# The waveform presets keep the real 7-layer CNN's kernels and strides (320× downsampling, 50
# frames/s, so frame lengths map exactly as for the real models) with narrow channels for speed.
_CNN = dict(conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=32)


def _tiny_wavlm() -> WavLMConfig:
    return WavLMConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_buckets=32, max_bucket_distance=64, feat_extract_norm="group", do_stable_layer_norm=False,
    )


def _tiny_hubert() -> HubertConfig:
    return HubertConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False,
    )


def _tiny_wav2vec2() -> Wav2Vec2Config:
    # Layer-norm CNN + pre-LN ("stable layer norm") encoder, like wav2vec 2.0 Large.
    return Wav2Vec2Config(
        **_TINY, **_CNN, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )


def _tiny_data2vec() -> Data2VecAudioConfig:
    return Data2VecAudioConfig(
        **_TINY, **_CNN, num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
    )


def _tiny_whisper() -> WhisperConfig:
    # d_model 96 / 4 heads: the demo's CPU backbone (log-mel at 100 fps → 50 frames/s).
    return WhisperConfig(
        d_model=96, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=192,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=192, vocab_size=64,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )


def _tiny_w2v_bert() -> Wav2Vec2BertConfig:
    return Wav2Vec2BertConfig(
        **_TINY, feature_projection_input_dim=160, position_embeddings_type="relative_key",
        left_max_position_embeddings=16, right_max_position_embeddings=4, conv_depthwise_kernel_size=5,
        add_adapter=False, use_intermediate_ffn_before_adapter=False,
    )


TINY_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-wavlm": _tiny_wavlm,
    "tiny-hubert": _tiny_hubert,
    "tiny-wav2vec2": _tiny_wav2vec2,
    "tiny-data2vec": _tiny_data2vec,
    "tiny-whisper": _tiny_whisper,
    "tiny-w2v-bert": _tiny_w2v_bert,
}

# The published configs of the real checkpoints, written out so parameter counts and benchmarks
# need no download (microsoft/wavlm-base-plus, microsoft/wavlm-large, facebook/hubert-large-ll60k).
_REAL_CNN = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))


def _wavlm_base_plus() -> WavLMConfig:
    return WavLMConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **_REAL_CNN,
        conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800, layer_norm_eps=1e-5,
    )


def _wavlm_large() -> WavLMConfig:
    return WavLMConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_REAL_CNN,
        conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16, num_buckets=320, max_bucket_distance=800, layer_norm_eps=1e-5,
    )


def _hubert_large() -> HubertConfig:
    return HubertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_REAL_CNN,
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, feat_proj_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
    )


REAL_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "wavlm-base-plus": _wavlm_base_plus,
    "wavlm-large": _wavlm_large,
    "hubert-large": _hubert_large,
}
