"""Edge inference at 5-15 W: llama.cpp's GGUF block formats, the edge devices, the power model.

Block formats (GGUF, as llama.cpp's ``ggml`` stores them; ``gguf.quants`` is the oracle)
    :data:`FORMATS` -- name -> :class:`BlockFormat` (weights per block, bytes per block).
    :func:`bits_per_weight` -- exact, from the block layout (Q8_0 8.5, Q4_0 4.5, Q4_K 4.5,
    Q6_K 6.5625).
    :func:`quantize` / :func:`dequantize` -- Q8_0 and Q4_0 written out in NumPy, byte for
    byte what ``gguf.quants.quantize`` produces; :func:`dequantize` also reads Q4_K.
    :func:`pack_q4_k` -- one Q4_K super-block (256 weights) from its parts.

The tiny target in a real GGUF file
    :func:`write_gguf` writes ``utils.tiny``'s target with ``gguf.GGUFWriter`` in one
    format, :func:`read_gguf` reads it back into a runnable model.

Edge devices and the power model
    :data:`EDGE_DEVICES` -- Jetson modules with memory, bandwidth and power modes, sourced.
    :func:`decode_tokens_per_s` -- ``tokens/s <= bandwidth / bytes per token``;
    :func:`joules_per_token` -- ``J/token = W / (tokens/s)``.

Bad input: an unknown format or device, a last dimension that the block size does not
divide, a NaN or infinite input raise ``ValueError`` (an unknown name raises
:class:`utils.validate.UnknownName`, a ``ValueError`` and a ``KeyError``). An all-zero block
is not an error: its scale is 0 and its codes are the zero code, as in ``ggml``
(``id = d == 0 ? 0 : 1/d``), so it dequantizes to exact zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .validate import UnknownName, check_choice, check_int, check_number, check_positive

__all__ = ["BlockFormat", "FORMATS", "bits_per_weight", "quantize", "dequantize", "pack_q4_k",
           "EdgeDevice", "EDGE_DEVICES", "edge_device", "decode_tokens_per_s",
           "joules_per_token", "model_bytes", "speed_outliers", "write_gguf", "read_gguf"]


# ---------------------------------------------------------------------------------------
# Block formats
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockFormat:
    name: str
    block_size: int         # weights per block
    type_size: int          # bytes per block
    layout: str             # what the bytes of one block hold, in order


#: GGUF block layouts (ggml's ``block_q8_0``, ``block_q4_0``, ``block_q4_K``, ``block_q6_K``
#: in ggml-common.h; the sizes are ``gguf.GGML_QUANT_SIZES``). QK_K = 256 weights per
#: K-quant super-block.
FORMATS: dict[str, BlockFormat] = {
    "F32": BlockFormat("F32", 1, 4, "float32"),
    "F16": BlockFormat("F16", 1, 2, "float16"),
    "Q8_0": BlockFormat("Q8_0", 32, 34, "d: f16 | qs: 32 x int8"),
    "Q4_0": BlockFormat("Q4_0", 32, 18, "d: f16 | qs: 16 bytes, low nibbles = weights 0-15, "
                                        "high nibbles = weights 16-31, value = d * (q - 8)"),
    "Q4_K": BlockFormat("Q4_K", 256, 144, "d: f16 | dmin: f16 | scales: 12 bytes (8 x 6-bit scale, "
                                          "8 x 6-bit min) | qs: 128 bytes of 4-bit codes"),
    "Q6_K": BlockFormat("Q6_K", 256, 210, "ql: 128 | qh: 64 | scales: 16 x int8 | d: f16"),
}


def _fmt(fmt: str) -> BlockFormat:
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name (str), got {type(fmt).__name__}")
    if fmt not in FORMATS:
        raise UnknownName(f"fmt {fmt!r} is not a known GGUF format; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def bits_per_weight(fmt: str) -> float:
    """Bits stored per weight, scales included: ``8 * type_size / block_size``."""
    f = _fmt(fmt)
    return 8 * f.type_size / f.block_size


def _blocks(x, fmt: BlockFormat) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array or a torch tensor, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % fmt.block_size != 0:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.ndim else 'none'}) must be a "
                         f"multiple of {fmt.name}'s block size {fmt.block_size}")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or inf: a block's scale would be NaN")
    return x.reshape(-1, fmt.block_size)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # C's roundf: ties away from zero (np.round rounds ties to even)
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def quantize(x, fmt: str) -> np.ndarray:
    """Quantize float32 ``x`` (last dim a multiple of 32) to Q8_0 or Q4_0 bytes.

    Returns ``uint8`` of shape ``x.shape[:-1] + (x.shape[-1] // 32 * type_size,)``, the
    layout of ``gguf.quants.quantize``.
    """
    f = _fmt(fmt)
    if fmt not in ("Q8_0", "Q4_0"):
        raise ValueError(f"quantize writes Q8_0 and Q4_0; {fmt} is not supported here")
    shape = np.shape(x)
    b = _blocks(x, f)
    if fmt == "Q8_0":
        d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        # ggml: roundf(x * id); exact ties go away from zero
        a = np.abs(b * inv)
        fl = np.floor(a)
        q = (np.sign(b * inv) * (fl + np.floor(2 * (a - fl)))).astype(np.int8)
        out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    else:
        idx = np.abs(b).argmax(axis=1)[:, None]
        d = np.take_along_axis(b, idx, axis=1) / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.clip(np.trunc(b * inv + np.float32(8.5)), 0, 15).astype(np.uint8)
        packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
        out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // f.block_size * f.type_size)


def dequantize(data: np.ndarray, fmt: str) -> np.ndarray:
    """Float32 weights from Q8_0, Q4_0 or Q4_K bytes (last dim a multiple of the block's bytes)."""
    f = _fmt(fmt)
    if fmt not in ("Q8_0", "Q4_0", "Q4_K"):
        raise ValueError(f"dequantize reads Q8_0, Q4_0 and Q4_K; {fmt} is not supported here")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise TypeError("data must be a uint8 NumPy array")
    if data.ndim == 0 or data.shape[-1] % f.type_size != 0:
        raise ValueError(f"data's last dimension must be a multiple of {fmt}'s {f.type_size} bytes per block")
    shape = data.shape
    b = data.reshape(-1, f.type_size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if fmt == "Q8_0":
        w = d * b[:, 2:].view(np.int8).astype(np.float32)
    elif fmt == "Q4_0":
        qs = b[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8
        w = d * q
    else:
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _q4_k_scales(b[:, 4:16])
        qs = b[:, 16:].reshape(-1, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
        w = ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)
    return w.reshape(*shape[:-1], shape[-1] // f.type_size * f.block_size).astype(np.float32)


def _q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.uint16)
    sc = np.empty((s.shape[0], 8), np.float32)
    mn = np.empty((s.shape[0], 8), np.float32)
    for j in range(8):
        if j < 4:
            sc[:, j] = s[:, j] & 63
            mn[:, j] = s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0x0F) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def pack_q4_k(d: float, dmin: float, scales, mins, q) -> np.ndarray:
    """One Q4_K super-block: 144 bytes whose weights are ``d*scales[j]*q - dmin*mins[j]``.

    ``scales`` and ``mins``: 8 integers in [0, 63] (one per sub-block of 32 weights);
    ``q``: 256 integers in [0, 15]; ``d``, ``dmin`` are stored as float16.
    """
    check_number("d", d)
    check_number("dmin", dmin)
    sc = np.asarray(scales)
    mn = np.asarray(mins)
    qq = np.asarray(q)
    for name, a, n, hi in (("scales", sc, 8, 63), ("mins", mn, 8, 63), ("q", qq, 256, 15)):
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be {n} integers, got shape {a.shape} dtype {a.dtype}")
        if a.min() < 0 or a.max() > hi:
            raise ValueError(f"{name} must lie in [0, {hi}]")
    sc, mn, qq = sc.astype(np.uint8), mn.astype(np.uint8), qq.astype(np.uint8)
    s = np.zeros(12, np.uint8)
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4)
    qs = qq.reshape(4, 2, 32)
    qs = (qs[:, 0] | (qs[:, 1] << 4)).reshape(-1)
    head = np.array([d, dmin], np.float16).view(np.uint8)
    return np.concatenate([head, s, qs])


# ---------------------------------------------------------------------------------------
# Edge devices
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeDevice:
    name: str
    memory_bytes: int
    bandwidth: float                      # B/s, peak DRAM bandwidth
    power_modes_w: tuple[float, ...]      # the module's preset power budgets, W
    source: str


_GB = 10 ** 9
EDGE_DEVICES: dict[str, EdgeDevice] = {
    "Jetson-AGX-Orin-64GB": EdgeDevice(
        "Jetson-AGX-Orin-64GB", 64 * 2 ** 30, 204.8 * _GB, (15.0, 30.0, 50.0, 60.0),
        "NVIDIA Jetson AGX Orin Series data sheet, Jetson AGX Orin 64GB column: 64 GB 256-bit "
        "LPDDR5, 204.8 GB/s; module power 15 W - 60 W (nvpmodel presets 15, 30, 50 W; MAXN listed "
        "here as the 60 W module maximum)"),
    "Jetson-Orin-NX-16GB": EdgeDevice(
        "Jetson-Orin-NX-16GB", 16 * 2 ** 30, 102.4 * _GB, (10.0, 15.0, 25.0),
        "NVIDIA Jetson Orin NX Series Modules data sheet (DS-10712-001), Orin NX 16GB column: 16 GB 128-bit "
        "LPDDR5, 102.4 GB/s; power configurable 10 W - 25 W (before the JetPack 6.2 'Super' modes)"),
    "Jetson-Orin-Nano-Super": EdgeDevice(
        "Jetson-Orin-Nano-Super", 8 * 2 ** 30, 102 * _GB, (7.0, 15.0, 25.0),
        "NVIDIA Jetson Orin Nano Super Developer Kit data sheet (Dec 2024): 8 GB 128-bit LPDDR5, "
        "102 GB/s; power modes 7 W / 15 W / 25 W"),
}


def edge_device(name) -> EdgeDevice:
    """A device from :data:`EDGE_DEVICES` by name (or the spec itself)."""
    if isinstance(name, EdgeDevice):
        return name
    if not isinstance(name, str):
        raise TypeError(f"device must be a device name (str), got {type(name).__name__}")
    if name not in EDGE_DEVICES:
        raise UnknownName(f"device {name!r} is not an edge device; known: {', '.join(EDGE_DEVICES)}")
    return EDGE_DEVICES[name]


def model_bytes(n_params: int, fmt: str) -> float:
    """Bytes of weights for ``n_params`` weights in ``fmt`` (bits per weight / 8 each)."""
    n = check_int("n_params", n_params, low=1)
    return n * bits_per_weight(fmt) / 8


def decode_tokens_per_s(bandwidth: float, bytes_per_token: float) -> float:
    """The bandwidth bound on batch-1 decode: every weight is read once per token."""
    check_positive("bandwidth", bandwidth)
    check_positive("bytes_per_token", bytes_per_token)
    return bandwidth / bytes_per_token


def joules_per_token(watts: float, tokens_per_s: float) -> float:
    """Energy per token at a power draw: ``W / (tokens/s)``."""
    check_positive("watts", watts)
    check_positive("tokens_per_s", tokens_per_s)
    return watts / tokens_per_s


def speed_outliers(rates: dict, reference: str = "F32", band: float = 2.0) -> list[str]:
    """Formats whose measured tokens/s lies outside ``[ref / band, ref * band]``.

    On a CPU that decodes every format to float32 before computing, all formats should
    run at about the reference's speed; one far off points at the machine (another
    process, frequency scaling), so the lab reports it as a measurement warning.
    Returned in the order of ``rates``.
    """
    if not isinstance(rates, dict):
        raise TypeError(f"rates must be a dict of format -> tokens/s, got {type(rates).__name__}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a format name (str), got {type(reference).__name__}")
    if reference not in rates:
        raise ValueError(f"reference={reference!r} is not in rates (formats: {', '.join(rates)})")
    check_number("band", band, low=1.0)
    for k, v in rates.items():
        check_positive(f"rates[{k!r}]", v)
    ref = rates[reference]
    return [k for k, v in rates.items() if not ref / band <= v <= ref * band]


# ---------------------------------------------------------------------------------------
# The tiny target in a GGUF file
# ---------------------------------------------------------------------------------------
FILE_FORMATS = ("F32", "F16", "Q8_0", "Q4_0")


def write_gguf(model, path, fmt: str) -> Path:
    """Write ``model`` (a :class:`utils.tiny.TinyTransformer`) to ``path`` with ``gguf.GGUFWriter``.

    Matrices whose rows are a multiple of the block size are stored in ``fmt``; vectors
    (norm weights) stay F32, as llama.cpp keeps them. The config goes in the metadata.
    """
    import gguf

    check_choice("fmt", fmt, FILE_FORMATS)
    from .tiny import TinyTransformer
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a utils.tiny.TinyTransformer, got {type(model).__name__}")
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "tiny")
    w.add_string("tiny.config", model.config.to_json())
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}[fmt])
    for name, t in model.state_dict().items():
        a = t.detach().cpu().float().numpy()
        if a.ndim == 2 and fmt != "F32":
            if fmt == "F16":
                w.add_tensor(name, a.astype(np.float16))
                continue
            if a.shape[-1] % FORMATS[fmt].block_size == 0:
                qtype = getattr(gguf.GGMLQuantizationType, fmt)
                w.add_tensor(name, quantize(a, fmt), raw_dtype=qtype)
                continue
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path):
    """Read a file written by :func:`write_gguf` back into a runnable ``TinyTransformer`` (float32)."""
    import gguf

    from . import tiny

    r = gguf.GGUFReader(str(path))
    field = r.fields["tiny.config"]
    cfg = tiny.TinyConfig.from_json(bytes(field.parts[field.data[0]]).decode())
    model = tiny.TinyTransformer(cfg)
    sd = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        sd[t.name] = torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))
    model.load_state_dict(sd)
    return model.eval()
