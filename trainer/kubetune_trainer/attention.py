"""Padding-free attention: a micro-batch is one flattened row of whole examples, and attention runs
per example over `cu_seq_lens` (cumulative example lengths), never over an L² mask.

`data.collate` lays the micro-batch out as one row (B = 1) of concatenated examples with position
ids that restart at 0 for each example, and the example boundaries as `cu_seq_lens_q/k` (int32)
and `max_length_q/k` (python ints, so no kernel needs a device→host read). The model receives
them as keyword arguments and transformers hands them, untouched, to the attention function of
every layer:

- `training.attention: auto` (default) loads the model with `attn_implementation="kubetune_varlen"`,
  the function below, registered in transformers' `AttentionInterface`. transformers 5.23 builds
  no mask for an implementation it has no mask function for (`masking_utils.
  _preprocess_mask_arguments` returns early), so nothing of size L² exists. On CUDA with bf16/fp16
  it calls torch's `torch.nn.attention.varlen.varlen_attn` (the SDPA flash/cuDNN kernels with
  cumulative lengths; GQA without repeating K/V); elsewhere (CPU, fp32, attention dropout) it
  runs `scaled_dot_product_attention(is_causal=True)` once per example: exact, no mask, slower.
- `training.attention: flash_attention_2` loads transformers' own flash-attn integration; with
  the same kwargs its `_flash_attention_forward` takes the "padding free with cu_seqlens" branch
  (`flash_attn_varlen_func` over the flattened B = 1 row). transformers' position-id inference
  only works for B == 1, which is why the batch is flattened rather than kept (B, L).

Either way an example attends only to itself: packing changes no example's loss or gradient.
"""

from __future__ import annotations

import inspect
from typing import Any

NAME = "kubetune_varlen"
_registered = False


def register() -> str:
    """Register the padding-free attention with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, varlen_attention_forward)
        _registered = True
    return NAME


def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def _fast_path(query: Any, dropout: float, softcap: Any) -> bool:
    import torch

    return (
        query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and not dropout
        and softcap is None
        and _torch_varlen() is not None
    )


def _repeat_kv(x: Any, n_rep: int) -> Any:
    """(T, H_kv, D) → (T, H_kv·n_rep, D), each K/V head shared by n_rep query heads."""
    if n_rep == 1:
        return x
    t, h, d = x.shape
    return x[:, :, None, :].expand(t, h, n_rep, d).reshape(t, h * n_rep, d)


def _varlen_cuda(q: Any, k: Any, v: Any, cu: Any, max_len: int, scaling: Any, window: int | None) -> Any:
    """torch's varlen kernel on (T, H, D) tensors; causal, optionally with a sliding window."""
    fn = _torch_varlen()
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {"scale": scaling}
    gqa = q.shape[1] != k.shape[1]
    if "enable_gqa" in params:
        kw["enable_gqa"] = gqa
    elif gqa:
        k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    if "window_size" in params:  # torch >= 2.10: (left, right); (-1, 0) is plain causal
        kw["window_size"] = (window - 1 if window else -1, 0)
    else:  # torch 2.9: is_causal only
        if window:
            raise NotImplementedError("sliding-window attention needs torch >= 2.10's varlen_attn")
        kw["is_causal"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _per_example(q: Any, k: Any, v: Any, bounds: list[int], scaling: Any, dropout: float, window: int | None) -> Any:
    """Causal SDPA over each example on its own (T, H, D) slice: the exact reference path."""
    import torch
    import torch.nn.functional as F

    n_rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        qs = q[a:b].transpose(0, 1)  # (H, n, D)
        ks = _repeat_kv(k[a:b], n_rep).transpose(0, 1)
        vs = _repeat_kv(v[a:b], n_rep).transpose(0, 1)
        n = b - a
        if window and n > window:
            i = torch.arange(n, device=q.device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) & (diff < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scaling)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: Any = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature: query (B, H, T, D), key/value (B, H_kv, T, D);
    returns ((B, T, H, D), None). Without cu_seq_lens (a caller that did not flatten), each row is
    one causal sequence."""
    import torch

    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes no attention mask (examples are delimited by cu_seq_lens)")
    if softcap is not None:
        raise ValueError(f"{NAME} attention does not support logit soft-capping; use training.attention=eager")
    b, _, t, _ = query.shape
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, H, D)
    if cu_seq_lens_q is None:
        rows = [_per_example(q[i], k[i], v[i], [0, t], scaling, dropout, sliding_window) for i in range(b)]
        return torch.stack(rows, dim=0), None
    if b != 1:
        raise ValueError(f"{NAME} attention needs the flattened batch (B = 1) that data.collate builds, got B = {b}")
    if _fast_path(q, dropout, softcap):
        out = _varlen_cuda(q[0], k[0], v[0], cu_seq_lens_q, int(max_length_q or t), scaling, sliding_window)
    else:  # the reference path reads the boundaries on the host (CPU: no device to wait for)
        out = _per_example(q[0], k[0], v[0], cu_seq_lens_q.tolist(), scaling, dropout, sliding_window)
    return out.unsqueeze(0), None
