"""Randomly initialised cache-aware FastConformer RNN-T models built from a config dict.

The tests build a tiny one (2 layers, d_model 64, character labels) and save it to a ``.nemo`` so
that it goes through the same loading path as the real ``nemotron-speech-streaming-en-0.6b``
checkpoint. ``bench/asr_bench.py`` builds the full-size architecture (24 layers, d_model 1024)
with the same function. Nothing is downloaded: the weights are random. It lives with the
benchmarks, outside the product packages: the agent never builds a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Every chunk size the engine accepts: att_context_size=[70, R], R in {13, 6, 1, 0}.
ATT_CONTEXT_SIZES = [[70, 13], [70, 6], [70, 1], [70, 0]]

SIZES: dict[str, dict[str, int]] = {
    # layers, d_model, heads, prediction/joint width, subsampling channels, mel bins, vocabulary
    "tiny": dict(layers=2, d_model=64, heads=4, pred=64, joint=64, sub=32, mels=128, vocab=0),
    "full": dict(layers=24, d_model=1024, heads=8, pred=640, joint=640, sub=256, mels=128, vocab=1024),
}

CHAR_LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def labels_for(size: str) -> list[str]:
    """Character labels: 28 real ones for the tiny model, 1024 CJK code points for the full one."""
    vocab = SIZES[size]["vocab"]
    return CHAR_LABELS if vocab == 0 else [chr(0x4E00 + i) for i in range(vocab)]


def model_config(size: str = "tiny") -> dict[str, Any]:
    """A complete ``EncDecRNNTModel`` config dict for the given size."""
    d = SIZES[size]
    labels = labels_for(size)
    return {
        "sample_rate": 16000,
        "labels": labels,
        "model_defaults": {"enc_hidden": d["d_model"], "pred_hidden": d["pred"], "joint_hidden": d["joint"]},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "NA",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": d["mels"],
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,  # as in training configs; the engine must turn it off
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": d["mels"],
            "feat_out": -1,
            "n_layers": d["layers"],
            "d_model": d["d_model"],
            "use_bias": False,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": d["sub"],
            "causal_downsampling": True,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": d["heads"],
            "att_context_size": ATT_CONTEXT_SIZES,
            "att_context_style": "chunked_limited",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "layer_norm",
            "conv_context_size": "causal",
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": d["pred"], "pred_rnn_layers": 2, "t_max": None, "dropout": 0.0},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "jointnet": {"joint_hidden": d["joint"], "activation": "relu", "dropout": 0.0},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "pytorch"},
        "train_ds": None,
        "validation_ds": None,
        "test_ds": None,
        "optim": None,
    }


def speechlike(num_samples: int, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """Deterministic float32 test audio: a gated, gliding tone over low noise (syllable-ish)."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    pitch = 200 + 2800 * np.abs(np.sin(2 * np.pi * (0.5 + 0.1 * seed) * t))
    gate = np.sin(2 * np.pi * (2.3 + 0.2 * seed) * t) > 0
    tone = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / sample_rate) * gate
    return (tone + 0.05 * rng.standard_normal(num_samples)).astype(np.float32)


def _make_joint_input_sensitive(model, gain: float, blank_bias: float, max_symbols: int) -> None:
    """Make a random joint's choices depend on the audio, as a trained one's do.

    A random encoder's output is mostly a constant offset, so a random joint emits the same
    character everywhere. Standardising the joint's encoder projection on calibration audio
    (then scaling it) makes each frame's token depend on that frame; the blank bias and a
    small ``max_symbols`` give roughly one token per encoder frame.
    """
    import copy

    import torch
    from omegaconf import open_dict

    signal = torch.from_numpy(speechlike(4 * 16000, seed=99)).unsqueeze(0)
    with torch.no_grad():
        mel, mel_len = model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]]))
        encoded, _ = model.encoder(audio_signal=mel, length=mel_len)
        mean, std = encoded[0].mean(dim=1), encoded[0].std(dim=1)
        weight = model.joint.enc.weight * (0.2 * gain / std)[None, :]
        model.joint.enc.weight.copy_(weight)
        model.joint.enc.bias.copy_(-weight @ mean)
        _last_linear(model.joint).bias[-1] += blank_bias
    decoding = copy.deepcopy(model.cfg.decoding)
    with open_dict(decoding):
        decoding.greedy.max_symbols = max_symbols
    model.change_decoding_strategy(decoding, verbose=False)


def _last_linear(joint):
    import torch

    return [m for m in joint.modules() if isinstance(m, torch.nn.Linear)][-1]


def build_model(size: str = "tiny", *, seed: int = 0, blank_bias: float = 0.0, input_sensitive: bool = False):
    """Build a random ``EncDecRNNTModel`` in eval mode.

    ``blank_bias`` raises the joint's blank logit (the blank is its last output).
    ``input_sensitive`` calibrates the joint so that tokens depend on the audio (tests).
    """
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecRNNTModel

    torch.manual_seed(seed)
    model = EncDecRNNTModel(cfg=OmegaConf.create(model_config(size))).eval()
    if input_sensitive:
        _make_joint_input_sensitive(model, gain=8.0, blank_bias=1.0 + blank_bias, max_symbols=3)
    elif blank_bias:
        with torch.no_grad():
            _last_linear(model.joint).bias[-1] += blank_bias
    return model


def save_random_nemo(
    path: Path, size: str = "tiny", *, seed: int = 0, blank_bias: float = 0.0, input_sensitive: bool = False
) -> Path:
    """Build a random model and save it as a ``.nemo`` archive at ``path``."""
    model = build_model(size, seed=seed, blank_bias=blank_bias, input_sensitive=input_sensitive)
    path = Path(path)
    model.save_to(str(path))
    return path


_BUILT: dict[str, Path] = {}


def tiny_nemo_once(directory: Path) -> Path:
    """The tiny input-sensitive test model, built once per test session (a few seconds)."""
    if "tiny" not in _BUILT or not _BUILT["tiny"].is_file():  # built in a directory since removed: again
        _BUILT["tiny"] = save_random_nemo(Path(directory) / "tiny_streaming_rnnt.nemo", input_sensitive=True)
    return _BUILT["tiny"]


def offline_text(model, samples: np.ndarray) -> tuple[str, int]:
    """Whole-utterance NeMo inference (no streaming, no engine code): (text, encoder frames).

    Uses the model's current attention context, so it is the reference a streaming pass over
    the same float samples must match. With character labels, equal text means equal tokens.
    """
    import torch

    signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).unsqueeze(0)
    with torch.inference_mode():
        mel, mel_len = model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]]))
        encoded, encoded_len = model.encoder(audio_signal=mel, length=mel_len)
        hyps = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded, encoded_lengths=encoded_len, return_hypotheses=True
        )
    return hyps[0].text, int(encoded_len[0])
