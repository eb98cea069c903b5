"""Loading and checking a local cache-aware RNN-T ``.nemo`` checkpoint for streaming.

Every refusal is a :class:`SetupError` whose one sentence names the setting to fix
(``STT_MODEL_PATH``, ``ASR_CHUNK_MS`` or ``ASR_DEVICE``). Nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import zipfile
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from processors.errors import SetupError

_MS_PER_ENCODER_FRAME = 80  # 8x subsampling of 10 ms mel frames

# Attribute naming (through a weak reference) the fast stepper whose CUDA graphs point into a
# model's buffers; see processors.nemotron.graphs.FastStepper.
GRAPH_OWNER_ATTR = "_nemotron_graph_owner"


def check_no_graphs(model) -> None:
    """Refuse to re-prepare a model that an engine's captured CUDA graphs still point into.

    Preparing (moving, changing the attention context or the decoding) may replace tensors a
    graph replays against: the replay would then read freed memory (an illegal memory access,
    or silently wrong results). Close the first engine, or load the model once per engine.
    """
    ref = getattr(model, GRAPH_OWNER_ATTR, None)
    owner = ref() if ref is not None else None
    if owner is not None and owner.holds_graphs:
        raise SetupError(
            "This NeMo model already serves an engine with captured CUDA graphs; call close() on that "
            "engine before building another engine on the same model, or load the model again for it."
        )


@dataclass
class LoadedModel:
    model: Any  # nemo EncDecRNNTModel, eval mode, streaming context set
    device: torch.device
    precision: str  # "fp32" or "bf16"


def cast_matmul_weights(model, dtype: torch.dtype) -> None:
    """Store the weights of the model's linear, convolution and LSTM layers as autocast to ``dtype`` (bf16) uses them.

    Under bf16 autocast these layers cast their weights to bf16 at every call, and with the
    autocast cache off (as CUDA graphs need) a step re-cast all 0.6 B parameters, about a tenth
    of one stream's step. Stored in bf16 they are used as they are: the same bf16 values, so the
    same results, for every path that runs the model under bf16 autocast. Norms, biases added
    outside these layers and embeddings keep their dtype.

    cuDNN's LSTM is the exception: autocast runs it in float16 whatever its dtype
    (``_cudnn_rnn_cast_reflatten``), casting and re-flattening weights that are not float16 into
    a new buffer at every call (8 copies per call, 20 calls a step). Its weights are stored in
    float16, cast once from their own values as autocast casts them: the same values, no copies.
    """
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    for part in (model.encoder, model.decoder, model.joint):
        for module in part.modules():
            if isinstance(module, kinds):
                module.to(dtype)
            if isinstance(module, torch.nn.LSTM):
                if module.weight_ih_l0.is_cuda and dtype in (torch.bfloat16, torch.float16):
                    module.to(torch.float16)
                    module.flatten_parameters()  # one buffer, or cuDNN copies the weights into one at every call
                else:
                    module.to(dtype)


def resolve_device(device: str) -> torch.device:
    """Map ASR_DEVICE ("auto", "cuda", "cpu") to a torch device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("ASR_DEVICE=auto found no CUDA GPU: streaming ASR runs on the CPU and will be slow")
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("Setting ASR_DEVICE is cuda but no CUDA GPU is visible; use auto or cpu, or fix the driver.")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise SetupError(f"Setting ASR_DEVICE is invalid (got {device!r}): allowed values are auto, cuda, cpu.")


def _check_path(model_path: Path | str | None) -> Path:
    if model_path is None or str(model_path) == "":
        raise SetupError("Setting STT_MODEL_PATH is required: point it to the local .nemo file of the streaming model.")
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise SetupError(f"Setting STT_MODEL_PATH points to {str(path)!r}, which is not a file; copy the .nemo there or fix the path.")
    if path.suffix != ".nemo" or not (tarfile.is_tarfile(path) or zipfile.is_zipfile(path)):
        raise SetupError(f"Setting STT_MODEL_PATH points to {str(path)!r}, which is not a .nemo archive.")
    return path


def _restore(path: Path, device: torch.device):
    from nemo.collections.asr.models import ASRModel

    try:
        return ASRModel.restore_from(str(path), map_location=device)
    except Exception as e:  # NeMo raises many types for a broken archive
        raise SetupError(f"Setting STT_MODEL_PATH: {str(path)!r} could not be loaded as a NeMo ASR model ({e}).") from e


def _check_streaming(model, path: Path, right_context: int) -> list[int]:
    """Refuse anything that is not a cache-aware RNN-T with this chunk size; returns [left, right]."""
    from nemo.collections.asr.models import EncDecRNNTModel
    from nemo.collections.asr.parts.mixins.streaming import StreamingEncoder

    name = f"{str(path)!r}"
    if not isinstance(model, EncDecRNNTModel):
        raise SetupError(f"Setting STT_MODEL_PATH: {name} is a {type(model).__name__}, not a cache-aware RNN-T model.")
    encoder = model.encoder
    if not isinstance(encoder, StreamingEncoder) or getattr(encoder, "att_context_style", None) != "chunked_limited":
        raise SetupError(f"Setting STT_MODEL_PATH: {name} is not a cache-aware streaming model (chunked_limited attention).")
    featurizer = model.preprocessor.featurizer
    if str(featurizer.normalize or "NA").lower() not in ("na", "none", "") or featurizer.exact_pad or featurizer.frame_splicing != 1:
        raise SetupError(f"Setting STT_MODEL_PATH: {name} uses feature normalization or padding that cannot stream exactly.")
    contexts = [list(c) for c in encoder.att_context_size_all]
    matching = [c for c in contexts if c[1] == right_context]
    if not matching:
        offered = sorted({(c[1] + 1) * _MS_PER_ENCODER_FRAME for c in contexts if c[1] >= 0})
        raise SetupError(
            f"Setting ASR_CHUNK_MS is not supported by this model: it was trained for "
            f"{', '.join(str(ms) for ms in offered)} ms chunks."
        )
    return matching[0]


def _greedy_decoding(model, cuda_graph_decoder: bool):
    """Greedy batched RNN-T decoding (the only mode where streaming equals offline)."""
    from omegaconf import open_dict

    cfg = copy.deepcopy(model.cfg.decoding)
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.greedy = cfg.get("greedy") or {}
        cfg.greedy.max_symbols = cfg.greedy.get("max_symbols") or 10
        cfg.greedy.loop_labels = True
        cfg.greedy.use_cuda_graph_decoder = cuda_graph_decoder
        cfg.preserve_alignments = False
        cfg.compute_timestamps = False
    if hasattr(model, "cur_decoder"):  # hybrid RNN-T/CTC checkpoints
        model.change_decoding_strategy(cfg, decoder_type="rnnt", verbose=False)
    else:
        model.change_decoding_strategy(cfg, verbose=False)


def load_streaming_model(
    model_path: Path | str | None,
    *,
    right_context: int,
    device: str = "auto",
    precision: str = "auto",
    cuda_graph_decoder: bool = False,
) -> LoadedModel:
    """Load a local ``.nemo`` and prepare it with :func:`prepare_streaming_model`."""
    path = _check_path(model_path)
    torch_device = resolve_device(device)
    model = _restore(path, torch_device)
    return prepare_streaming_model(
        model, right_context=right_context, device=torch_device, precision=precision,
        cuda_graph_decoder=cuda_graph_decoder, source=path,
    )


def prepare_streaming_model(
    model,
    *,
    right_context: int,
    device: torch.device,
    precision: str = "auto",
    cuda_graph_decoder: bool = False,
    source: Path | str = "the model",
) -> LoadedModel:
    """Check and prepare a model: eval mode, no dither, greedy decoding, context [L, R]."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise SetupError(f"ASR precision {precision!r} is invalid: allowed values are auto, fp32, bf16.")
    check_no_graphs(model)
    context = _check_streaming(model, Path(source), right_context)
    model = model.to(device).eval()
    model.preprocessor.featurizer.dither = 0.0
    model.preprocessor.featurizer.pad_to = 0
    model.encoder.set_default_att_context_size(context)
    _greedy_decoding(model, cuda_graph_decoder)
    logger.debug(f"Prepared {Path(source).name}: att_context_size={context}, {device.type}, {precision}")
    return LoadedModel(model=model, device=device, precision=precision)
